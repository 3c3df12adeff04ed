"""Submitting: start the workload on its engine, then hand it to the engine's watcher."""

from datetime import timedelta

from django.utils import timezone

from experiments import services
from experiments.engines import get_engine
from experiments.engines.base import Cancelled, EngineError
from experiments.limits import check_started
from experiments.logs import LogWriter
from experiments.models import StepName
from experiments.pipeline.common import Liveness, enter
from experiments.pipeline.complete import watch_state_of
from experiments.workload import build_workload


def run_submit(experiment_id) -> None:
    experiment = enter(experiment_id, StepName.SUBMITTING)
    if experiment is None:
        return
    with LogWriter(experiment.pk, f"step:{StepName.SUBMITTING}") as writer:
        try:
            engine = get_engine(experiment.engine)
            # A submit that just began has no earlier attempt whose processes to remove first.
            engine.first_attempt = not experiment.resumed
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
    # The handle is recorded with the move into Running (one update, and the watcher never
    # sees a Running experiment without it); a cancel that came first finds neither, and the
    # check below removes what the engine made.
    submission = {"handle": handle, "deadline_at": deadline, "watch_state": state}
    if not services.begin_step(experiment.pk, StepName.RUNNING, fields=submission):
        engine.cancel(handle)
        engine.cleanup(handle)
        return
    services.ensure_watcher(experiment.engine_id)
