"""Archives straight to object storage (a real SeaweedFS): the server authorises and signs, the
parts go to the archive bucket without passing through it, and completing checks size and
SHA-256 before an experiment exists. Bad input gets a clear answer and loses nothing."""

import base64
import hashlib
import io
import os
import tarfile
import uuid

import pytest
import requests
from django.core.files.storage import default_storage

from experiments.archives import sweep_orphan_archives
from experiments.models import Experiment
from experiments.pipeline import run_clone, workdir_of
from projects.services import create_api_token
from tests.datasets.conftest import s3_server, use_s3  # noqa: F401 (the session's S3 server)
from tests.helpers import manifest_yaml

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.s3]

MiB = 1024 * 1024
UPLOADS = "/api/v1/projects/vision/experiments/uploads"


@pytest.fixture
def s3(settings, s3_server):  # noqa: F811
    use_s3(settings, s3_server)
    # A bucket per test: what one test leaves never shows in another's sweep.
    settings.AICHOR_ARCHIVE_BUCKET = f"archives-{uuid.uuid4().hex[:12]}"
    settings.AICHOR_ARCHIVE_PART_MB = 5
    return s3_server.client()


class Api:
    def __init__(self, client, user) -> None:
        self.client, self.headers = client, {"HTTP_AUTHORIZATION": f"Bearer {create_api_token(user)}"}

    def post(self, path: str, body: dict):
        return self.client.post(path, body, content_type="application/json", **self.headers)

    def get(self, path: str):
        return self.client.get(path, **self.headers)

    def delete(self, path: str):
        return self.client.delete(path, **self.headers)

    def start(self, data: bytes, fingerprint: str | None = None, **extra):
        body = {"size": len(data), "fingerprint": fingerprint or uuid.uuid4().hex * 2, **extra}
        return self.post(UPLOADS, body)

    def sign(self, upload: str, parts: dict[int, bytes]):
        return self.post(
            f"{UPLOADS}/{upload}/parts", {"parts": [{"number": n, "sha256": sha(b)} for n, b in parts.items()]}
        )

    def complete(self, upload: str, parts: dict[int, bytes], **extra):
        body = {"parts": [{"number": n, "sha256": sha(b)} for n, b in parts.items()], **extra}
        return self.post(f"{UPLOADS}/{upload}/complete", body)


@pytest.fixture
def member_api(client, member_user, project):
    return Api(client, member_user)


def sha(data: bytes) -> str:
    return base64.b64encode(hashlib.sha256(data).digest()).decode()


def split(data: bytes, part_size: int) -> dict[int, bytes]:
    return {i // part_size + 1: data[i : i + part_size] for i in range(0, len(data), part_size)}


def put(signed: dict, body: bytes) -> requests.Response:
    return requests.put(signed["url"], data=body, headers=signed["headers"], timeout=60)


def send(api: Api, upload: str, parts: dict[int, bytes]) -> None:
    for signed in api.sign(upload, parts).json()["parts"]:
        response = put(signed, parts[signed["number"]])
        assert response.status_code == 200, response.text


def tar_of(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def objects(s3, bucket: str) -> list[str]:
    try:
        return [o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])]
    except s3.exceptions.NoSuchBucket:
        return []


def pending_uploads(s3, bucket: str) -> list[dict]:
    try:
        return s3.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
    except s3.exceptions.NoSuchBucket:
        return []


# --- The path -----------------------------------------------------------------------------
def server_disk_archives() -> list[str]:
    """The archives stored on the server's own disk (the filesystem path's storage)."""
    return sorted(default_storage.listdir("archives")[1]) if default_storage.exists("archives") else []


def test_archive_goes_to_the_bucket_and_the_clone_reads_it_from_there(s3, member_api, settings, member_user):
    # Other tests of this process may have stored archives on the server's disk: none more here.
    on_disk = server_disk_archives()
    blob = os.urandom(11 * MiB)
    data = tar_of({"aichor_manifests/manifest.yaml": manifest_yaml("true").encode(), "src/blob.bin": blob})
    started = member_api.start(data, message="from laptop")
    assert started.status_code == 201, started.content
    upload = started.json()
    assert (upload["method"], upload["parts"], upload["part_size"], upload["uploaded"]) == ("multipart", 3, 5 * MiB, [])

    send(member_api, upload["upload"], split(data, upload["part_size"]))
    done = member_api.complete(upload["upload"], split(data, upload["part_size"]), message="from laptop")
    assert done.status_code == 201, done.content
    experiment = Experiment.objects.get(pk=done.json()["id"])
    assert experiment.author == member_user and experiment.message == "from laptop"
    bucket = settings.AICHOR_ARCHIVE_BUCKET
    assert experiment.archive.startswith(f"s3://{bucket}/archives/")
    key = experiment.archive.removeprefix(f"s3://{bucket}/")
    assert s3.get_object(Bucket=bucket, Key=key)["Body"].read() == data
    assert server_disk_archives() == on_disk  # nothing went through the server's disk

    run_clone(experiment.pk)
    experiment.refresh_from_db()
    assert experiment.status != "Failed", experiment.failure_reason
    assert (workdir_of(experiment.pk) / "src/blob.bin").read_bytes() == blob


