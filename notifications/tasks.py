"""Thin tasks on the notify queue (settings.CELERY_TASK_ROUTES): ids in, one service call. A
service that raises Later is sent again with a countdown, carrying its attempt number."""

from uuid import UUID

from celery import shared_task

from notifications import services
from notifications.services import Later


@shared_task(name="notifications.fan_out", time_limit=60)
def fan_out(experiment_id: str, event: str) -> None:
    services.experiment_changed(UUID(experiment_id), event)


@shared_task(name="notifications.post_status", time_limit=120)
def post_status(experiment_id: str, attempt: int) -> None:
    try:
        services.post_commit_status(UUID(experiment_id), attempt)
    except Later as later:
        services.enqueue("notifications.post_status", experiment_id, attempt + later.counts, countdown=later.seconds)


@shared_task(name="notifications.deliver", time_limit=120)
def deliver(delivery_id: str) -> None:
    try:
        services.deliver(UUID(delivery_id))
    except Later as later:
        # The attempt count lives on the delivery row.
        services.enqueue("notifications.deliver", delivery_id, countdown=later.seconds)


@shared_task(name="notifications.send_email", time_limit=120)
def send_email(experiment_id: str, event: str, user_id: int, attempt: int) -> None:
    try:
        services.send_email(UUID(experiment_id), event, user_id, attempt)
    except Later as later:
        services.enqueue(
            "notifications.send_email", experiment_id, event, user_id, attempt + 1, countdown=later.seconds
        )
