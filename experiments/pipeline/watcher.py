"""Running: one watcher per engine follows every experiment running there. Each interval it asks
the engine for all their states in one batched call, reads the experiments in one query, beats
their heartbeats in one update, and acts only on what changed (an exit, a timeout); logs are
followed through open streams, a bounded number of experiments per interval. So an interval
costs about the same for a thousand running experiments as for ten.

Exits are moved into Completed together (services.begin_completions: the same few queries for
one exit or fifty), and the rest of each completion (final logs, the outcome) runs on a few
finisher threads: a wave of exits never holds up the interval, nor each other.

A lease (EngineWatch) keeps it to one watcher per engine; the task runs slice after slice
(re-reading its experiments in between, holding the lease) until nothing is left to watch
(run_submit enqueues it again), and enqueues its successor only when its worker shuts down: a
successor sent through the queue waits behind whatever is there (the stop tasks of a wave of
exits, 30 s of them for 500 exits here), and nothing is watched meanwhile."""

import concurrent.futures
import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass
from uuid import UUID

from celery.worker import state as worker_state
from django.conf import settings
from django.db import close_old_connections, connection
from django.utils import timezone

from experiments import services
from experiments.engines import get_engine
from experiments.engines.base import EngineError, ProcessState
from experiments.models import Experiment, StepName, StepStatus
from experiments.pipeline.complete import COMPLETIONS, collect_logs, decided, finish, watch_state_of
from experiments.queue import enqueue
from projects.models import Engine as EngineModel

log = logging.getLogger("experiments.watcher")

# Experiments whose new output one interval reads, in turn: the log work of an interval is
# bounded whatever the number running (each is visited every N / LOG_VISITS intervals).
LOG_VISITS = 32
# Completions under way at once, for every watcher of this process: each waits mostly on the
# database (a dozen queries) and one log read, so a burst of exits in one interval (a sweep's
# runs ending together) is through in well under a second.
_FINISHERS = concurrent.futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="aichor-finish")


@dataclass
class Watched:
    handle: dict
    state: dict  # Experiment.watch_state: log cursors, collected logs, decisive processes


@dataclass
class Interval:
    experiments: int = 0
    changes: int = 0
    lost: bool = False  # another watcher holds the lease now


def watch_engine(engine_id: int) -> None:
    """The watch_engine task: watch slice after slice while anything runs; hand over to a fresh
    task only when the worker shuts down."""
    engine_model = EngineModel.objects.filter(pk=engine_id).first()
    if engine_model is None:
        return
    try:
        watcher = Watcher(engine_model)
    except EngineError as exc:
        log.warning("cannot watch engine %s: %s", engine_id, exc)
        return
    while watcher.run(settings.WATCH_SLICE_SECONDS, going_on=True):
        if worker_state.should_stop is not None or worker_state.should_terminate is not None:
            break
    else:
        return
    watcher.release()
    enqueue("watch_engine", engine_id)


def watch_once(engine_model: EngineModel) -> bool:
    """One interval of the engine's watcher, now, unless a watcher holds the lease (tests, a
    shell); False when one does."""
    watcher = Watcher(engine_model)
    if not services.take_watch(watcher.engine_id, watcher.owner):
        return False
    try:
        watcher.interval()
        watcher.settle()
    finally:
        services.release_watch(watcher.engine_id, watcher.owner)
    return True


