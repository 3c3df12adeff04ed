"""The port-forward WebSocket through the real ASGI application: who is refused (and with which
close code the CLI turns into its message), bytes both ways to a port inside the experiment's
own network namespace, and never a way into the server's own services."""

import asyncio
import shutil
import socket
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from channels.testing import WebsocketCommunicator

from aichor.asgi import application
from experiments import services
from experiments.engines import get_engine
from experiments.models import Experiment, StepName
from experiments.portforward import (
    CLOSE_BAD_PROCESS,
    CLOSE_NOT_FOUND,
    CLOSE_NOT_LOGGED_IN,
    CLOSE_NOT_RUNNING,
    CLOSE_UNREACHABLE,
)
from projects.services import create_api_token
from tests.experiments.test_terminal import start_running_experiment, target_of
from tests.helpers import TEST_IMAGE, wait_for

pytestmark = pytest.mark.django_db(transaction=True)

BUSYBOX = shutil.which("busybox") or "busybox"
# A server that answers every chunk with it in capitals, for as many connections as come.
SHOUT = "nc -ll -p {port} -e tr a-z A-Z"


def running(project, processes=("worker-0", "worker-1")) -> Experiment:
    """Moved to Running through the pipeline's services; the local engine's handle names the
    processes, none of which is real (enough for every refusal before the engine is asked)."""
    experiment = services.create_experiment(project=project, manifest_path="m.yaml")
    for step in (StepName.CLONING, StepName.BUILDING, StepName.SUBMITTING):
        assert services.begin_step(experiment.pk, step)
    assert services.record_submission(experiment.pk, {"pids": {name: 1 for name in processes}}, None, {})
    assert services.begin_step(experiment.pk, StepName.RUNNING)
    return experiment


def submitted(project, engine_model, commands: dict[str, str], image: str = TEST_IMAGE) -> Experiment:
    """An experiment in Running whose processes really run `commands` on the engine."""
    return start_running_experiment(project, engine_model, commands=commands, image=image)


def listening_in_container(docker_client, experiment: Experiment, process: str, port: int) -> bool:
    container = docker_client.containers.get(target_of(experiment, process))
    return f":{port} " in container.exec_run(["netstat", "-ltn"]).output.decode()


@pytest.fixture
def docker_experiment(docker_project, docker_engine, docker_client) -> Iterator[Experiment]:
    """worker-0 serves SHOUT on 8080; worker-1 only sleeps (it shares worker-0's namespace)."""
    experiment = submitted(
        docker_project, docker_engine, {"worker-0": SHOUT.format(port=8080), "worker-1": "sleep 600"}
    )
    wait_for(lambda: listening_in_container(docker_client, experiment, "worker-0", 8080), message="the listener")
    yield experiment
    get_engine(docker_engine).cleanup_experiment(str(experiment.pk))


def on_the_server(port: int, reply: bytes) -> Iterator[None]:
    """Something the server host itself serves on 127.0.0.1:`port` (Redis answers PING with
    +PONG): a stand-in bound for the test, or the real service when it runs (CI)."""
    try:
        listener = socket.create_server(("127.0.0.1", port))
    except OSError:
        yield  # taken: the real service (CI=true runs Redis and PostgreSQL here)
        return
    stop = threading.Event()

    def serve() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(5)
                try:
                    if conn.recv(1024):
                        conn.sendall(reply)
                except OSError:
                    pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield
    stop.set()
    thread.join(5)
    listener.close()


@pytest.fixture
def server_redis() -> Iterator[None]:
    yield from on_the_server(6379, b"+PONG\r\n")


@pytest.fixture
def server_postgres() -> Iterator[None]:
    yield from on_the_server(5432, b"N")  # PostgreSQL's answer to an SSLRequest it declines


async def exchange(ws: WebsocketCommunicator, data: bytes, expect: int | None = None) -> tuple[bytes, dict | None]:
    """Send `data`; what comes back up to the close frame (and the frame), or until `expect`
    bytes came (then no frame). A silent tunnel fails the test after 10 s."""
    connected, _ = await ws.connect()
    assert connected
    await ws.send_to(bytes_data=data)
    received = b""
    while expect is None or len(received) < expect:
        message = await ws.receive_output(10)
        if message["type"] == "websocket.close":
            await ws.disconnect()
            return received, message
        received += message.get("bytes") or b""
    await ws.disconnect()
    return received, None


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


