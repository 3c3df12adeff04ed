from uuid import UUID

from notifications.services import anything_configured, enqueue


def on_experiment_changed(sender, *, experiment_id: UUID, event: str, **kwargs) -> None:
    """Runs in the pipeline's task, after its commit: only a message to the notify queue, so a
    Git host or receiver that is slow or down never touches the experiment."""
    if anything_configured():
        enqueue("notifications.fan_out", str(experiment_id), event)
