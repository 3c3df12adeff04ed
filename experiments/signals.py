"""What other apps may learn of an experiment without experiments importing them: the
notifications app connects to `experiment_changed` in its AppConfig.ready()."""

from uuid import UUID

from django.db import transaction
from django.dispatch import Signal

# Sent with experiment_id (a UUID) and event, one of EVENTS, once the change is committed.
experiment_changed = Signal()

CREATED = "created"
RUNNING = "running"
SUCCEEDED = "succeeded"
FAILED = "failed"
CANCELLED = "cancelled"
EVENTS = (CREATED, RUNNING, SUCCEEDED, FAILED, CANCELLED)
# Keyed by the Status values (experiments.models imports nothing from here, nor this from it).
OF_TERMINAL_STATUS = {"Succeeded": SUCCEEDED, "Failed": FAILED, "Cancelled": CANCELLED}


def announce(experiment_id: UUID, event: str) -> None:
    """Send experiment_changed after the current transaction commits (at once outside one).
    send_robust and robust=True: a receiver that fails never fails the service that changed
    the experiment, nor the other on-commit work of its transaction."""
    transaction.on_commit(
        lambda: experiment_changed.send_robust(sender=None, experiment_id=experiment_id, event=event), robust=True
    )
