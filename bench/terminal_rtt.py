"""Terminal keystroke round-trip: one byte typed into the browser terminal's WebSocket (uvicorn,
the Channels consumer, docker exec with a TTY) until its echo comes back, against the same byte
through a bare `docker exec -it` on the same container. Both sides talk to `cat` on a raw TTY,
so every echo went through the container. 1 000 samples each, interleaved; target ratio ≤ 1.5."""

import os
import pty
import select
import socket
import statistics
import sys
import time
import tty
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench._common import Processes, exit_status, figure, percentile, setup_django  # noqa: E402

SAMPLES = 1000
WARMUP = 50
CAT = "stty raw -echo; exec cat"
ALPHABET = b"abcdefghijklmnopqrstuvwxyz"


class DockerExecTTY:
    """`docker exec -it` under a pseudo-terminal of our own, as a person at a shell would run it."""

    def __init__(self, container_id: str) -> None:
        self.pid, self.fd = pty.fork()
        if self.pid == 0:
            # Raw from the start: the pty's own echo would answer before the container does.
            tty.setraw(0)
            os.execvp("docker", ["docker", "exec", "-it", container_id, "sh", "-c", CAT])
        self.pending = b""
        os.write(self.fd, b"READY")
        self.until(b"READY")
        # Typed before cat set the TTY raw, READY may come back twice (TTY echo, then cat):
        # nothing stale may be left to answer a sample.
        while select.select([self.fd], [], [], 0.3)[0]:
            os.read(self.fd, 65536)
        self.pending = b""

    def until(self, needle: bytes, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while needle not in self.pending:
            if not select.select([self.fd], [], [], max(0.001, deadline - time.monotonic()))[0]:
                raise TimeoutError(f"no {needle!r} from docker exec; got {self.pending[-200:]!r}")
            self.pending += os.read(self.fd, 65536)
        self.pending = self.pending[self.pending.index(needle) + len(needle) :]

    def sample(self, byte: bytes) -> float:
        start = time.perf_counter()
        os.write(self.fd, byte)
        self.until(byte)
        return (time.perf_counter() - start) * 1000

    def close(self) -> None:
        os.kill(self.pid, 9)
        os.waitpid(self.pid, 0)


class WebSocketClient:
    """The browser's side: websockets' sans-I/O protocol over a plain blocking socket. Like the
    bare side's os.write/os.read, the client adds no event loop or thread of its own (a browser
    frames in native code), so the figure is the server path's, not the measuring tool's."""

    def __init__(self, url: str, path: str, headers: dict[str, str]) -> None:
        from urllib.parse import urlsplit

        from websockets.client import ClientProtocol
        from websockets.uri import parse_uri

        host, port = urlsplit(url).hostname, urlsplit(url).port
        self.sock = socket.create_connection((host, port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.protocol = ClientProtocol(parse_uri(f"ws://{host}:{port}{path}"))
        request = self.protocol.connect()
        for name, value in headers.items():
            request.headers[name] = value
        self.protocol.send_request(request)
        self.flush()
        self.pending = b""
        while self.protocol.handshake_exc is None and self.protocol.state.name == "CONNECTING":
            self.protocol.receive_data(self.sock.recv(65536))
            self.collect()
        if self.protocol.handshake_exc is not None:
            raise self.protocol.handshake_exc

    def flush(self) -> None:
        for data in self.protocol.data_to_send():
            self.sock.sendall(data)

    def collect(self) -> None:
        for event in self.protocol.events_received():
            if getattr(event, "data", None) is not None and event.opcode.name in ("BINARY", "TEXT", "CONT"):
                self.pending += event.data
        self.flush()  # pongs, close answers

    def send(self, data: bytes) -> None:
        self.protocol.send_binary(data)
        self.flush()

    def until(self, needle: bytes, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while needle not in self.pending:
            if not select.select([self.sock], [], [], max(0.001, deadline - time.monotonic()))[0]:
                raise TimeoutError(f"no {needle!r} from the terminal; got {self.pending[-200:]!r}")
            self.protocol.receive_data(self.sock.recv(65536))
            self.collect()
        self.pending = self.pending[self.pending.index(needle) + len(needle) :]

    def close(self) -> None:
        self.sock.close()


def measure(url: str, experiment_id: str, cookie: str, container_id: str) -> tuple[list[float], list[float]]:
    """Samples alternate between the two paths, so both see the same machine load."""
    ws = WebSocketClient(
        url, f"/ws/experiments/{experiment_id}/terminal/?process=worker-0", {"Cookie": cookie, "Origin": url}
    )
    ws.until(b"# ")  # the login shell's prompt
    ws.send(f"{CAT}\n".encode())
    ws.send(b"READY")
    ws.until(b"READY")  # echoed by cat itself: the shell has become cat on a raw TTY
    bare = DockerExecTTY(container_id)
    via_ws, via_exec = [], []
    try:
        for i in range(WARMUP + SAMPLES):
            byte = ALPHABET[i % len(ALPHABET) : i % len(ALPHABET) + 1]
            start = time.perf_counter()
            ws.send(byte)
            ws.until(byte)
            ws_ms = (time.perf_counter() - start) * 1000
            exec_ms = bare.sample(byte)
            if i >= WARMUP:
                via_ws.append(ws_ms)
                via_exec.append(exec_ms)
    finally:
        bare.close()
        ws.close()
    return via_ws, via_exec


def main() -> None:
    env = setup_django("aichor_bench_terminal")
    import docker
    from django.conf import settings
    from django.contrib.auth import get_user_model
    from django.test import Client

    from experiments import services
    from experiments.engines import get_engine
    from experiments.models import StepName
    from projects.models import Engine, Project
    from projects.services import create_project
    from tests.experiments.test_terminal import start_running_experiment
    from tests.helpers import ensure_test_image

    ensure_test_image(docker.from_env())
    Project.objects.filter(slug="bench-term").delete()
    # No bridge network on the bench host (dockerd --bridge=none): the experiment's own namespace.
    engine, _ = Engine.objects.update_or_create(
        name="bench-docker", defaults={"kind": "docker", "config": {"network": "none"}}
    )
    user, _ = get_user_model().objects.get_or_create(username="bench-term@example.com")
    project = create_project(name="Bench terminal", slug="bench-term", engines=[engine], members=[user])
    experiment = start_running_experiment(project, engine)
    assert experiment.current_step == StepName.RUNNING
    client = Client()
    client.force_login(user)
    cookie = f"{settings.SESSION_COOKIE_NAME}={client.cookies[settings.SESSION_COOKIE_NAME].value}"

    procs = Processes(env)
    try:
        url = procs.server()
        via_ws, bare = measure(url, str(experiment.pk), cookie, experiment.handle["containers"]["worker-0"])
    finally:
        procs.stop_all()
        services.cancel_experiment(experiment)
        get_engine(engine).cleanup_experiment(str(experiment.pk))

    print(f"terminal keystroke echo round-trip, {SAMPLES} samples each")
    for name, values in (("websocket (uvicorn + consumer + docker exec)", via_ws), ("bare docker exec -it", bare)):
        figure(
            f"{name} p50 / p99 / mean",
            f"{percentile(values, 50):.3f} / {percentile(values, 99):.3f} / {statistics.mean(values):.3f} ms",
        )
    ratio50 = percentile(via_ws, 50) / percentile(bare, 50)
    ratio99 = percentile(via_ws, 99) / percentile(bare, 99)
    figure("ratio websocket / docker exec, p50", f"{ratio50:.2f}", "<= 1.5", ratio50 <= 1.5)
    figure("ratio websocket / docker exec, p99", f"{ratio99:.2f}")
    sys.exit(exit_status())


if __name__ == "__main__":
    main()
