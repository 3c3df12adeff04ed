"""Completed: the outcome from the decisive processes, the final logs, a debug hold, and
removing what an ended experiment left on its engine."""

import itertools
import shutil
import threading

from experiments import services
from experiments.engines import get_engine
from experiments.engines.base import EngineError, ProcessInfo
from experiments.logs import FLUSH_BYTES, LogWriter
from experiments.models import Experiment, StepName, StepStatus
from experiments.pipeline.common import log, workdir_of
from experiments.queue import enqueue

# How long a removal (the stop task) waits for the completions under way in its process.
REMOVAL_WAIT_SECONDS = 60.0


class Completions:
    """The completions handed to the watcher's finishers in this process and not yet done.
    Removing an ended experiment's containers waits until there are none (at most
    REMOVAL_WAIT_SECONDS): in a wave of exits a Docker daemon is short of CPU, and every
    removal it serves makes the final log read of the next exit wait. 500 exits in 41 s with
    the daemon on one core: 3-4 completions a second beside the removals, 7-8 with the removals
    after them. A cancel's stop kills the processes first, without waiting."""

    def __init__(self) -> None:
        self.count = 0
        self._changed = threading.Condition()
        self._here = threading.local()

    def begin(self) -> None:
        """A completion handed over; `run` ends it."""
        with self._changed:
            self.count += 1

    def run(self, work, *args) -> None:
        self._here.running = True
        try:
            work(*args)
        finally:
            self._here.running = False
            with self._changed:
                self.count -= 1
                if not self.count:
                    self._changed.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        if getattr(self._here, "running", False):
            return False  # a stop run inline by a completion (AICHOR_CELERY_EAGER) must not wait for itself
        with self._changed:
            return self._changed.wait_for(lambda: not self.count, timeout)


COMPLETIONS = Completions()

# At most this many engine reads per process in one visit of the watcher: a workload printing
# faster than that is caught up with later, never at the cost of noticing exits.
LOG_PIECES_PER_POLL = 8


def watch_state_of(stored: dict | None, processes: list[ProcessInfo]) -> dict:
    """The watch's bookkeeping (Experiment.watch_state): log cursors by process, processes whose
    final logs are stored, and the decisive processes (the engine's say, when none is stored)."""
    state = {"cursors": {}, "logs_collected": [], **(stored or {})}
    state.setdefault("decisive", [p.name for p in processes if p.decisive])
    return state


def collect_logs(engine, experiment_id, handle: dict, state: dict, final: bool = False, follow: bool = False) -> bool:
    """Append new output of every process to its stored log; True when anything was new.
    `follow`: the watcher's visits, through the streams the engine keeps open between them.

    Engines return a bounded piece per call (a workload printing gigabytes must not take the
    worker's memory with it), so a burst is read in several calls: while pieces come big during
    a watch (a few per poll, so status and cancel stay prompt), and until nothing is left once
    the process has exited; then final_logs adds an unfinished last line. A process whose final
    logs were taken is never read again (the stop task and a debug hold's release come later)."""
    cursors, collected = state["cursors"], state["logs_collected"]
    grew = False
    for name in [p.name for p in engine.processes(handle)] if handle else []:
        if name in collected:
            continue
        writer = None  # opened on the first new output: a quiet poll costs no query
        # Final: the log itself, never a followed stream (the daemon may close one before an
        # exited process's last output).
        read = engine.follow if follow and not final else engine.logs
        try:
            for _piece in itertools.count() if final else range(LOG_PIECES_PER_POLL):
                lines, cursors[name] = read(handle, name, cursors.get(name))
                text = "".join(lines)
                del lines
                if not text:
                    break
                writer = writer or LogWriter(experiment_id, f"process:{name}")
                writer.write(text)
                if not final and len(text) < FLUSH_BYTES:
                    break
            if final:
                rest = "".join(engine.final_logs(handle, name, cursors.get(name)))
                if rest:
                    writer = writer or LogWriter(experiment_id, f"process:{name}")
                    writer.write(rest)
                collected.append(name)
        finally:
            if writer:
                writer.close()
                grew = True
    return grew