def test_token_in_the_query_string_is_refused(project, member_user):
    # Access logs keep query strings: a token there would be written down in plain text.
    ws = communicator(running(project).pk, 8080, None, query=f"token={create_api_token(member_user)}")
    assert close_code(ws) == CLOSE_NOT_LOGGED_IN


@pytest.mark.docker
def test_member_reaches_the_port_both_ways(docker_experiment, member_user):
    # The listener is in worker-0; worker-1 shares its network namespace, as in a pod.
    ws = communicator(docker_experiment.pk, 8080, create_api_token(member_user), query="process=worker-1")
    received, closed = asyncio.run(exchange(ws, b"hello through the tunnel\n", expect=25))
    assert received == b"HELLO THROUGH THE TUNNEL\n"
    assert closed is None


@pytest.mark.docker
def test_a_process_that_exited_leaves_the_namespace_to_the_others(
    docker_project, docker_engine, docker_client, member_user
):
    # worker-0 is created first and ends at once: the namespace is the experiment's, not its.
    experiment = submitted(docker_project, docker_engine, {"worker-0": "true", "worker-1": SHOUT.format(port=8081)})
    token = create_api_token(member_user)
    try:
        wait_for(lambda: listening_in_container(docker_client, experiment, "worker-1", 8081), message="the listener")
        engine = get_engine(docker_engine)
        wait_for(lambda: engine.status(experiment.handle)[0].phase == "exited", message="worker-0 to exit")
        ws = communicator(experiment.pk, 8081, token, query="process=worker-0")
        received, _ = asyncio.run(exchange(ws, b"still here\n", expect=11))
        assert received == b"STILL HERE\n"
    finally:
        get_engine(docker_engine).cleanup_experiment(str(experiment.pk))


@pytest.mark.docker
def test_a_single_process_experiment_is_reached_in_its_own_namespace(
    docker_project, docker_engine, docker_client, member_user
):
    # One process owns its namespace (no holder container): the tunnel goes straight into it.
    experiment = submitted(docker_project, docker_engine, {"worker-0": SHOUT.format(port=8082)})
    try:
        wait_for(lambda: listening_in_container(docker_client, experiment, "worker-0", 8082), message="the listener")
        ws = communicator(experiment.pk, 8082, create_api_token(member_user))
        received, _ = asyncio.run(exchange(ws, b"alone\n", expect=6))
        assert received == b"ALONE\n"
        labelled = docker_client.containers.list(all=True, filters={"label": f"aichor.experiment={experiment.pk}"})
        assert len(labelled) == 1
    finally:
        get_engine(docker_engine).cleanup_experiment(str(experiment.pk))


@pytest.mark.docker
def test_closed_port_in_the_container_is_reported_unreachable(docker_experiment, member_user):
    ws = communicator(docker_experiment.pk, 9, create_api_token(member_user))
    received, closed = asyncio.run(exchange(ws, b"anyone?\n"))
    assert received == b""
    assert closed["code"] == CLOSE_UNREACHABLE
    assert closed["reason"] == "nothing answers on port 9 in worker-0"


@pytest.mark.docker
def test_the_servers_redis_is_out_of_reach(docker_experiment, member_user, server_redis):
    ws = communicator(docker_experiment.pk, 6379, create_api_token(member_user))
    received, closed = asyncio.run(exchange(ws, b"PING\r\n"))
    assert b"+PONG" not in received
    assert received == b"" and closed["code"] == CLOSE_UNREACHABLE


@pytest.mark.docker
def test_the_servers_postgresql_is_out_of_reach(docker_experiment, member_user, server_postgres):
    ssl_request = (8).to_bytes(4, "big") + (80877103).to_bytes(4, "big")
    ws = communicator(docker_experiment.pk, 5432, create_api_token(member_user))
    received, closed = asyncio.run(exchange(ws, ssl_request))
    assert received == b"" and closed["code"] == CLOSE_UNREACHABLE


