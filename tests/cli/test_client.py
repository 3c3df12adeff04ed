"""The CLI's streaming upload as an HTTP client: the go-ahead handshake and the proxy route."""

import json
import socket
import threading

from aichor.cli.client import Client


def serve_once(answer_continue: bool = True):
    """A one-request HTTP peer: records the head and the body, answers 201 with JSON."""
    server = socket.create_server(("127.0.0.1", 0))
    seen: dict = {}

    def run() -> None:
        conn, _ = server.accept()
        head = b""
        while b"\r\n\r\n" not in head:
            head += conn.recv(1)
        seen["head"] = head.decode()
        length = int(
            next(line.split(":")[1] for line in seen["head"].split("\r\n") if line.lower().startswith("content-length"))
        )
        if answer_continue:
            conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        body = b""
        while len(body) < length:
            body += conn.recv(65536)
        seen["body"] = body
        reply = json.dumps({"id": "x", "received": len(body)}).encode()
        conn.sendall(
            b"HTTP/1.1 201 Created\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
            % (len(reply), reply)
        )
        conn.close()
        server.close()

    thread = threading.Thread(target=run)
    thread.start()
    return server.getsockname()[1], seen, thread


def upload(client: Client, body: bytes) -> dict:
    return client.upload(
        "/projects/p/experiments/archive",
        params={"manifest_path": "m.yaml"},
        length=len(body),
        content_type="application/x-tar",
        send_body=lambda sock: sock.sendall(body),
    )


def test_body_follows_the_go_ahead_and_the_answer_is_parsed(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    port, seen, thread = serve_once()
    assert upload(Client(url=f"http://127.0.0.1:{port}", token="aichor_t"), b"a" * 300_000) == {
        "id": "x",
        "received": 300_000,
    }
    thread.join(10)
    assert seen["head"].startswith("POST /api/v1/projects/p/experiments/archive?manifest_path=m.yaml HTTP/1.1")
    assert "Authorization: Bearer aichor_t" in seen["head"]


def test_plain_http_goes_through_the_proxy_the_environment_names(tmp_path, monkeypatch):
    port, seen, thread = serve_once()
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    monkeypatch.setenv("HTTP_PROXY", f"http://ops:s%40fe@127.0.0.1:{port}")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    # The "server" is a name only the proxy could resolve: the client must not connect to it.
    client = Client(url="http://aichor.internal.example:8000", token="aichor_t")
    assert upload(client, b"tar bytes")["received"] == len(b"tar bytes")
    thread.join(10)
    request_line, *headers = seen["head"].split("\r\n")
    assert request_line.startswith("POST http://aichor.internal.example:8000/api/v1/projects/p/experiments/archive?")
    assert "Proxy-Authorization: Basic b3BzOnNAZmU=" in headers  # ops:s@fe


def test_a_server_that_never_says_go_ahead_still_gets_the_body(tmp_path, monkeypatch):
    # RFC 9110: a client that waited long enough may send anyway (old proxies drop the Expect).
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    monkeypatch.setattr("aichor.cli.client.CONTINUE_TIMEOUT", 0.2)
    port, seen, thread = serve_once(answer_continue=False)
    assert upload(Client(url=f"http://127.0.0.1:{port}", token="aichor_t"), b"b" * 1000)["received"] == 1000
    thread.join(10)
