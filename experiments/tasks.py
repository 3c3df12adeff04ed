"""Thin tasks: take an id, call one pipeline service. Not acks_late: a step that dies with its
worker is resumed by reconcile instead of being redelivered as a twin of a still-running one."""

import functools
from collections.abc import Callable
from uuid import UUID

from celery import shared_task
from django.conf import settings

from experiments import archives, pipeline, queue, services
from experiments.models import Experiment

Step = Callable[[UUID], None]


def fails_on_crash(step: str) -> Callable[[Step], Step]:
    """A bug or an unreachable service must end the experiment with a reason, not leave it
    Processing until reconcile notices."""

    def wrap(func: Step) -> Step:
        @functools.wraps(func)
        def run(experiment_id: UUID) -> None:
            try:
                func(experiment_id)
            except Exception as exc:
                services.fail_experiment(experiment_id, f"Internal error during {step}: {type(exc).__name__}: {exc}")
                raise

        return run

    return wrap


def _run_chain(step: Step, experiment_id: UUID) -> None:
    """Run `step`, then the steps it chained (see queue.chain), in this task."""
    with queue.chain() as pending:
        step(experiment_id)
        while pending:
            STEPS[pending.pop(0)](experiment_id)


@fails_on_crash("Cloning")
def _clone(experiment_id: UUID) -> None:
    pipeline.run_clone(experiment_id)


@fails_on_crash("Building")
def _build(experiment_id: UUID) -> None:
    pipeline.run_build(experiment_id)


@fails_on_crash("Submitting")
def _submit(experiment_id: UUID) -> None:
    pipeline.run_submit(experiment_id)


STEPS: dict[str, Step] = {"clone": _clone, "build": _build, "submit": _submit}


# Thread-pool workers enforce no time limit; the limits bound a prefork worker's chain as a whole.
@shared_task(
    name="experiments.clone",
    time_limit=settings.CLONE_TIMEOUT_SECONDS * 2 + settings.BUILD_TIMEOUT_SECONDS + 900,
)
def clone(experiment_id: UUID) -> None:
    _run_chain(_clone, experiment_id)


@shared_task(name="experiments.build", time_limit=settings.BUILD_TIMEOUT_SECONDS + 900)
def build(experiment_id: UUID) -> None:
    _run_chain(_build, experiment_id)


@shared_task(name="experiments.submit", time_limit=600)
def submit(experiment_id: UUID) -> None:
    _run_chain(_submit, experiment_id)


# No time limit: the watch runs as long as experiments do (a prefork worker's limit would kill
# it mid-interval); the lease lets reconcile replace one that hangs.
@shared_task(name="experiments.watch_engine")
def watch_engine(engine_id: int) -> None:
    pipeline.watch_engine(engine_id)


@shared_task(name="experiments.watch", time_limit=60)
def watch(experiment_id: UUID) -> None:
    """A per-experiment watch queued before the upgrade: its engine's watcher takes it over."""
    engine_id = Experiment.objects.filter(pk=experiment_id).values_list("engine_id", flat=True).first()
    if engine_id is not None:
        services.ensure_watcher(engine_id)


@shared_task(name="experiments.stop", time_limit=600)
def stop(experiment_id: UUID) -> None:
    pipeline.stop(experiment_id)


@shared_task(name="experiments.reconcile", time_limit=300)
def reconcile() -> None:
    pipeline.reconcile()


@shared_task(name="experiments.sweep_archives", time_limit=600)
def sweep_archives() -> None:
    archives.sweep_orphan_archives()
