"""The ASGI entry point: webhook deliveries keep their database connections between requests."""

import json
import socket
import threading
import time
import uuid

import pytest
import uvicorn
from asgiref.sync import async_to_sync
from channels.testing import HttpCommunicator
from django.db import connection
from django.db.backends.signals import connection_created

from aichor import asgi
from aichor.asgi import WEBHOOK_ADMITTED, WEBHOOK_THREADS, application
from experiments import services
from experiments.models import Experiment
from tests.helpers import github_signature


def signed(project, sha: str) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    body = json.dumps(
        {"ref": "refs/heads/main", "head_commit": {"id": sha, "message": "aichor[train.yaml]: asgi"}}
    ).encode()
    signature = github_signature(body)
    headers = [
        (b"host", b"testserver"),
        (b"content-type", b"application/json"),
        (b"x-github-event", b"push"),
        (b"x-github-delivery", str(uuid.uuid4()).encode()),
        (b"x-hub-signature-256", signature.encode()),
    ]
    return body, headers


@pytest.mark.django_db(transaction=True)
def test_webhook_deliveries_through_asgi_reuse_their_database_connections(project, monkeypatch):
    # A new connection per delivery (Django's default under ASGI) costs PostgreSQL ~5 ms each.
    monkeypatch.setitem(connection.settings_dict, "CONN_MAX_AGE", 60)
    connection.close()
    opened = []

    def count(sender, connection, **kwargs):
        opened.append(connection)

    connection_created.connect(count)
    try:
        # Deliveries run on a pool of threads, one connection each: a connection per thread
        # at most, however many deliveries.
        for i in range(3 * WEBHOOK_THREADS):
            body, headers = signed(project, f"{i:040x}")
            communicator = HttpCommunicator(application, "POST", f"/webhooks/github/{project.slug}/", body, headers)
            response = async_to_sync(communicator.get_response)(timeout=10)
            assert response["status"] == 201, response["body"]
    finally:
        connection_created.disconnect(count)
    assert Experiment.objects.filter(project=project).count() == 3 * WEBHOOK_THREADS
    assert len(opened) <= WEBHOOK_THREADS


def post(port: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> socket.socket:
    """A delivery on a connection of its own, as GitHub sends them; the answer is read later."""
    conn = socket.create_connection(("127.0.0.1", port), timeout=20)
    head = b"".join(name + b": " + value + b"\r\n" for name, value in headers if name != b"host")
    conn.sendall(
        b"POST /webhooks/github/vision/ HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
        + head
        + b"Content-Length: %d\r\n\r\n" % len(body)
        + body
    )
    return conn


def status_of(conn: socket.socket) -> int:
    answer = b""
    while chunk := conn.recv(65536):
        answer += chunk
    conn.close()
    return int(answer.split(b" ", 2)[1])


@pytest.mark.django_db(transaction=True)
def test_a_server_process_full_of_deliveries_leaves_new_connections_to_the_others(project, monkeypatch):
    # uvicorn --workers: the processes share one listening socket. One that has taken on
    # WEBHOOK_ADMITTED deliveries accepts no more, so a connection waits in the kernel's queue
    # for whichever process frees up first (here the test, accepting on the same socket).
    release = threading.Event()
    create = services.create_experiment_from_push

    def held(**kwargs):
        assert release.wait(20), "the test never released the deliveries"
        return create(**kwargs)

    monkeypatch.setattr(services, "create_experiment_from_push", held)
    listening = socket.socket()
    listening.bind(("127.0.0.1", 0))
    listening.listen()  # connections queue from the start, as behind uvicorn's supervisor
    port = listening.getsockname()[1]
    config = uvicorn.Config(application, loop="aichor.asgi:ServerLoop", http="httptools", lifespan="off")
    server = uvicorn.Server(config)
    serving = threading.Thread(target=server.run, kwargs={"sockets": [listening]})
    serving.start()
    try:
        taken = [post(port, *signed(project, f"{i + 1:040x}")) for i in range(WEBHOOK_ADMITTED)]
        deadline = time.monotonic() + 20
        while asgi._admission.taken < WEBHOOK_ADMITTED:
            assert time.monotonic() < deadline, "the server never took on the first deliveries"
            time.sleep(0.01)
        waiting = post(port, *signed(project, "f" * 40))
        # Accepting with a timeout: the connection is in the queue unless the server took it.
        listening.settimeout(10)
        other, _ = listening.accept()
        other.settimeout(10)
        assert b"f" * 40 in other.recv(65536)
        other.close()
        waiting.close()
        release.set()
        assert [status_of(conn) for conn in taken] == [201] * WEBHOOK_ADMITTED
        # With room again, the server takes new connections itself.
        body, headers = signed(project, "e" * 40)
        assert status_of(post(port, body, headers)) == 201
    finally:
        release.set()
        server.should_exit = True
        serving.join(timeout=20)
        listening.close()
    assert Experiment.objects.filter(project=project).count() == WEBHOOK_ADMITTED + 1


@pytest.mark.django_db(transaction=True)
def test_a_delivery_for_an_unknown_project_is_answered_404(project):
    # Through the server's path (no middleware): the HTML 404 page needs a user and was a 500.
    for provider in ("github", "gitlab"):
        body, headers = signed(project, "a" * 40)
        communicator = HttpCommunicator(application, "POST", f"/webhooks/{provider}/no-such/", body, headers)
        response = async_to_sync(communicator.get_response)(timeout=10)
        assert (response["status"], json.loads(response["body"])) == (404, {"error": "no such project"})