def import_shell_only_image(tag: str) -> None:
    """An image holding dash, sleep and their libraries: no nc, socat or python. (busybox's sh
    runs its nc applet whatever PATH says, so it cannot stand in.)"""
    files = ["/bin/dash", "/bin/sleep"]
    libraries = subprocess.run(["ldd", *files], check=True, capture_output=True, text=True).stdout
    files += sorted({word for word in libraries.split() if word.startswith("/") and not word.endswith(":")})
    with tempfile.TemporaryDirectory() as root:
        for path in files:
            target = Path(root, path.lstrip("/"))
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, target)
        shutil.move(Path(root, "bin/dash"), Path(root, "bin/sh"))
        tar = subprocess.run(["tar", "-C", root, "-c", "."], check=True, capture_output=True).stdout
    subprocess.run(["docker", "import", "-", tag], input=tar, check=True, capture_output=True)


@pytest.mark.docker
def test_image_without_a_forwarder_says_what_it_needs(docker_project, docker_engine, docker_client, member_user):
    shell_only = "aichor-test/shell-only:latest"
    import_shell_only_image(shell_only)
    experiment = submitted(docker_project, docker_engine, {"worker-0": "sleep 600"}, image=shell_only)
    token = create_api_token(member_user)
    try:
        received, closed = asyncio.run(exchange(communicator(experiment.pk, 8080, token), b"x"))
        assert closed["code"] == CLOSE_UNREACHABLE
        assert closed["reason"] == "port-forward needs nc, socat or python3 in the image"
    finally:
        get_engine(docker_engine).cleanup_experiment(str(experiment.pk))
        docker_client.images.remove(shell_only, force=True)


@pytest.fixture
def local_shout(project, unused_tcp_port) -> Iterator[tuple[Experiment, int]]:
    """A local-engine experiment whose worker-0 serves SHOUT on a port of the server's host."""
    port = unused_tcp_port
    command = f"{BUSYBOX} nc -ll -p {port} -e {BUSYBOX} tr a-z A-Z"
    experiment = submitted(project, project.default_engine, {"worker-0": command, "worker-1": "sleep 600"})
    wait_for(lambda: _accepts(port), message="the local listener")
    yield experiment, port
    get_engine(project.default_engine).cleanup_experiment(str(experiment.pk))


def _accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def test_cli_forwards_a_local_port_with_the_authorization_header(member_user, asgi_server_url, local_shout):
    from aichor.cli.portforward import serve

    experiment, port = local_shout
    token = create_api_token(member_user)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        local_port = probe.getsockname()[1]

    async def scenario() -> bytes:
        forwarding = asyncio.create_task(serve(asgi_server_url, token, str(experiment.pk), port, None, local_port))
        try:
            deadline = asyncio.get_running_loop().time() + 10
            while True:  # until the CLI listens (wait_for, on this event loop)
                try:
                    reader, writer = await asyncio.open_connection("127.0.0.1", local_port)
                    break
                except OSError:
                    assert asyncio.get_running_loop().time() < deadline, "the CLI never listened"
                    await asyncio.sleep(0.05)
            writer.write(b"hello from the laptop\n")
            await writer.drain()
            answer = await asyncio.wait_for(reader.readline(), 10)
            writer.close()
            return answer
        finally:
            forwarding.cancel()

    assert asyncio.run(scenario()) == b"HELLO FROM THE LAPTOP\n"


def test_local_engine_refuses_a_port_no_experiment_process_listens_on(project, member_user, local_shout):
    # The local engine's processes share the server's network: a port the server itself (or
    # anything else on its host) listens on must stay out of reach.
    experiment, _ = local_shout
    token = create_api_token(member_user)

    async def scenario() -> tuple[bytes, dict | None]:
        async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.read(1024)
            writer.write(b"+PONG\r\n")
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(answer, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            return await exchange(communicator(experiment.pk, port, token), b"PING\r\n")
        finally:
            server.close()
            await server.wait_closed()

    received, closed = asyncio.run(scenario())
    assert received == b""
    assert closed["code"] == CLOSE_UNREACHABLE
    assert "no process of this experiment listens on port" in closed["reason"]


@pytest.fixture
def unused_tcp_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