def test_filesystem_backend_keeps_the_streaming_path(member_api, settings):
    settings.AICHOR_STORAGE = "filesystem"
    response = member_api.start(b"x" * 100)
    assert response.status_code == 200 and response.json()["method"] == "stream"


# --- Who may ------------------------------------------------------------------------------
def test_outsider_gets_404_and_no_token_401(s3, client, outsider_user, member_api, settings):
    outsider = Api(client, outsider_user)
    assert outsider.start(b"x" * 100).status_code == 404
    upload = member_api.start(b"x" * 100).json()["upload"]
    for response in (
        outsider.get(f"{UPLOADS}/{upload}"),
        outsider.sign(upload, {1: b"x" * 100}),
        outsider.complete(upload, {1: b"x" * 100}),
        outsider.delete(f"{UPLOADS}/{upload}"),
    ):
        assert response.status_code == 404
    assert client.post(UPLOADS, {"size": 1}, content_type="application/json").status_code == 401


def test_another_members_upload_id_is_404(s3, client, admin_user, member_api):
    upload = member_api.start(b"x" * 100).json()["upload"]
    admin = Api(client, admin_user)
    assert admin.get(f"{UPLOADS}/{upload}").status_code == 404
    assert admin.complete(upload, {1: b"x" * 100}).status_code == 404


def test_forged_upload_id_is_404(s3, member_api):
    upload = member_api.start(b"x" * 100).json()["upload"]
    forged = upload[:-3] + ("aaa" if not upload.endswith("aaa") else "bbb")
    response = member_api.get(f"{UPLOADS}/{forged}")
    assert response.status_code == 404 and response.json()["detail"] == "no such upload"
    assert member_api.sign(forged, {1: b"x" * 100}).status_code == 404


def test_expired_upload_id_is_410_saying_to_run_again(s3, member_api, settings):
    data = b"x" * 100
    upload = member_api.start(data).json()["upload"]
    settings.ARCHIVE_UPLOAD_MAX_SECONDS = -1
    response = member_api.complete(upload, {1: data})
    assert response.status_code == 410
    assert "expired" in response.json()["detail"] and "submit local" in response.json()["detail"]
    assert not Experiment.objects.exists()


def test_an_upload_the_sweep_aborted_is_410(s3, member_api):
    data = b"x" * 100
    upload = member_api.start(data).json()["upload"]
    send(member_api, upload, {1: data})
    sweep_orphan_archives(max_age_seconds=-60)
    response = member_api.complete(upload, {1: data})
    assert response.status_code == 410 and "run `aichor experiments submit local` again" in response.json()["detail"]


# --- Bad sizes and checksums ----------------------------------------------------------------
def test_oversized_is_413_before_any_upload_exists(s3, member_api, settings):
    settings.MAX_ARCHIVE_BYTES = 4096
    response = member_api.start(b"x" * 4097)
    assert response.status_code == 413
    assert response.json()["detail"] == "the archive (4097 bytes) is larger than the limit of 4096 bytes"
    assert pending_uploads(s3, settings.AICHOR_ARCHIVE_BUCKET) == []


def test_bytes_other_than_signed_are_refused_by_storage_and_the_right_ones_still_complete(s3, member_api):
    data = os.urandom(1000)
    upload = member_api.start(data).json()["upload"]
    signed = member_api.sign(upload, {1: data}).json()["parts"][0]
    refused = put(signed, data[:-1] + b"!")
    assert refused.status_code == 400 and "BadDigest" in refused.text
    assert put({**signed, "headers": {}}, data).status_code == 403  # the checksum header is signed in
    assert put(signed, data).status_code == 200
    assert member_api.complete(upload, {1: data}).status_code == 201


