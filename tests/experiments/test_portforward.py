"""The port-forward WebSocket through the real ASGI application: who is refused (and with which
close code the CLI turns into its message), and bytes both ways to a port on the engine host."""

import asyncio

import pytest
from channels.testing import WebsocketCommunicator

from aichor.asgi import application
from experiments import services
from experiments.models import Experiment, StepName
from experiments.portforward import (
    CLOSE_BAD_PROCESS,
    CLOSE_NOT_FOUND,
    CLOSE_NOT_LOGGED_IN,
    CLOSE_NOT_RUNNING,
    CLOSE_UNREACHABLE,
)
from projects.services import create_api_token

pytestmark = pytest.mark.django_db(transaction=True)


def running(project, processes=("worker-0", "worker-1")) -> Experiment:
    """Moved to Running through the pipeline's services; the local engine's handle names the
    processes (the consumer connects to the engine host, so no real process is needed)."""
    experiment = services.create_experiment(project=project, manifest_path="m.yaml")
    for step in (StepName.CLONING, StepName.BUILDING, StepName.SUBMITTING):
        assert services.begin_step(experiment.pk, step)
    assert services.set_fields(experiment.pk, handle={"pids": {name: 1 for name in processes}})
    assert services.begin_step(experiment.pk, StepName.RUNNING)
    return experiment


def communicator(experiment_id, port: int, token: str | None, query: str = "") -> WebsocketCommunicator:
    headers = [(b"origin", b"http://testserver"), (b"host", b"testserver")]
    if token:
        headers.append((b"authorization", f"Bearer {token}".encode()))
    path = f"/ws/experiments/{experiment_id}/port-forward/{port}/" + (f"?{query}" if query else "")
    return WebsocketCommunicator(application, path, headers=headers)


def close_code(ws: WebsocketCommunicator) -> int:
    async def scenario() -> int:
        connected, _ = await ws.connect()
        assert connected  # refusals accept first, so the close code can carry the reason
        message = await ws.receive_output(5)
        assert message["type"] == "websocket.close"
        await ws.disconnect()  # as the client does on a close frame
        return message["code"]

    return asyncio.run(scenario())


def test_anonymous_is_refused(project):
    assert close_code(communicator(running(project).pk, 8080, None)) == CLOSE_NOT_LOGGED_IN


def test_revoked_token_is_refused_like_anonymous(project, member_user):
    from projects.services import revoke_api_token

    token = create_api_token(member_user)
    revoke_api_token(member_user)
    assert close_code(communicator(running(project).pk, 8080, token)) == CLOSE_NOT_LOGGED_IN


def test_outsider_gets_the_not_found_code(project, outsider_user):
    experiment = running(project)
    assert close_code(communicator(experiment.pk, 8080, create_api_token(outsider_user))) == CLOSE_NOT_FOUND


def test_unknown_experiment_gets_the_same_code_as_an_outsider(project, member_user):
    unknown = "00000000-0000-0000-0000-000000000000"
    assert close_code(communicator(unknown, 8080, create_api_token(member_user))) == CLOSE_NOT_FOUND


def test_experiment_not_running_is_refused(project, member_user):
    waiting = services.create_experiment(project=project, manifest_path="m.yaml")
    assert close_code(communicator(waiting.pk, 8080, create_api_token(member_user))) == CLOSE_NOT_RUNNING


def test_finished_experiment_is_refused(project, member_user):
    experiment = running(project)
    services.finish_experiment(experiment.pk, "Succeeded", exit_code=0)
    assert close_code(communicator(experiment.pk, 8080, create_api_token(member_user))) == CLOSE_NOT_RUNNING


def test_unknown_process_is_refused(project, member_user):
    ws = communicator(running(project).pk, 8080, create_api_token(member_user), query="process=head-0")
    assert close_code(ws) == CLOSE_BAD_PROCESS


def test_port_out_of_range_is_refused(project, member_user):
    assert close_code(communicator(running(project).pk, 70000, create_api_token(member_user))) == CLOSE_BAD_PROCESS


def test_closed_port_is_reported_unreachable(project, member_user, unused_tcp_port):
    ws = communicator(running(project).pk, unused_tcp_port, create_api_token(member_user))
    assert close_code(ws) == CLOSE_UNREACHABLE


def test_member_reaches_the_port_both_ways(project, member_user):
    experiment = running(project)
    token = create_api_token(member_user)

    async def scenario() -> None:
        async def shout(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while data := await reader.read(1024):
                writer.write(data.upper())
                await writer.drain()
            writer.close()

        server = await asyncio.start_server(shout, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        ws = communicator(experiment.pk, port, token, query="process=worker-1")
        connected, _ = await ws.connect()
        assert connected
        await ws.send_to(bytes_data=b"hello through the tunnel")
        assert await ws.receive_from(5) == b"HELLO THROUGH THE TUNNEL"
        await ws.disconnect()
        server.close()
        await server.wait_closed()

    asyncio.run(scenario())


@pytest.fixture
def unused_tcp_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