def decided(state: dict, states) -> tuple[bool, int | None, str] | None:
    """(ok, exit code, reason) once the decisive processes tell, else None."""
    by_name = {s.name: s for s in states}
    decisive = state.get("decisive") or list(by_name)
    if not decisive or not by_name:
        return False, None, "the engine has no record of the workload"
    for name in decisive:
        state = by_name.get(name)
        if state is None or state.phase == "missing":
            return False, None, f"{name} disappeared from the engine"
        if state.phase == "exited" and state.exit_code != 0:
            return False, state.exit_code, f"{name} exited with code {state.exit_code}"
    if all(by_name[name].phase == "exited" for name in decisive):
        return True, 0, ""
    return None


def finish(experiment_id, engine, handle: dict, state: dict, outcome: tuple[bool, int | None, str]) -> None:
    """The rest of Completed, for an experiment already in it (services.begin_completions, or
    a Completed one a lost watcher left): the final logs, a debug hold, the outcome. Removing
    the processes is the stop task's (on the watch queue), so a wave of exits never waits for
    Docker's removals."""
    ok, exit_code, reason = outcome
    # Only a failure reads the manifest: an exit that succeeded costs no read of the row.
    manifest = None if ok else Experiment.objects.get(pk=experiment_id).typed_manifest
    hold = None if ok or manifest is None else manifest.spec.debug.hold_on_failure
    if handle and engine.processes(handle):
        if not ok and not hold:
            engine.cancel(handle)  # fail fast: the other ranks would wait for the dead one forever
        engine.unfollow(handle)
        collect_logs(engine, experiment_id, handle, state, final=True)
        if hold:
            services.save_watch_state(experiment_id, state)  # the stop task must not read them again
            # After the final logs: the held handle points at keep-alive siblings with no output.
            try:
                handle = engine.hold(handle, hold)
            except EngineError as exc:
                services.step_log(experiment_id, StepName.COMPLETED, f"debug hold not possible: {exc}")
                hold = None
                engine.cancel(handle)
            else:
                services.record_handle(experiment_id, handle)
    services.step_log(experiment_id, StepName.COMPLETED, "logs collected" + (f"; {reason}" if reason else ""))
    if ok:
        services.finish_experiment(experiment_id, "Succeeded", exit_code=exit_code, watch_state=state)
    else:
        services.finish_experiment(
            experiment_id,
            "Failed",
            reason=reason,
            exit_code=exit_code,
            step_status=StepStatus.SUCCEEDED,
            watch_state=state,
        )
        if hold and services.hold_for_debugging(experiment_id, hold):
            services.step_log(experiment_id, StepName.COMPLETED, f"spec.debug.holdOnFailure: processes kept {hold} s")
    enqueue("stop", experiment_id)


def stop(experiment_id) -> None:
    """Remove what an ended experiment left on its engine, and its scratch folder."""
    experiment = Experiment.objects.select_related("engine").filter(pk=experiment_id).first()
    if not experiment or not experiment.is_terminal or experiment.is_held:
        return  # a held experiment is stopped again by release_hold
    try:
        engine = get_engine(experiment.engine)
        handle = experiment.handle or engine.find(str(experiment.pk))
        has_processes = bool(handle and engine.processes(handle))
        if has_processes:
            engine.cancel(handle)  # a cancel stops the processes at once; their removal can wait
            collect_logs(engine, experiment.pk, handle, watch_state_of(experiment.watch_state, []), final=True)
        COMPLETIONS.wait_idle(REMOVAL_WAIT_SECONDS)
        if has_processes:
            engine.cleanup(handle)
        # Containers a racing submit created after the handle was read.
        engine.cleanup_experiment(str(experiment.pk))
    except EngineError as exc:
        log.warning("could not clean up experiment %s: %s", experiment.pk, exc)
    shutil.rmtree(workdir_of(experiment.pk), ignore_errors=True)
