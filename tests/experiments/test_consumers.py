"""The live log WebSocket, through the real ASGI application (session cookie, origin check)."""

import pytest
from asgiref.sync import async_to_sync
from channels.testing import WebsocketCommunicator
from django.conf import settings
from django.test import Client

from aichor.asgi import application
from experiments import services
from experiments.logs import LogWriter, append_log

pytestmark = pytest.mark.django_db(transaction=True)


def communicator_for(user, experiment_id, stream="process:worker-0") -> WebsocketCommunicator:
    headers = [(b"origin", b"http://testserver"), (b"host", b"testserver")]
    if user is not None:
        client = Client()
        client.force_login(user)
        headers.append(
            (b"cookie", f"{settings.SESSION_COOKIE_NAME}={client.cookies[settings.SESSION_COOKIE_NAME].value}".encode())
        )
    return WebsocketCommunicator(application, f"/ws/experiments/{experiment_id}/logs/?stream={stream}", headers=headers)


@pytest.fixture
def experiment(project):
    return services.create_experiment(
        project=project, message="aichor[t.yaml]: x", manifest_path="aichor_manifests/t.yaml"
    )


def test_member_gets_the_tail_then_new_lines_then_the_end(member_user, experiment):
    append_log(experiment.pk, "process:worker-0", "".join(f"old {i}\n" for i in range(1500)))

    ws = communicator_for(member_user, experiment.pk)

    async def scenario():
        connected, _ = await ws.connect()
        assert connected
        first = await ws.receive_json_from(timeout=5)
        # Tail first: the last 1 000 of 1 500 lines, numbered from where they are in the log.
        assert first == {"type": "lines", "first": 500, "lines": [f"old {i}" for i in range(500, 1500)], "total": 1500}
        streams = await ws.receive_json_from(timeout=5)
        assert streams == {"type": "streams", "streams": ["process:worker-0"]}
        await _sync(append_log)(experiment.pk, "process:worker-0", "\x1b[32mepoch 1 done\x1b[0m\n")
        update = await ws.receive_json_from(timeout=5)
        assert update == {"type": "lines", "first": 1500, "lines": ["\x1b[32mepoch 1 done\x1b[0m"], "total": 1501}
        await _sync(services.cancel_experiment)(experiment)
        message = await ws.receive_json_from(timeout=5)
        while message["type"] == "streams":
            message = await ws.receive_json_from(timeout=5)
        assert message == {"type": "end", "status": "Cancelled"}
        await ws.disconnect()

    async_to_sync(scenario)()


def _sync(fn):
    from channels.db import database_sync_to_async

    return database_sync_to_async(fn)


@pytest.mark.parametrize("persona", ["outsider_user", None])
def test_outsider_and_anonymous_are_refused(request, experiment, persona):
    user = request.getfixturevalue(persona) if persona else None
    append_log(experiment.pk, "process:worker-0", "secret output\n")

    ws = communicator_for(user, experiment.pk)

    async def scenario():
        connected, _ = await ws.connect()
        assert not connected
        await ws.disconnect()

    async_to_sync(scenario)()


def test_unknown_experiment_is_refused(member_user, project):
    ws = communicator_for(member_user, "00000000-0000-0000-0000-000000000000")

    async def scenario():
        connected, _ = await ws.connect()
        assert not connected

    async_to_sync(scenario)()


def test_a_fast_workload_reaches_the_follower_whole_and_in_order(member_user, experiment):
    """60 000 lines stored in 60 chunks while the page follows: every one arrives, in order,
    none skipped (a follower once got only the newest 2 000 lines of each poll)."""
    ws = communicator_for(member_user, experiment.pk)
    expected = [f"line {i} of the fast workload" for i in range(60_000)]

    def print_fast() -> None:
        with LogWriter(experiment.pk, "process:worker-0") as writer:
            for start in range(0, len(expected), 1000):
                writer.write("".join(line + "\n" for line in expected[start : start + 1000]))
                writer.flush()  # a chunk per thousand lines, as a watcher reading a burst stores them

    async def scenario():
        connected, _ = await ws.connect()
        assert connected
        received, holes, message = [], [], await ws.receive_json_from(timeout=5)
        assert message == {"type": "lines", "first": 0, "lines": [], "total": 0}
        await _sync(print_fast)()
        await _sync(services.cancel_experiment)(experiment)
        while message["type"] != "end":
            message = await ws.receive_json_from(timeout=10)
            if message["type"] == "lines":
                if message["first"] != len(received):
                    holes.append((len(received), message["first"]))
                received += message["lines"]
        assert holes == []
        assert received == expected
        assert message == {"type": "end", "status": "Cancelled"}
        await ws.disconnect()

    async_to_sync(scenario)()


def test_a_follower_joining_late_gets_the_tail_then_every_new_line(member_user, experiment):
    append_log(experiment.pk, "process:worker-0", "".join(f"early {i}\n" for i in range(5000)))
    ws = communicator_for(member_user, experiment.pk)

    async def scenario():
        connected, _ = await ws.connect()
        assert connected
        tail = await ws.receive_json_from(timeout=5)
        assert (tail["first"], tail["lines"][0], tail["lines"][-1], tail["total"]) == (
            4000,
            "early 4000",
            "early 4999",
            5000,
        )
        for burst in range(3):
            await _sync(append_log)(
                experiment.pk, "process:worker-0", "".join(f"late {burst}.{i}\n" for i in range(3000))
            )
        received = []
        while len(received) < 9000:
            message = await ws.receive_json_from(timeout=10)
            if message["type"] == "lines":
                assert message["first"] == 5000 + len(received)
                received += message["lines"]
        assert received == [f"late {burst}.{i}" for burst in range(3) for i in range(3000)]
        await ws.disconnect()

    async_to_sync(scenario)()


@pytest.mark.parametrize("stream", ["process%00worker-0", "process:%ff%fe", "%00"])
def test_a_hostile_stream_name_gets_an_empty_log_not_an_error(member_user, experiment, stream):
    append_log(experiment.pk, "process:worker-0", "line\n")
    ws = communicator_for(member_user, experiment.pk, stream=stream)

    async def scenario():
        connected, _ = await ws.connect()
        assert connected
        first = await ws.receive_json_from(timeout=5)
        assert first["type"] == "lines" and first["lines"] == [] and first["total"] == 0
        await ws.disconnect()

    async_to_sync(scenario)()
