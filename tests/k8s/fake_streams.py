"""Pod logs, exec and port-forward for the fake Kubernetes API server (a fake: no cluster can
run here). They reach the real process: logs are the pod's Docker container's, exec is a
`docker exec` in it, and port-forward runs busybox `nc 127.0.0.1 PORT` in the network namespace
the pod shares with the other pods of its top object (attach is answered 501: not modelled).
Exec speaks the WebSocket channel protocol of shared/k8s/EXEC-PROTOCOL.md (v5.channel.k8s.io,
else v4); port-forward speaks the kubelet's v4 port-forward framing (a data and an error channel
per port, each opened by the port number, little-endian)."""

import json
import logging
import socket
import struct
import threading
import time
from datetime import UTC, datetime

from websockets.exceptions import ConnectionClosed
from websockets.server import ServerProtocol
from websockets.sync.connection import Connection

from tests.k8s.fake_store import ApiError

V4, V5 = "v4.channel.k8s.io", "v5.channel.k8s.io"
# The library logs every connection at INFO; a test's output needs only its warnings.
_LOG = logging.getLogger("tests.k8s.fake_streams")
_LOG.setLevel(logging.WARNING)
STDIN, STDOUT, STDERR, ERROR, RESIZE, CLOSE = 0, 1, 2, 3, 4, 255


def serve(handler, sub: str, method: str, pod: dict, kubelet) -> None:
    if kubelet is None:
        raise ApiError(500, "InternalError", "no kubelet runs in this fake cluster")
    if sub == "log":
        return _logs(handler, pod, kubelet)
    if (handler.headers.get("Upgrade") or "").lower() != "websocket":
        raise ApiError(400, "BadRequest", "Upgrade request required")
    if sub == "portforward":
        return _port_forward(handler, pod, kubelet)
    if sub == "attach":  # not modelled: say so rather than attach to something else
        raise ApiError(501, "NotImplemented", "pods/attach is not implemented by this fake API server")
    return _exec(handler, pod, kubelet)


def _bool(value: str | None) -> bool:
    return (value or "").lower() in ("1", "true", "t")


def _container(pod: dict, name: str | None, *, running: bool) -> tuple[str, dict]:
    """The container named, or the only one; the errors the API server gives otherwise."""
    pod_name = pod["metadata"]["name"]
    names = [c["name"] for c in pod["spec"]["containers"]]
    init_names = [c["name"] for c in pod["spec"].get("initContainers") or []]
    if not name:
        if len(names) != 1:
            raise ApiError(
                400,
                "BadRequest",
                f"a container name must be specified for pod {pod_name}, choose one of: [{' '.join(names)}]",
            )
        name = names[0]
    if name not in names + init_names:
        raise ApiError(400, "BadRequest", f"container {name} is not valid for pod {pod_name}")
    status = pod.get("status") or {}
    if running and status.get("phase") in ("Succeeded", "Failed"):
        raise ApiError(
            400, "BadRequest", f"cannot exec into a container in a completed pod; current phase is {status['phase']}"
        )
    for s in [*(status.get("containerStatuses") or []), *(status.get("initContainerStatuses") or [])]:
        if s.get("name") == name:
            if s.get("containerID") and not (running and "running" not in (s.get("state") or {})):
                return name, s
            waiting = (s.get("state") or {}).get("waiting") or {}
            raise ApiError(
                400,
                "BadRequest",
                f'container "{name}" in pod "{pod_name}" is waiting to start: {waiting.get("reason", "ContainerCreating")}',
            )
    raise ApiError(400, "BadRequest", f'container "{name}" in pod "{pod_name}" is waiting to start: ContainerCreating')


def _docker_id(container_status: dict) -> str:
    return container_status["containerID"].split("://", 1)[1]