def test_a_missing_part_is_409_and_the_upload_is_kept(s3, member_api):
    data = os.urandom(11 * MiB)
    upload = member_api.start(data).json()
    parts = split(data, upload["part_size"])
    send(member_api, upload["upload"], {1: parts[1], 2: parts[2]})
    response = member_api.complete(upload["upload"], parts)
    assert response.status_code == 409
    assert response.json()["detail"] == "the upload is incomplete: part(s) 3 of 3 not received"
    send(member_api, upload["upload"], {3: parts[3]})
    assert member_api.complete(upload["upload"], parts).status_code == 201


def test_a_part_of_the_wrong_size_is_409_naming_it(s3, member_api):
    data = os.urandom(6 * MiB)
    upload = member_api.start(data).json()
    short = {1: data[: 5 * MiB - 1], 2: data[5 * MiB :]}
    send(member_api, upload["upload"], short)
    response = member_api.complete(upload["upload"], short)
    assert response.status_code == 409
    assert response.json()["detail"] == f"part 1 holds {5 * MiB - 1} bytes, expected {5 * MiB}: send it again"
    assert not Experiment.objects.exists()


def test_wrong_checksums_at_completion_discard_the_upload_and_create_nothing(s3, member_api, settings):
    data = os.urandom(1000)
    upload = member_api.start(data).json()["upload"]
    send(member_api, upload, {1: data})
    response = member_api.complete(upload, {1: b"other bytes"})
    assert response.status_code == 409 and "do not match their SHA-256" in response.json()["detail"]
    assert not Experiment.objects.exists()
    assert objects(s3, settings.AICHOR_ARCHIVE_BUCKET) == []
    assert member_api.get(f"{UPLOADS}/{upload}").status_code == 410


def test_part_numbers_outside_the_upload_are_422(s3, member_api):
    upload = member_api.start(b"x" * 100).json()["upload"]
    response = member_api.sign(upload, {2: b"x"})
    assert response.status_code == 422 and "outside this upload's parts 1 to 1" in response.json()["detail"]


# --- Resuming -------------------------------------------------------------------------------
def test_starting_again_for_the_same_tree_resumes_its_upload(s3, member_api):
    data = os.urandom(11 * MiB)
    fingerprint = hashlib.sha256(b"tree").hexdigest()
    first = member_api.start(data, fingerprint).json()
    parts = split(data, first["part_size"])
    send(member_api, first["upload"], {1: parts[1]})

    again = member_api.start(data, fingerprint).json()
    assert [(p["number"], p["size"]) for p in again["uploaded"]] == [(1, 5 * MiB)]
    other = member_api.start(data, hashlib.sha256(b"another tree").hexdigest()).json()
    assert other["uploaded"] == []

    send(member_api, again["upload"], {2: parts[2], 3: parts[3]})
    assert member_api.complete(again["upload"], parts).status_code == 201


def test_abandoning_an_upload_removes_its_parts(s3, member_api, settings):
    data = b"x" * 100
    upload = member_api.start(data).json()["upload"]
    send(member_api, upload, {1: data})
    assert member_api.delete(f"{UPLOADS}/{upload}").status_code == 204
    assert pending_uploads(s3, settings.AICHOR_ARCHIVE_BUCKET) == []


# --- The sweep ------------------------------------------------------------------------------
def test_sweep_removes_unreferenced_archives_and_idle_uploads_in_the_bucket(s3, member_api, project, settings):
    bucket = settings.AICHOR_ARCHIVE_BUCKET
    data = b"x" * 100
    names = []
    for _ in range(2):
        upload = member_api.start(data).json()["upload"]
        send(member_api, upload, {1: data})
        names.append(member_api.complete(upload, {1: data}).json()["archive"])
    referenced, orphan = names
    Experiment.objects.exclude(archive=referenced).delete()  # as if its row never got written
    idle = member_api.start(data).json()["upload"]
    send(member_api, idle, {1: data})

    # Nothing in the bucket is old yet (the server's disk may hold other tests' archives).
    assert [n for n in sweep_orphan_archives() if n.startswith(f"s3://{bucket}/")] == []
    assert len(pending_uploads(s3, bucket)) == 1

    removed = [n for n in sweep_orphan_archives(max_age_seconds=-60) if n.startswith(f"s3://{bucket}/")]
    assert orphan in removed and referenced not in removed
    assert [n for n in removed if n.endswith("(incomplete upload)")] and len(removed) == 2
    assert objects(s3, bucket) == [referenced.removeprefix(f"s3://{bucket}/")]
    assert pending_uploads(s3, bucket) == []
