"""Thin tasks: take an id, call one pipeline service. Not acks_late: a step that dies with its
worker is resumed by reconcile instead of being redelivered as a twin of a still-running one."""

from celery import shared_task
from django.conf import settings

from experiments import pipeline


@shared_task(name="experiments.clone", time_limit=settings.CLONE_TIMEOUT_SECONDS * 2 + 60)
def clone(experiment_id: str) -> None:
    pipeline.run_clone(experiment_id)


@shared_task(name="experiments.build", time_limit=settings.BUILD_TIMEOUT_SECONDS + 300)
def build(experiment_id: str) -> None:
    pipeline.run_build(experiment_id)


@shared_task(name="experiments.submit", time_limit=600)
def submit(experiment_id: str) -> None:
    pipeline.run_submit(experiment_id)


@shared_task(name="experiments.watch", time_limit=settings.WATCH_SLICE_SECONDS + 600)
def watch(experiment_id: str) -> None:
    pipeline.run_watch(experiment_id)


@shared_task(name="experiments.stop", time_limit=600)
def stop(experiment_id: str) -> None:
    pipeline.stop(experiment_id)


@shared_task(name="experiments.reconcile", time_limit=300)
def reconcile() -> None:
    pipeline.reconcile()