class Watcher:
    def __init__(self, engine_model: EngineModel) -> None:
        self.engine_id = engine_model.pk
        self.engine = get_engine(engine_model)
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.known: dict[UUID, Watched] = {}
        # Handed to a finisher, until they leave the watched rows (Succeeded, Failed): never twice.
        self.finishing: dict[UUID, concurrent.futures.Future] = {}
        self.turn = 0
        self.holding = False  # the lease, kept from one slice to the next (run's going_on)

    def run(self, seconds: float, *, going_on: bool = False) -> bool:
        """Watch until the slice ends; True when a successor must take over. `going_on`: this
        watcher runs the next slice itself, so a full slice keeps the lease and the completions
        under way (at the end of a slice in a wave of exits, waiting for hundreds of them left
        every exit unnoticed for half a minute); only its experiments are read again."""
        if not self.holding and not services.take_watch(self.engine_id, self.owner):
            return False  # a live watcher has it
        self.holding = True
        poll = settings.WATCH_POLL_SECONDS
        end = time.monotonic() + seconds
        full = False
        try:
            while time.monotonic() < end:
                started = time.monotonic()
                done = self.measured()
                if done.lost:
                    return False
                if not done.experiments and not self.carry_on():
                    return False
                time.sleep(max(0.0, poll - (time.monotonic() - started)))
            full = True
        finally:
            # The streams stay open: a successor in this process goes on reading them (the
            # engine closes the ones nobody comes back for).
            self.known.clear()
            if not (full and going_on):
                self.release()
        return True

    def release(self) -> None:
        """Free the lease, once the completions under way are done: a successor must not find
        one and begin it again."""
        self.settle()
        self.holding = False
        services.release_watch(self.engine_id, self.owner)

    def settle(self) -> None:
        """Wait for the completions handed to finishers (a second or so each)."""
        concurrent.futures.wait(list(self.finishing.values()))
        self.finishing.clear()

    def carry_on(self) -> bool:
        """Nothing to watch: free the lease, then look once more. A submit that saw the lease
        held before it was freed committed its Running before, so this look finds it."""
        services.release_watch(self.engine_id, self.owner)
        return services.watched(self.engine_id).exists() and services.take_watch(self.engine_id, self.owner)

    def measured(self) -> Interval:
        queries = [0]

        def count(execute, sql, params, many, context):
            queries[0] += 1
            return execute(sql, params, many, context)

        started, calls = time.monotonic(), self.engine.calls()
        with connection.execute_wrapper(count):
            done = self.interval()
        if settings.WATCH_STATS:
            log.info(
                "watch engine=%s experiments=%d changes=%d docker_calls=%d queries=%d seconds=%.4f",
                self.engine_id,
                done.experiments,
                done.changes,
                self.engine.calls() - calls,
                queries[0],
                time.monotonic() - started,
            )
        return done

    def interval(self) -> Interval:
        if not services.renew_watch(self.engine_id, self.owner):
            return Interval(lost=True)
        rows = list(services.watched(self.engine_id).values_list("id", "current_step", "deadline_at"))
        done = Interval(experiments=len(rows))
        self.forget({row[0] for row in rows})
        self.load({row[0] for row in rows} - self.known.keys())
        try:
            states = self.engine.states({pk: w.handle for pk, w in self.known.items() if w.handle})
        except EngineError as exc:
            log.warning("engine %s did not report its experiments: %s", self.engine_id, exc)
            return done
        services.heartbeat_watched(self.engine_id, every=services.watch_lease_seconds() / 2)
        now = timezone.now()
        ended: dict[UUID, tuple[bool, int | None, str]] = {}
        handed = len(self.finishing)
        for experiment_id, step, deadline in rows:
            if experiment_id in self.finishing:
                continue
            outcome = decided(self.known[experiment_id].state, states.get(experiment_id, []))
            if step == StepName.COMPLETED:
                # Left half finished by a lost watcher: its outcome as the engine tells it now.
                self.hand_over(
                    experiment_id,
                    StepName.COMPLETED,
                    finish,
                    outcome or (False, None, "the workload stopped reporting"),
                )
            elif outcome is not None:
                ended[experiment_id] = outcome
            elif deadline and now >= deadline:
                self.hand_over(experiment_id, StepName.RUNNING, self.time_out)
            else:
                self.tell_waiting(experiment_id, states.get(experiment_id, []))
        begun = services.begin_completions(
            {pk: (StepStatus.SUCCEEDED if ok else StepStatus.FAILED, reason) for pk, (ok, _c, reason) in ended.items()}
        )
        for experiment_id in begun:
            self.hand_over(experiment_id, StepName.COMPLETED, finish, ended[experiment_id])
        done.changes = len(self.finishing) - handed
        self.follow_logs(sorted(pk for pk in self.known if pk not in self.finishing))
        return done

    def hand_over(self, experiment_id: UUID, step: str, work, *args) -> None:
        """Run `work(experiment id, engine, handle, state, *args)` on a finisher thread."""
        watched = self.known[experiment_id]
        COMPLETIONS.begin()
        self.finishing[experiment_id] = _FINISHERS.submit(
            COMPLETIONS.run,
            _finisher,
            time.monotonic(),
            self.engine_id,
            step,
            work,
            experiment_id,
            self.engine,
            watched.handle,
            watched.state,
            *args,
        )

    @staticmethod
    def time_out(experiment_id: UUID, engine, handle: dict, state: dict) -> None:
        engine.cancel(handle)
        engine.unfollow(handle)
        collect_logs(engine, experiment_id, handle, state, final=True)
        services.save_watch_state(experiment_id, state)  # the stop task must not read them again
        timeout = Experiment.objects.get(pk=experiment_id).typed_manifest.spec.timeout
        services.step_log(experiment_id, StepName.RUNNING, f"timeout of {timeout} s reached: workload stopped")
        services.fail_experiment(experiment_id, f"Timed out: spec.timeout of {timeout} s reached")

    def load(self, new: set[UUID]) -> None:
        """Handles and bookkeeping of experiments seen for the first time: one query for all."""
        if not new:
            return
        for experiment_id, handle, stored in Experiment.objects.filter(pk__in=new).values_list(
            "id", "handle", "watch_state"
        ):
            if not handle:
                # Submitted by a task that died before recording it: look the processes up.
                handle = self.engine.find(str(experiment_id)) or {}
                if handle:
                    services.record_handle(experiment_id, handle)
            processes = self.engine.processes(handle) if handle else []
            self.known[experiment_id] = Watched(handle, watch_state_of(stored, processes))

    def forget(self, keep: set[UUID]) -> None:
        """Experiments no longer watched (finished, cancelled): close their streams."""
        for experiment_id in [pk for pk in self.known if pk not in keep]:
            self.engine.unfollow(self.known.pop(experiment_id).handle or {})
        # Done completions of experiments no longer watched, also those a slice's end took out of
        # `known`: the task runs for as long as experiments do, so their futures would pile up.
        self.finishing = {pk: f for pk, f in self.finishing.items() if pk in keep or not f.done()}

    def tell_waiting(self, experiment_id: UUID, states: list[ProcessState]) -> None:
        """Why processes wait (a pod unschedulable for want of GPUs, an image that cannot be
        pulled), in the Running step log, once per new reason: a query only when one changed."""
        watched = self.known[experiment_id]
        state = watched.state
        reasons = {s.name: s.reason for s in states if s.phase == "pending" and s.reason}
        told = state.get("waiting", {})
        # How far held-back completions are (`completed 37/100`), for the experiment page.
        progress = self.engine.progress(watched.handle or {}, states)
        if reasons == told and progress == state.get("progress", ""):
            return
        for name, reason in sorted(reasons.items()):
            if told.get(name) != reason:
                services.step_log(experiment_id, StepName.RUNNING, f"{name} is waiting: {reason}")
        state["waiting"] = reasons
        state["progress"] = progress
        services.save_watch_state(experiment_id, state)

    def follow_logs(self, running: list[UUID]) -> None:
        if len(running) > LOG_VISITS:
            start = self.turn % len(running)
            running = (running[start:] + running[:start])[:LOG_VISITS]
            self.turn = start + LOG_VISITS
        for experiment_id in running:
            watched = self.known[experiment_id]
            try:
                grew = watched.handle and collect_logs(
                    self.engine, experiment_id, watched.handle, watched.state, follow=True
                )
            except EngineError as exc:  # read again next visit; the other experiments go on
                log.warning("reading the logs of experiment %s failed: %s", experiment_id, exc)
                continue
            if grew:
                services.save_watch_state(experiment_id, watched.state)


def _finisher(handed: float, engine_id: int, step: str, work, experiment_id: UUID, engine, *args) -> None:
    """One completion on a finisher thread: its own database connection, as a task's would be
    (checked before and released after, as Celery does around a task)."""
    close_old_connections()
    queries, calls, started = [0], engine.calls(), time.monotonic()

    def count(execute, sql, params, many, context):
        queries[0] += 1
        return execute(sql, params, many, context)

    try:
        with connection.execute_wrapper(count):
            work(experiment_id, engine, *args)
    except Exception as exc:  # one experiment's bug must not stop the watch of the others
        log.exception("finishing experiment %s failed", experiment_id)
        services.fail_experiment(experiment_id, f"Internal error during {step}: {type(exc).__name__}: {exc}")
    finally:
        if settings.WATCH_STATS:
            log.info(
                "watch finish engine=%s experiment=%s docker_calls=%d queries=%d waited=%.4f seconds=%.4f",
                engine_id,
                experiment_id,
                engine.calls() - calls,
                queries[0],
                started - handed,
                time.monotonic() - started,
            )
        close_old_connections()
