"""Repair what a crash left behind: resume the step of experiments whose task went silent, and
make sure every engine with running experiments has a watcher."""

from uuid import UUID

from django.conf import settings

from experiments import services
from experiments.models import WATCHED_STEPS, Experiment, StepName
from experiments.queue import next_step

RESUME = {
    StepName.WAITING: "clone",
    StepName.CLONING: "clone",
    StepName.BUILDING: "build",
    StepName.SUBMITTING: "submit",
}


def reconcile(stale_seconds: float | None = None) -> list[str]:
    """Re-enqueue the step of every active experiment whose owning task went silent (a killed
    worker, a lost message), and the watcher of every engine that lost its own. Returns the ids
    it moved on, as text: a report, read beside the ids the API and the webhooks answered with."""
    stale = services.stale_active(settings.RECONCILE_STALE_SECONDS if stale_seconds is None else stale_seconds)
    moved: list[UUID] = []
    slots: set[tuple] = set()
    rows = stale.exclude(current_step__in=WATCHED_STEPS).values_list(
        "id", "current_step", "waiting_reason", "project_id", "engine_id"
    )
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
    moved += resume_watchers(services.watch_lease_seconds() if stale_seconds is None else stale_seconds)
    for project_id, engine_id in slots:
        moved += services.start_waiting_experiments(project_id, engine_id)
    for experiment_id in services.expired_holds().values_list("id", flat=True):
        services.release_hold(experiment_id, reason="debug hold expired")
    return [str(experiment_id) for experiment_id in moved]


def resume_watchers(stale_seconds: float) -> list[UUID]:
    """Never a watch per experiment: the engine's watcher, enqueued where none holds a live
    lease (a twin is harmless). Its experiments are reported resumed when the watcher died
    holding the lease or never ran, or when their heartbeats are older than `stale_seconds`
    (a successor's message was lost); a hand-over between two slices passes quietly."""
    moved: list[UUID] = []
    engines = Experiment.objects.active().filter(current_step__in=WATCHED_STEPS).values_list("engine_id", flat=True)
    for engine_id in set(engines):
        gone = services.watcher_gone(engine_id)
        if not services.ensure_watcher(engine_id):
            continue
        resumed = services.watched(engine_id) if gone else services.stale_active(stale_seconds)
        rows = list(
            resumed.filter(engine_id=engine_id, current_step__in=WATCHED_STEPS).values_list("id", "current_step")
        )
        for experiment_id, current_step in rows:
            services.record_action(experiment_id, f"reconcile resumed {current_step}")
            moved.append(experiment_id)
        if rows:
            services.heartbeat_watched(engine_id, every=0)  # reported once, not every period
    return moved
