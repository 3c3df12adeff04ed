"""A burst of webhook deliveries through the ASGI entry point (aichor.asgi), as uvicorn hands them
over: deliveries are served in parallel, and copies of one delivery in flight at once still create
exactly one experiment (issue 16)."""

import asyncio
import base64
import json
import os
import threading
import uuid

import pytest
from channels.testing import HttpCommunicator
from kombu.utils import json as kombu_json

from aichor.asgi import application
from experiments import services
from experiments.models import STEP_ORDER, Experiment, WebhookDelivery
from tests.helpers import github_signature, unavailable

# The deliveries run on the server's threads, each with its own database connection.
pytestmark = pytest.mark.django_db(transaction=True)


def push_body(project, sha: str, message: str, padding: str = "") -> bytes:
    payload = {
        "ref": "refs/heads/main",
        "after": sha,
        "head_commit": {"id": sha, "message": message, "author": {"username": "researcher"}},
        "repository": {"clone_url": project.repo_clone_url},
    }
    return (json.dumps(payload) + padding).encode()


async def deliver(project, body: bytes, delivery: str) -> dict:
    headers = [
        (b"host", b"testserver"),
        (b"content-type", b"application/json"),
        (b"x-github-event", b"push"),
        (b"x-github-delivery", delivery.encode()),
        (b"x-hub-signature-256", github_signature(body).encode()),
    ]
    communicator = HttpCommunicator(application, "POST", f"/webhooks/github/{project.slug}/", body, headers)
    return await communicator.get_response(timeout=30)


def test_a_slow_delivery_does_not_hold_up_the_next(project, monkeypatch):
    # Before, every delivery ran on one shared thread: the second waited for the first to finish.
    release = threading.Event()
    create = services.create_experiment_from_push

    def slow_for_the_first(**kwargs):
        if kwargs["message"].endswith("slow"):
            assert release.wait(20), "the test never released the slow delivery"
        return create(**kwargs)

    monkeypatch.setattr(services, "create_experiment_from_push", slow_for_the_first)

    async def burst() -> tuple[dict, dict]:
        slow = asyncio.create_task(deliver(project, push_body(project, "a" * 40, "aichor[train.yaml]: slow"), "d-slow"))
        fast = await deliver(project, push_body(project, "b" * 40, "aichor[train.yaml]: fast"), "d-fast")
        assert not slow.done()
        release.set()
        return await slow, fast

    try:
        slow, fast = asyncio.run(burst())
    finally:
        release.set()
    assert (fast["status"], slow["status"]) == (201, 201), (fast["body"], slow["body"])
    assert sorted(Experiment.objects.filter(project=project).values_list("message", flat=True)) == [
        "aichor[train.yaml]: fast",
        "aichor[train.yaml]: slow",
    ]


def test_copies_of_a_delivery_in_flight_at_once_create_one_experiment(project):
    # GitHub's redelivery resends the body; a replay may come with another id, or the same id
    # with another body: every one is one experiment, however the copies interleave.
    body = push_body(project, "c" * 40, "aichor[train.yaml]: once")
    same_id = str(uuid.uuid4())

    async def copies() -> list[dict]:
        sends = [deliver(project, body, same_id) for _ in range(4)]
        sends += [deliver(project, body, str(uuid.uuid4())) for _ in range(4)]
        sends += [
            deliver(project, push_body(project, "c" * 40, "aichor[train.yaml]: once", " " * n), same_id)
            for n in range(1, 5)
        ]
        return await asyncio.gather(*sends)

    answers = asyncio.run(copies())
    statuses = sorted(answer["status"] for answer in answers)
    assert statuses == [200] * 11 + [201], [answer["body"] for answer in answers]
    created = json.loads(next(answer["body"] for answer in answers if answer["status"] == 201))
    assert list(Experiment.objects.filter(project=project).values_list("pk", flat=True)) == [
        uuid.UUID(created["experiment"])
    ]
    assert WebhookDelivery.objects.filter(project=project, experiment__isnull=False).count() == 1


@pytest.fixture
def redis_broker():
    """The Celery app publishing to a real Redis, as in production (tests use an in-memory broker):
    kombu's Redis channel is where a client was built per message."""
    import redis
    from django.conf import settings

    from aichor.celery import app

    url = os.environ.get("AICHOR_TEST_REDIS_URL", "redis://127.0.0.1:6379/14")
    client = redis.Redis.from_url(url, socket_connect_timeout=2)
    try:
        client.ping()
    except redis.ConnectionError as exc:
        unavailable(f"no Redis at {url}: {exc}")
    saved = app.conf.broker_url

    def switch(to: str) -> None:
        # The pools are built from broker_url once: forget them (as tests/conftest.py's BrokerDown).
        app._pool = None
        app.amqp._producer_pool = None
        app.conf.broker_url = to

    switch(url)
    yield client, settings.PIPELINE_QUEUE
    switch(saved)


def test_each_delivery_of_a_burst_queues_one_clone_task_on_redis(project, redis_broker):
    # Every server thread publishes through its pooled producer's one Redis client: each created
    # experiment's clone task must reach the queue exactly once, whichever thread sent it.
    client, queue_name = redis_broker
    bodies = [push_body(project, f"{i + 1:040x}", f"aichor[train.yaml]: burst {i}") for i in range(12)]

    async def burst() -> list[dict]:
        firsts = [deliver(project, body, f"d-{i}") for i, body in enumerate(bodies)]
        again = [deliver(project, bodies[0], "d-0"), deliver(project, bodies[1], "d-other")]
        return await asyncio.gather(*firsts, *again)

    answers = asyncio.run(burst())
    assert sorted(answer["status"] for answer in answers) == [200] * 2 + [201] * 12, [a["body"] for a in answers]
    created = {uuid.UUID(json.loads(a["body"])["experiment"]) for a in answers if a["status"] == 201}
    assert set(Experiment.objects.filter(project=project).values_list("pk", flat=True)) == created
    # Each experiment came with its steps and its `created` event.
    for experiment in Experiment.objects.filter(project=project).prefetch_related("steps", "events"):
        assert [step.name for step in experiment.steps.all()] == STEP_ORDER
        assert [(e.new, e.reason) for e in experiment.events.all()] == [("Created", "created")]

    # Read without consuming (another test run may share this Redis database), then remove ours.
    ours = []
    for raw in client.lrange(queue_name, 0, -1):
        message = json.loads(raw)
        args = kombu_json.loads(base64.b64decode(message["body"]))[0]
        if message["headers"]["task"] == "experiments.clone" and args and args[0] in created:
            ours.append((raw, args[0], message))
    for raw, _, _ in ours:
        client.lrem(queue_name, 1, raw)
    assert sorted(str(i) for _, i, _ in ours) == sorted(str(i) for i in created)
    # After the first, a thread's tasks are sent from a template of Celery's message: each is
    # still a task of its own, with every field Celery gives one.
    messages = [message for _, _, message in ours]
    assert len({m["headers"]["id"] for m in messages}) == len({m["properties"]["delivery_tag"] for m in messages}) == 12
    for message, (_, experiment_id, _) in zip(messages, ours, strict=True):
        assert message["headers"]["id"] == message["headers"]["root_id"] == message["properties"]["correlation_id"]
        assert message["headers"]["argsrepr"] == f"[UUID('{experiment_id}')]"
        assert (message.keys(), message["headers"].keys(), message["properties"].keys()) == (
            messages[0].keys(),
            messages[0]["headers"].keys(),
            messages[0]["properties"].keys(),
        )
