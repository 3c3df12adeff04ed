"""Running: one watcher per engine follows every experiment running there. Each interval it asks
the engine for all their states in one batched call, reads the experiments in one query, beats
their heartbeats in one update, and acts only on what changed (an exit, a timeout); logs are
followed through open streams, a bounded number of experiments per interval. So an interval
costs about the same for a thousand running experiments as for ten.

A lease (EngineWatch) keeps it to one watcher per engine; the task runs for a slice, frees the
lease and enqueues its successor, or ends when nothing is left to watch (run_submit enqueues
it again)."""

import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass
from datetime import datetime
from uuid import UUID

from django.conf import settings
from django.db import connection
from django.utils import timezone

from experiments import services
from experiments.engines import get_engine
from experiments.engines.base import EngineError, ProcessState
from experiments.models import Experiment, StepName
from experiments.pipeline.complete import collect_logs, decided, finish, watch_state_of
from experiments.queue import enqueue
from projects.models import Engine as EngineModel

log = logging.getLogger("experiments.watcher")

# Experiments whose new output one interval reads, in turn: the log work of an interval is
# bounded whatever the number running (each is visited every N / LOG_VISITS intervals).
LOG_VISITS = 32


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
    """The watch_engine task: watch for a slice, then hand over to a fresh task."""
    engine_model = EngineModel.objects.filter(pk=engine_id).first()
    if engine_model is None:
        return
    try:
        watcher = Watcher(engine_model)
    except EngineError as exc:
        log.warning("cannot watch engine %s: %s", engine_id, exc)
        return
    if watcher.run(settings.WATCH_SLICE_SECONDS):
        enqueue("watch_engine", engine_id)


def watch_once(engine_model: EngineModel) -> bool:
    """One interval of the engine's watcher, now, unless a watcher holds the lease (tests, a
    shell); False when one does."""
    watcher = Watcher(engine_model)
    if not services.take_watch(watcher.engine_id, watcher.owner):
        return False
    try:
        watcher.interval()
    finally:
        services.release_watch(watcher.engine_id, watcher.owner)
    return True


class Watcher:
    def __init__(self, engine_model: EngineModel) -> None:
        self.engine_id = engine_model.pk
        self.engine = get_engine(engine_model)
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.known: dict[UUID, Watched] = {}
        self.turn = 0

    def run(self, seconds: float) -> bool:
        """Watch until the slice ends; True when a successor must take over."""
        if not services.take_watch(self.engine_id, self.owner):
            return False  # a live watcher has it
        poll = settings.WATCH_POLL_SECONDS
        end = time.monotonic() + seconds
        try:
            while time.monotonic() < end:
                started = time.monotonic()
                done = self.measured()
                if done.lost:
                    return False
                if not done.experiments and not self.carry_on():
                    return False
                time.sleep(max(0.0, poll - (time.monotonic() - started)))
        finally:
            # The streams stay open: a successor in this process goes on reading them (the
            # engine closes the ones nobody comes back for).
            self.known.clear()
            services.release_watch(self.engine_id, self.owner)
        return True

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
        for experiment_id, step, deadline in rows:
            if self.act(experiment_id, step, deadline, states.get(experiment_id, []), now):
                done.changes += 1
        self.follow_logs(sorted(self.known))
        return done

    def act(self, experiment_id: UUID, step: str, deadline: datetime | None, states: list[ProcessState], now) -> bool:
        """Hand an experiment that changed to its service; True when it did."""
        watched = self.known[experiment_id]
        try:
            if step == StepName.COMPLETED or decided(watched.state, states) is not None:
                self.known.pop(experiment_id)
                experiment = Experiment.objects.select_related("engine").get(pk=experiment_id)
                finish(experiment, self.engine, watched.handle, watched.state, states)
                return True
            if deadline and now >= deadline:
                self.known.pop(experiment_id)
                self.time_out(experiment_id, watched)
                return True
        except Exception as exc:  # one experiment's bug must not stop the watch of the others
            log.exception("watching experiment %s failed", experiment_id)
            services.fail_experiment(experiment_id, f"Internal error during Running: {type(exc).__name__}: {exc}")
            return True
        return False

    def time_out(self, experiment_id: UUID, watched: Watched) -> None:
        self.engine.cancel(watched.handle)
        self.engine.unfollow(watched.handle)
        collect_logs(self.engine, experiment_id, watched.handle, watched.state, final=True)
        services.save_watch_state(experiment_id, watched.state)  # the stop task must not read them again
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
        """Experiments no longer watched (cancelled, finished elsewhere): close their streams."""
        for experiment_id in [pk for pk in self.known if pk not in keep]:
            self.engine.unfollow(self.known.pop(experiment_id).handle or {})

    def follow_logs(self, running: list[UUID]) -> None:
        if len(running) > LOG_VISITS:
            start = self.turn % len(running)
            running = (running[start:] + running[:start])[:LOG_VISITS]
            self.turn = start + LOG_VISITS
        for experiment_id in running:
            watched = self.known[experiment_id]
            if watched.handle and collect_logs(self.engine, experiment_id, watched.handle, watched.state, follow=True):
                services.save_watch_state(experiment_id, watched.state)
