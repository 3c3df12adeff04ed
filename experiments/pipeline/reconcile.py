"""Repair what a crash left behind: resume the step of experiments whose task went silent."""

from uuid import UUID

from django.conf import settings

from experiments import services
from experiments.models import StepName
from experiments.queue import next_step

RESUME = {
    StepName.WAITING: "clone",
    StepName.CLONING: "clone",
    StepName.BUILDING: "build",
    StepName.SUBMITTING: "submit",
    StepName.RUNNING: "watch",
    StepName.COMPLETED: "watch",
}


def reconcile(stale_seconds: float | None = None) -> list[str]:
    """Re-enqueue the step of every active experiment whose owning task went silent (a killed
    worker, a lost message). Returns the ids it moved on, as text: a report, read beside the ids
    the API and the webhooks answered with."""
    stale = services.stale_active(settings.RECONCILE_STALE_SECONDS if stale_seconds is None else stale_seconds)
    moved: list[UUID] = []
    slots: set[tuple] = set()
    rows = stale.values_list("id", "current_step", "waiting_reason", "project_id", "engine_id")
    for experiment_id, current_step, waiting_reason, project_id, engine_id in rows:
        services.heartbeat(experiment_id)
        if current_step == StepName.WAITING and waiting_reason:
            # Its task ran and found no slot: nothing was lost. Re-check the slots of its
            # (project, engine) quietly: an event every period would bury the timeline.
            slots.add((project_id, engine_id))
            continue
        services.record_action(experiment_id, f"reconcile resumed {current_step}")
        next_step(RESUME[current_step], experiment_id)
        moved.append(experiment_id)
    for project_id, engine_id in slots:
        moved += services.start_waiting_experiments(project_id, engine_id)
    for experiment_id in services.expired_holds().values_list("id", flat=True):
        services.release_hold(experiment_id, reason="debug hold expired")
    return [str(experiment_id) for experiment_id in moved]
