"""The ASGI entry point: webhook deliveries keep their database connections between requests."""

import json
import uuid

import pytest
from asgiref.sync import async_to_sync
from channels.testing import HttpCommunicator
from django.db import connection
from django.db.backends.signals import connection_created

from aichor.asgi import WEBHOOK_THREADS, application
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
