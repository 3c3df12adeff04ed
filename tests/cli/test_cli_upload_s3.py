"""`aichor experiments submit local` against a server whose archives live in object storage (a
real SeaweedFS): the archive goes in parts straight to the bucket and runs from there, and a
re-run after an interruption sends only the parts still missing."""

import base64
import hashlib
import io
import json
import os
import tarfile
import uuid

import pytest
import requests
from django.core.files.storage import default_storage

from aichor.cli.pack import Layout, hash_range, iter_files, plan_tar
from aichor.cli.upload import fingerprint
from tests.cli.test_cli import write_repo
from tests.datasets.conftest import s3_server, use_s3  # noqa: F401 (the session's S3 server)

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.s3]

MiB = 1024 * 1024


@pytest.fixture
def s3(settings, s3_server):  # noqa: F811
    use_s3(settings, s3_server)
    settings.AICHOR_ARCHIVE_BUCKET = f"archives-{uuid.uuid4().hex[:12]}"
    settings.AICHOR_ARCHIVE_PART_MB = 5
    return s3_server.client()


def stored(s3, archive: str) -> bytes:
    bucket, _, key = archive.removeprefix("s3://").partition("/")
    return s3.get_object(Bucket=bucket, Key=key)["Body"].read()


def test_submit_local_sends_the_archive_straight_to_the_bucket_and_it_runs(
    s3, logged_in, tmp_path, settings, celery_worker_thread
):
    repo = tmp_path / "repo"
    write_repo(repo, "echo hello-from-s3; wc -c < weights.bin; cat data.txt")
    on_disk = set(default_storage.listdir("archives")[1]) if default_storage.exists("archives") else set()
    (repo / "weights.bin").write_bytes(os.urandom(12 * MiB))  # three parts of 5 MiB
    submitted = logged_in.run("experiments", "submit", "local", "--repo-dir", str(repo), "-m", "via s3", "--json")
    assert "upload" in submitted.stderr  # the progress bar
    experiment = json.loads(submitted.stdout)
    assert experiment["archive"].startswith(f"s3://{settings.AICHOR_ARCHIVE_BUCKET}/archives/")
    # The server's disk never saw it (other tests of this worker may have left archives there).
    after = set(default_storage.listdir("archives")[1]) if default_storage.exists("archives") else set()
    assert after == on_disk

    done = logged_in.wait_status(experiment["id"], ("Succeeded", "Failed", "Cancelled"))
    assert done["status"] == "Succeeded", done["failure_reason"]
    out = logged_in.run("experiments", "logs", experiment["id"]).stdout
    assert "hello-from-s3" in out and str(12 * MiB) in out and "payload-from-the-tree" in out


def test_a_rerun_after_an_interruption_sends_only_the_missing_parts(s3, logged_in, tmp_path, member_user):
    from projects.services import create_api_token

    repo = tmp_path / "repo"
    write_repo(repo, "true")
    (repo / "weights.bin").write_bytes(os.urandom(17 * MiB))  # four parts of 5 MiB
    # What the CLI plans for this tree, and the first two parts sent by a run that was then cut.
    digest = hashlib.sha256()
    members, length = plan_tar(repo, list(iter_files(repo)), digest)
    layout = Layout(members, length)
    api = requests.Session()
    api.headers["Authorization"] = f"Bearer {create_api_token(member_user)}"
    uploads = f"{logged_in.url}/api/v1/projects/vision/experiments/uploads"
    started = api.post(uploads, json={"size": length, "fingerprint": fingerprint(digest, length)}, timeout=30).json()
    assert started["parts"] == 4
    spans = {n: ((n - 1) * 5 * MiB, min(n * 5 * MiB, length)) for n in (1, 2)}
    digests = {n: base64.b64encode(hash_range(layout, *span)).decode() for n, span in spans.items()}
    signed = api.post(
        f"{uploads}/{started['upload']}/parts",
        json={"parts": [{"number": n, "sha256": d} for n, d in digests.items()]},
        timeout=30,
    ).json()["parts"]
    tar = b"".join(p if isinstance(p, bytes) else _read(p) for p in layout.pieces(0, length))
    for part in signed:
        start, end = spans[part["number"]]
        assert requests.put(part["url"], data=tar[start:end], headers=part["headers"], timeout=60).ok

    rerun = logged_in.run("experiments", "submit", "local", "--repo-dir", str(repo), "--json")
    assert "resuming an interrupted upload: 2 of 4 parts already uploaded" in rerun.stderr
    experiment = json.loads(rerun.stdout)
    archive = stored(s3, experiment["archive"])
    assert archive == tar
    with tarfile.open(fileobj=io.BytesIO(archive)) as unpacked:
        assert unpacked.extractfile("weights.bin").read() == (repo / "weights.bin").read_bytes()
    # The upload the cut run left is the one that was completed: none is left behind.
    assert not s3.list_multipart_uploads(Bucket=s3_bucket(experiment["archive"])).get("Uploads")


def test_a_tree_over_the_limit_is_refused_before_anything_is_sent(s3, logged_in, tmp_path, settings):
    from experiments.models import Experiment

    settings.MAX_ARCHIVE_BYTES = 4096
    repo = tmp_path / "repo"
    write_repo(repo, "true")
    (repo / "weights.bin").write_bytes(os.urandom(64 * 1024))
    result = logged_in.run("experiments", "submit", "local", "--repo-dir", str(repo), check=False)
    assert result.returncode == 1
    assert "larger than the limit of 4096 bytes (HTTP 413)" in result.stderr.strip().splitlines()[-1]
    assert not Experiment.objects.exists()


def s3_bucket(archive: str) -> str:
    return archive.removeprefix("s3://").partition("/")[0]


def _read(piece) -> bytes:
    member, offset, count = piece
    with open(member.path, "rb") as fh:
        fh.seek(offset)
        return fh.read(count)
