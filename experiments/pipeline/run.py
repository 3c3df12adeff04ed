"""Submitting and Running: start the workload on its engine, then watch it until it ends."""

import time
from datetime import timedelta

from django.conf import settings
from django.utils import timezone

from experiments import services
from experiments.engines import get_engine
from experiments.engines.base import Cancelled, EngineError
from experiments.limits import check_started
from experiments.logs import LogWriter
from experiments.models import Experiment, StepName
from experiments.pipeline.common import Liveness, enter, next_step
from experiments.pipeline.complete import collect_logs, decided, finish, watch_state_of
from experiments.workload import build_workload


def run_submit(experiment_id) -> None:
    experiment = enter(experiment_id, StepName.SUBMITTING)
    if experiment is None:
        return
    with LogWriter(experiment.pk, f"step:{StepName.SUBMITTING}") as writer:
        try:
            engine = get_engine(experiment.engine)
            too_many = (
                None if engine.holds_back_completions else check_started(experiment.typed_manifest, experiment.engine)
            )
            if too_many:
                raise EngineError(too_many)
            workload = build_workload(experiment, path_of=engine.volume_path)
            for warning in [*workload.warnings, *engine.warnings_for(workload)]:
                writer.line(f"warning: {warning}")
            writer.line(f"submitting the workload to engine {experiment.engine.name}")
            # Asked between two process creations: Cancel stops a 1000-process submit.
            handle = engine.submit(workload, log=writer.write, cancelled=Liveness(experiment.pk))
        except Cancelled:
            writer.line("cancelled")
            return  # the engine removed what it created; the stop task sweeps again
        except EngineError as exc:
            writer.line(str(exc))
            writer.flush()  # the reason is in the log before anyone sees Failed
            services.fail_experiment(experiment.pk, f"Submitting failed: {exc}")
            return
    deadline = timezone.now() + timedelta(seconds=workload.timeout) if workload.timeout else None
    state = watch_state_of({}, engine.processes(handle))
    # A cancel that raced the submission finds the handle, or the check below cleans up.
    if not services.record_submission(experiment.pk, handle, deadline, state) or not services.begin_step(
        experiment.pk, StepName.RUNNING
    ):
        engine.cancel(handle)
        engine.cleanup(handle)
        return
    next_step("watch", experiment.pk)


def run_watch(experiment_id) -> None:
    experiment = Experiment.objects.select_related("engine").filter(pk=experiment_id).first()
    if (
        not experiment
        or experiment.is_terminal
        or experiment.current_step not in (StepName.RUNNING, StepName.COMPLETED)
    ):
        return
    engine = get_engine(experiment.engine)
    handle = experiment.handle or engine.find(str(experiment.pk)) or {}
    if handle and not experiment.handle:
        services.record_handle(experiment.pk, handle)  # found again: later slices need not look
    processes = engine.processes(handle) if handle else []
    state = watch_state_of(experiment.watch_state, processes)
    if experiment.current_step == StepName.COMPLETED:
        # A lost task had already begun Completed: finish from what the engine reports.
        finish(experiment, engine, handle, state, engine.status(handle) if processes else [])
        return
    slice_end = time.monotonic() + settings.WATCH_SLICE_SECONDS
    cancelled = Liveness(experiment.pk, every=10)
    while time.monotonic() < slice_end:
        states = engine.status(handle) if processes else []
        if collect_logs(engine, experiment.pk, handle, state):
            services.save_watch_state(experiment.pk, state)
        if cancelled():
            return  # cancelled: the stop task removes the processes
        if decided(state, states) is not None:
            finish(experiment, engine, handle, state, states)
            return
        if experiment.deadline_at and timezone.now() >= experiment.deadline_at:
            engine.cancel(handle)
            collect_logs(engine, experiment.pk, handle, state, final=True)
            services.save_watch_state(experiment.pk, state)  # the stop task must not read them again
            timeout = experiment.typed_manifest.spec.timeout
            services.step_log(experiment.pk, StepName.RUNNING, f"timeout of {timeout} s reached: workload stopped")
            services.fail_experiment(experiment.pk, f"Timed out: spec.timeout of {timeout} s reached")
            return
        time.sleep(settings.WATCH_POLL_SECONDS)
    services.save_watch_state(experiment.pk, state, beat=True)
    next_step("watch", experiment.pk)
