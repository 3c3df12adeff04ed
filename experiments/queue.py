"""The one way work reaches Celery: after commit, an experiment id only, by task name.

Tasks are sent by name so that this module imports no task: services, the pipeline and the tasks
all import it, and it imports none of them (no import circle, no import inside a function)."""

import base64
import contextvars
import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from uuid import UUID, uuid4

from django.db import transaction
from kombu.exceptions import OperationalError as KombuOperationalError
from redis.exceptions import ConnectionError as RedisConnectionError

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


class _Recorder:
    """The kept Redis client, noting what a send pushes (the queue's key and the message)."""

    def __init__(self, client) -> None:
        self.client, self.pushed = client, []

    def lpush(self, key, *values):
        self.pushed.append((key, values))
        return self.client.lpush(key, *values)

    def __getattr__(self, name: str):
        return getattr(self.client, name)


class _Template:
    """The message Celery sent for a task of one name, with its ids taken out: the next ones of
    that name are this text with new ids, pushed with the kept client. Celery's send_task and
    kombu's publish cost ~0.6 ms of CPU per message, a sixth of a webhook delivery's (issue 16);
    this, ~0.2 ms. Celery stays the author of the format: the template is its own last message,
    used only if filling it in with that message's ids gives that very message back. Its
    reply_to stays that of the thread that sent it: only RPC results would use it, and tasks
    keep no result (CELERY_TASK_IGNORE_RESULT)."""

    def __init__(self, key, message: str, task_id: str, tag: str, experiment_id: UUID) -> None:
        envelope = json.loads(message)
        self.key = key
        self.body = base64.b64decode(envelope["body"]).decode().replace(experiment_id.hex, "{hex}")
        self.text = (
            message.replace("{", "{{")
            .replace("}", "}}")
            .replace(envelope["body"], "{body}")
            .replace(task_id, "{task_id}")
            .replace(tag, "{tag}")
            .replace(str(experiment_id), "{experiment_id}")
        )
        self.usable = self.render(experiment_id, task_id, tag) == message and experiment_id.hex not in self.text

    def render(self, experiment_id: UUID, task_id: str, tag: str) -> str:
        body = base64.b64encode(self.body.replace("{hex}", experiment_id.hex).encode()).decode()
        return self.text.format(body=body, task_id=task_id, tag=tag, experiment_id=experiment_id)


def _send_from_template(channel, name: str, experiment_id: UUID | int) -> bool:
    """Send as Celery sent the last task of this name on this channel, if it may (see _Template)."""
    template = getattr(channel, "_aichor_templates", {}).get(name)
    if template is None or not isinstance(experiment_id, UUID):
        return False
    try:
        channel._aichor_client.lpush(template.key, template.render(experiment_id, str(uuid4()), str(uuid4())))
    except RedisConnectionError as exc:  # as kombu's errors are: the broker is unreachable
        raise KombuOperationalError(str(exc)) from exc
    return True


def _learn(channel, name: str, experiment_id: UUID | int, recorder: _Recorder) -> None:
    """Keep the message Celery just sent as the template of this task name (see _Template)."""
    if not isinstance(experiment_id, UUID) or len(recorder.pushed) != 1 or len(recorder.pushed[0][1]) != 1:
        return
    key, (message,) = recorder.pushed[0]
    envelope = json.loads(message)
    task_id, tag = envelope["headers"]["id"], envelope["properties"]["delivery_tag"]
    template = _Template(key, message, task_id, tag, experiment_id)
    if template.usable:
        channel.__dict__.setdefault("_aichor_templates", {})[name] = template


def connect() -> None:
    """Connect a producer of the pool to the broker, sending nothing: the web server does it as it
    starts, so that its first task does not wait for it (aichor.asgi)."""
    if not app.conf.task_always_eager:
        with app.producer_or_acquire() as producer:
            producer.connection.ensure_connection(max_retries=1)
            _keep_client(producer.connection.default_channel)


def _send(name: str, experiment_id: UUID | int) -> None:
    # The id travels as a UUID: kombu's JSON keeps its type, so the task gets what was sent.
    if not app.conf.task_always_eager:
        with app.producer_or_acquire() as producer:
            # The pooled connection's channel, once a first send made it (reading .channel
            # would connect, and connecting is send_task's, with its retries and errors).
            channel = getattr(producer.__connection__, "_default_channel", None)
            if channel is not None and _send_from_template(channel, name, experiment_id):
                return
            kept = getattr(channel, "_aichor_client", None)
            if kept is None:
                app.send_task(name, args=[experiment_id], producer=producer)
                # Once sent, the channel exists (_channel).
                _keep_client(producer._channel)
                return
            # One thread at a time has this producer, and so its channel.
            recorder = _Recorder(kept)
            channel.conn_or_acquire = lambda client=None: nullcontext(client or recorder)
            try:
                app.send_task(name, args=[experiment_id], producer=producer)
            finally:
                channel.conn_or_acquire = lambda client=None: nullcontext(client or kept)
            _learn(channel, name, experiment_id, recorder)
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
