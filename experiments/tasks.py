"""Thin tasks: take an id, call one pipeline service. Not acks_late: a step that dies with its
worker is resumed by reconcile instead of being redelivered as a twin of a still-running one."""

import functools

from celery import shared_task
from django.conf import settings

from experiments import archives, pipeline, services


def fails_on_crash(step: str):
    """A bug or an unreachable service must end the experiment with a reason, not leave it
    Processing until reconcile notices."""

    def wrap(func):
        @functools.wraps(func)
        def run(experiment_id: str) -> None:
            try:
                func(experiment_id)
            except Exception as exc:
                services.fail_experiment(experiment_id, f"Internal error during {step}: {type(exc).__name__}: {exc}")
                raise

        return run

    return wrap


@shared_task(name="experiments.clone", time_limit=settings.CLONE_TIMEOUT_SECONDS * 2 + 60)
@fails_on_crash("Cloning")
def clone(experiment_id: str) -> None:
    pipeline.run_clone(experiment_id)


@shared_task(name="experiments.build", time_limit=settings.BUILD_TIMEOUT_SECONDS + 300)
@fails_on_crash("Building")
def build(experiment_id: str) -> None:
    pipeline.run_build(experiment_id)


@shared_task(name="experiments.submit", time_limit=600)
@fails_on_crash("Submitting")
def submit(experiment_id: str) -> None:
    pipeline.run_submit(experiment_id)


@shared_task(name="experiments.watch", time_limit=settings.WATCH_SLICE_SECONDS + 600)
@fails_on_crash("Running")
def watch(experiment_id: str) -> None:
    pipeline.run_watch(experiment_id)


@shared_task(name="experiments.stop", time_limit=600)
def stop(experiment_id: str) -> None:
    pipeline.stop(experiment_id)


@shared_task(name="experiments.reconcile", time_limit=300)
def reconcile() -> None:
    pipeline.reconcile()


@shared_task(name="experiments.sweep_archives", time_limit=600)
def sweep_archives() -> None:
    archives.sweep_orphan_archives()
