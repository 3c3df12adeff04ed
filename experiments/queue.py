"""The one way work reaches Celery: after commit, an experiment id only, by task name.

Tasks are sent by name so that this module imports no task: services, the pipeline and the tasks
all import it, and it imports none of them (no import circle, no import inside a function)."""

import contextvars
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from uuid import UUID

from django.db import transaction
from kombu.exceptions import OperationalError as KombuOperationalError

from aichor.celery import app

log = logging.getLogger(__name__)


class _BrokerOutage:
    """Tasks the broker refused. What they were for is committed already, and reconcile's stale
    check enqueues it again later; so the request that caused them still succeeds (202, see
    refused), and the outage is logged once a minute, not once per request."""

    LOG_EVERY = 60.0
    REMEMBER = 1000

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last_log: float | None = None
        self._refused: OrderedDict[UUID, None] = OrderedDict()

    def note(self, task_name: str, experiment_id: UUID, exc: Exception) -> None:
        with self._lock:
            self._refused[experiment_id] = None
            while len(self._refused) > self.REMEMBER:
                self._refused.popitem(last=False)
        self.report(f"{task_name} of experiment {experiment_id} waits for reconcile", exc)

    def report(self, consequence: str, exc: Exception) -> None:
        now = time.monotonic()
        with self._lock:
            quiet = self._last_log is not None and now - self._last_log < self.LOG_EVERY
            if not quiet:
                self._last_log = now
        if not quiet:
            log.error(
                "the task queue is unreachable (%s: %s); %s (further failures are logged at most once a minute)",
                type(exc).__name__,
                exc,
                consequence,
            )

    def take(self, experiment_id: UUID) -> bool:
        with self._lock:
            if experiment_id not in self._refused:
                return False
            del self._refused[experiment_id]
            return True


_broker_outage = _BrokerOutage()


def refused(experiment_id: UUID) -> bool:
    """Whether the broker refused this experiment's task, just now in this process; asking
    forgets it. Enqueueing happens on commit, so ask after the service call returned."""
    return _broker_outage.take(experiment_id)


def report_refused(consequence: str, exc: Exception) -> None:
    """A task of another app the broker refused: logged under the same once-a-minute rule."""
    _broker_outage.report(consequence, exc)


def enqueue(task_name: str, experiment_id: UUID | int) -> None:
    """Send the task `experiments.<task_name>` once the current transaction commits (at once
    outside one): a worker must never look for a row it cannot see yet. The id is an
    experiment's, or an engine's for its watcher (watch_engine). Which queue a task goes to is
    settings.CELERY_TASK_ROUTES'."""

    def send() -> None:
        try:
            _send(f"experiments.{task_name}", experiment_id)
        except KombuOperationalError as exc:  # the broker is unreachable (after kombu's retries)
            _broker_outage.note(task_name, experiment_id, exc)

    transaction.on_commit(send)


def _keep_client(channel) -> None:
    """Have a Redis channel of kombu publish with one Redis client, kept: by default it builds a
    new client for every message, a third of a task's sending CPU (issue 16). The channel is its
    pooled connection's, and lives as long; a Redis client is thread-safe and reconnects by
    itself. Other transports (the filesystem broker) are left as they are."""
    if getattr(channel, "_aichor_client", None) is not None or not hasattr(channel, "_create_client"):
        return
    kept = channel._aichor_client = channel._create_client()
    # Named as kombu's own parameter: its _delete() passes client= by keyword.
    channel.conn_or_acquire = lambda client=None: nullcontext(client or kept)


def _send(name: str, experiment_id: UUID | int) -> None:
    # The id travels as a UUID: kombu's JSON keeps its type, so the task gets what was sent.
    if not app.conf.task_always_eager:
        with app.producer_or_acquire() as producer:
            app.send_task(name, args=[experiment_id], producer=producer)
            # Once sent, the channel exists (_channel: reading .channel would connect, and
            # connecting is send_task's, with its retries and errors).
            _keep_client(producer._channel)
        return
    # AICHOR_CELERY_EAGER runs tasks inline, which send_task ignores: that needs the task object,
    # registered only once the apps' task modules are loaded (a web process never loads them).
    if name not in app.tasks:
        app.autodiscover_tasks(force=True)
    app.tasks[name].apply_async(args=[experiment_id])


# Clone, build and submit follow each other in the task that began them: a hop through the
# broker costs ~15 ms, and two of them were a fifth of the time from a push to a started
# container. Watching is not chained: the engine's watcher has its own queue. A
# step resumed by reconcile arrives as a task of its own, as before.
CHAINED = ("build", "submit")
_chained: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar("aichor_chained", default=None)


@contextmanager
def chain() -> Iterator[list[str]]:
    """While it is open, next_step puts build and submit on the list it yields, for the current
    task to run after its step, instead of sending them through the broker."""
    pending: list[str] = []
    token = _chained.set(pending)
    try:
        yield pending
    finally:
        _chained.reset(token)


def next_step(task_name: str, experiment_id: UUID) -> None:
    """Hand the experiment over to its next step: in this task when chained, else as a task."""
    pending = _chained.get()
    if pending is not None and task_name in CHAINED:
        pending.append(task_name)
        return
    enqueue(task_name, experiment_id)