# --- logs -----------------------------------------------------------------------------------
def _logs(handler, pod: dict, kubelet) -> None:
    query = {k: v[-1] for k, v in handler.query_all.items()}
    name, status = _container(pod, query.get("container"), running=False)
    if _bool(query.get("previous")):
        raise ApiError(
            400, "BadRequest", f'previous terminated container "{name}" in pod "{pod["metadata"]["name"]}" not found'
        )
    kwargs = {"stdout": True, "stderr": True, "timestamps": _bool(query.get("timestamps")), "stream": True}
    kwargs["follow"] = _bool(query.get("follow"))
    if query.get("tailLines"):
        kwargs["tail"] = int(query["tailLines"])
    if query.get("sinceSeconds"):
        kwargs["since"] = time.time() - int(query["sinceSeconds"])
    elif query.get("sinceTime"):
        kwargs["since"] = datetime.fromisoformat(query["sinceTime"].replace("Z", "+00:00")).astimezone(UTC).timestamp()
    limit = int(query["limitBytes"]) if query.get("limitBytes") else None
    try:
        stream = kubelet.docker.api.logs(_docker_id(status), **kwargs)
    except Exception as exc:  # the container went between the pod's status and now
        raise ApiError(500, "InternalError", f"failed to get logs: {exc}") from None
    handler.start_chunked("text/plain")
    try:
        sent = 0
        for data in stream:
            if limit is not None:
                data = data[: limit - sent]
            handler.chunk(data)
            sent += len(data)
            if (limit is not None and sent >= limit) or kubelet.stopped.is_set():
                break
        else:
            if kwargs["follow"]:
                # Some Docker builds (Debian's 20.10.24+b6) end a followed log at the
                # container's exit without its unfinished last line; a kubelet serves the log
                # file to its end. The rest comes from a one-shot read of the same log.
                rest = _rest_of_log(kubelet, status, kwargs, sent)
                if limit is not None:
                    rest = rest[: limit - sent]
                if rest:
                    handler.chunk(rest)
        handler.end_chunked()
    except OSError:
        handler.close_connection = True
    finally:
        stream.close()


def _rest_of_log(kubelet, status: dict, kwargs: dict, sent: int) -> bytes:
    try:
        whole = b"".join(kubelet.docker.api.logs(_docker_id(status), **{**kwargs, "follow": False}))
    except Exception:  # the container is gone: what was sent is all there is
        return b""
    return whole[sent:]


# --- WebSockets -----------------------------------------------------------------------------
def _upgrade(handler, offered_ok) -> tuple[Connection, str]:
    """The handshake, done by the websockets library on the socket http.server accepted."""
    offered = [p.strip() for p in (handler.headers.get("Sec-WebSocket-Protocol") or "").split(",") if p.strip()]
    chosen = offered_ok(offered)
    if chosen is None:
        raise ApiError(400, "BadRequest", f"unable to upgrade connection: no supported protocol in {offered}")
    protocol = ServerProtocol(subprotocols=[chosen], max_size=None, logger=_LOG)
    # http.server has parsed the request already; the sans-I/O protocol parses it again, so that
    # its parser moves on to WebSocket frames.
    head = handler.requestline + "\r\n" + "".join(f"{k}: {v}\r\n" for k, v in handler.headers.items()) + "\r\n"
    protocol.receive_data(head.encode("latin-1"))
    request = protocol.events_received()[0]
    response = protocol.accept(request)
    protocol.send_response(response)
    handler.wfile.write(b"".join(protocol.data_to_send()))
    handler.wfile.flush()
    if response.status_code != 101:
        handler.close_connection = True
        return None, chosen
    handler.close_connection = True  # the socket belongs to the WebSocket from now on
    return Connection(handler.connection, protocol, ping_interval=None, close_timeout=2), chosen


def _frames(conn: Connection):
    """(channel, payload) per client message; text frames are `chr(channel) + data`."""
    while True:
        try:
            message = conn.recv()
        except ConnectionClosed:
            return
        if isinstance(message, str):
            if not message:
                continue
            yield ord(message[0]), message[1:].encode()
        elif message:
            yield message[0], message[1:]


def _exec(handler, pod: dict, kubelet) -> None:
    query = handler.query_all
    one = {k: v[-1] for k, v in query.items()}
    command = query.get("command") or []
    if not command:
        raise ApiError(400, "BadRequest", "you must specify at least 1 command")
    want_stdin, want_stdout, want_stderr, tty = (_bool(one.get(k)) for k in ("stdin", "stdout", "stderr", "tty"))
    if not (want_stdin or want_stdout or want_stderr):
        raise ApiError(400, "BadRequest", "you must specify at least 1 of stdin, stdout, stderr")
    if tty:
        want_stderr = False  # merged into stdout by the terminal
    name, status = _container(pod, one.get("container"), running=True)
    api = kubelet.docker.api
    exec_id = api.exec_create(_docker_id(status), command, stdin=want_stdin, stdout=True, stderr=True, tty=tty)["Id"]
    conn, chosen = _upgrade(handler, lambda offered: V5 if V5 in offered else (V4 if V4 in offered else None))
    if conn is None:
        return
    sock = api.exec_start(exec_id, tty=tty, socket=True)
    sock = getattr(sock, "_sock", sock)
    send_lock = threading.Lock()

    def send(channel: int, data: bytes) -> None:
        with send_lock:
            try:
                conn.send(bytes([channel]) + data)
            except ConnectionClosed:
                pass

    send(STDOUT if want_stdout else (STDERR if want_stderr else ERROR), b"")

    def from_client() -> None:
        for channel, payload in _frames(conn):
            if channel == STDIN and want_stdin:
                try:
                    sock.sendall(payload)
                except OSError:
                    return
            elif channel == RESIZE and tty:
                try:
                    size = json.loads(payload)
                    api.exec_resize(exec_id, height=int(size["Height"]), width=int(size["Width"]))
                except Exception:
                    pass  # like the real decoder: a malformed size ends resizing, not the session
            elif channel == CLOSE and chosen == V5 and payload[:1] == bytes([STDIN]):
                try:
                    sock.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
        try:  # the client left: the process loses its terminal
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    threading.Thread(target=from_client, name="fake-k8s-exec-in", daemon=True).start()
    _pump_docker_output(
        sock,
        tty,
        lambda ch, data: send(ch, data) if (ch == STDOUT and want_stdout) or (ch == STDERR and want_stderr) else None,
    )
    code = None
    for _ in range(50):
        inspected = api.exec_inspect(exec_id)
        if not inspected.get("Running"):
            code = inspected.get("ExitCode")
            break
        time.sleep(0.05)
    if code in (0, None):
        status_body = {"metadata": {}, "status": "Success"}
    else:
        status_body = {
            "metadata": {},
            "status": "Failure",
            "message": f"command terminated with non-zero exit code: command terminated with exit code {code}",
            "reason": "NonZeroExitCode",
            "details": {"causes": [{"reason": "ExitCode", "message": str(code)}]},
        }
    send(ERROR, json.dumps(status_body).encode())
    conn.close(1000)
    sock.close()


