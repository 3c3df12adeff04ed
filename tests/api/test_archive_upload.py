"""Submitting an uploaded archive, through the ASGI application that serves it (the route is
answered ahead of Django, which would spool the whole body to disk first)."""

import io
import tarfile

import pytest
from django.core.files.storage import default_storage

from experiments.models import Experiment
from tests.api.conftest import asgi_request

pytestmark = pytest.mark.django_db(transaction=True)

ARCHIVE = "/api/v1/projects/vision/experiments/archive"


def tar_bytes(files: dict[str, str]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def stored_archives() -> set[str]:
    return set(default_storage.listdir("archives")[1]) if default_storage.exists("archives") else set()


def upload(headers: dict, body: bytes, *, query: str = "", pieces: int = 1, content_type: str = "application/x-tar"):
    headers = {"Content-Type": content_type, **headers}
    return asgi_request("POST", ARCHIVE, headers, body, pieces=pieces, query=query)


@pytest.mark.parametrize("persona", ["admin", "member", "outsider", "anonymous", "expired", "revoked"])
def test_archive_route_for_every_persona(project_with_all, tokens, persona):
    response = upload(tokens[persona], tar_bytes({"aichor_manifests/manifest.yaml": "kind: AIchorManifest\n"}))
    expected = {"admin": 201, "member": 201, "outsider": 404}.get(persona, 401)
    assert response.status_code == expected, response.content
    if expected != 201:
        assert not Experiment.objects.exists()


def test_archive_sent_in_many_pieces_is_stored_whole_and_linked(project, tokens, member_user):
    # Pieces smaller and larger than the server's 1 MiB unit: none may be lost or reordered.
    data = tar_bytes({"aichor_manifests/manifest.yaml": "x: 1\n", "src/blob.bin": "0123456789" * 300_000})
    response = upload(
        tokens["member"], data, query="message=from+laptop&manifest_path=aichor_manifests/manifest.yaml", pieces=7
    )
    assert response.status_code == 201, response.content
    body = response.json()
    assert response.headers["content-type"].startswith("application/json")
    assert body["source"] == "archive" and body["message"] == "from laptop" and body["author"] == member_user.username
    assert body["project"] == "vision" and body["status"] == "Created" and body["engine"] == "local"
    experiment = Experiment.objects.get(pk=body["id"])
    assert experiment.author == member_user
    assert experiment.archive == body["archive"] and experiment.archive.endswith(".tar")
    with default_storage.open(experiment.archive, "rb") as fh:
        assert fh.read() == data


def test_gzipped_archive_keeps_its_kind(project, tokens):
    response = upload(tokens["member"], b"\x1f\x8b fake gzip", content_type="application/gzip")
    assert response.status_code == 201
    assert response.json()["archive"].endswith(".tar.gz")


def test_same_json_as_the_experiment_detail_route(client, project, tokens):
    created = upload(tokens["member"], tar_bytes({"a": "b"})).json()
    detail = client.get(f"/api/v1/experiments/{created['id']}", headers=tokens["member"]).json()
    assert created == detail


def test_declared_length_over_the_limit_is_413_before_reading(project, tokens, settings):
    settings.MAX_ARCHIVE_BYTES = 1000
    before = stored_archives()
    response = upload({**tokens["member"], "Content-Length": "5000"}, b"x" * 5000)
    assert response.status_code == 413
    assert response.json()["detail"] == "the archive (5000 bytes) is larger than the limit of 1000 bytes"
    assert not Experiment.objects.exists() and stored_archives() == before


def test_streamed_body_over_the_limit_is_413_and_leaves_nothing(project, tokens, settings):
    """A chunked upload declares no length: the limit is enforced while streaming."""
    settings.MAX_ARCHIVE_BYTES = 1000
    before = stored_archives()
    response = upload(tokens["member"], b"x" * 5000, pieces=10)
    assert response.status_code == 413
    assert "larger than the limit of 1000 bytes" in response.json()["detail"]
    assert not Experiment.objects.exists() and stored_archives() == before


def test_empty_archive_is_refused(project, tokens):
    before = stored_archives()
    response = upload(tokens["member"], b"")
    assert response.status_code == 409 and response.json()["detail"] == "the archive is empty"
    assert not Experiment.objects.exists() and stored_archives() == before


def test_engine_the_project_lacks_is_409_without_storing(project, tokens):
    before = stored_archives()
    response = upload(tokens["member"], tar_bytes({"a": "b"}), query="engine=gpu-cluster")
    assert response.status_code == 409 and "gpu-cluster" in response.json()["detail"]
    assert stored_archives() == before


@pytest.mark.parametrize("manifest_path", ["../escape.yaml", "/abs.yaml", "manifest.txt"])
def test_bad_manifest_path_is_422_with_its_location(project, tokens, manifest_path):
    response = upload(tokens["member"], tar_bytes({"a": "b"}), query=f"manifest_path={manifest_path}")
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["query", "manifest_path"]
    assert not Experiment.objects.exists()


def test_other_methods_on_the_route_reach_django(project, tokens):
    assert asgi_request("DELETE", ARCHIVE, tokens["member"]).status_code == 405
    assert asgi_request("GET", ARCHIVE, tokens["member"]).status_code == 405


def test_foreign_host_is_refused(project, tokens):
    response = asgi_request("POST", ARCHIVE, {**tokens["member"], "Host": "evil.example"}, b"x")
    assert response.status_code == 400
    assert not Experiment.objects.exists()


def test_route_stays_documented_in_the_schema(client):
    operation = client.get("/api/v1/openapi.json").json()["paths"]["/api/v1/projects/{slug}/experiments/archive"][
        "post"
    ]
    assert set(operation["requestBody"]["content"]) == {"application/x-tar", "application/gzip"}
    assert {"201", "409", "413"} <= set(operation["responses"])


def test_archive_with_the_broker_down_is_accepted_and_kept(project, tokens, broker_down):
    data = tar_bytes({"aichor_manifests/manifest.yaml": "x: 1\n"})
    response = upload(tokens["member"], data)
    # Committed and kept for reconcile: 202 with the experiment, not a 500 nor a lost archive.
    assert response.status_code == 202, response.content
    experiment = Experiment.objects.get(pk=response.json()["id"])
    assert experiment.status == "Created"
    assert default_storage.exists(experiment.archive)