def _pump_docker_output(sock, tty: bool, emit) -> None:
    """Docker's attach stream: raw with a TTY, else frames of [stream, 0, 0, 0, size(4, BE)]."""
    buffer = b""
    while True:
        try:
            data = sock.recv(65536)
        except OSError:
            data = b""
        if not data:
            return
        if tty:
            emit(STDOUT, data)
            continue
        buffer += data
        while len(buffer) >= 8:
            stream, size = buffer[0], struct.unpack(">I", buffer[4:8])[0]
            if len(buffer) < 8 + size:
                break
            emit(STDERR if stream == 2 else STDOUT, buffer[8 : 8 + size])
            buffer = buffer[8 + size :]


def _port_forward(handler, pod: dict, kubelet) -> None:
    one = {k: v[-1] for k, v in handler.query_all.items()}
    try:
        ports = [int(p) for p in (one.get("ports") or "").split(",") if p]
    except ValueError:
        raise ApiError(400, "BadRequest", "ports must be integers") from None
    if not ports:
        raise ApiError(400, "BadRequest", "at least one port must be specified")
    if (pod.get("status") or {}).get("phase") != "Running":
        raise ApiError(400, "BadRequest", f"pod {pod['metadata']['name']} is not running")
    netns = kubelet.netns_of(pod)
    if netns is None:
        raise ApiError(500, "InternalError", "the pod has no network namespace")
    # The kubelet's port-forward WebSocket server speaks v4 (binary) and not v5.
    conn, _ = _upgrade(handler, lambda offered: V4 if V4 in offered or not offered else None)
    if conn is None:
        return
    api = kubelet.docker.api
    send_lock = threading.Lock()

    def send(channel: int, data: bytes) -> None:
        with send_lock:
            try:
                conn.send(bytes([channel]) + data)
            except ConnectionClosed:
                pass

    sockets = []
    remaining = [len(ports)]
    remaining_lock = threading.Lock()

    def relay_done() -> None:
        # Every remote end closed: the kubelet ends the stream, and the client its local sockets.
        with remaining_lock:
            remaining[0] -= 1
            if remaining[0] == 0:
                conn.close(1000)

    for i, port in enumerate(ports):
        exec_id = api.exec_create(netns, ["nc", "127.0.0.1", str(port)], stdin=True, stdout=True, stderr=True)["Id"]
        sock = api.exec_start(exec_id, socket=True)
        sock = getattr(sock, "_sock", sock)
        sockets.append(sock)
        send(2 * i, struct.pack("<H", port))
        send(2 * i + 1, struct.pack("<H", port))

        def relay(i=i, sock=sock, port=port) -> None:
            errors = []
            _pump_docker_output(
                sock, False, lambda ch, data: send(2 * i, data) if ch == STDOUT else errors.append(data)
            )
            if errors:
                text = b"".join(errors).decode(errors="replace").strip()
                send(2 * i + 1, f"error forwarding port {port} to pod: {text}".encode())
            relay_done()

        threading.Thread(target=relay, name="fake-k8s-portforward", daemon=True).start()
    for channel, payload in _frames(conn):
        if channel % 2 == 0 and channel // 2 < len(sockets):
            try:
                sockets[channel // 2].sendall(payload)
            except OSError:
                pass
    for sock in sockets:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        sock.close()
