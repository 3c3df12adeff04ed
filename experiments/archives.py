"""Uploaded code archives: where they live, reading them back, and removing the ones nothing uses.

Filesystem backend: default storage, `archives/<uuid>.tar`, streamed in by experiments.upload.
S3 backend: the archive bucket (settings.AICHOR_ARCHIVE_BUCKET), sent there by the CLI with a
presigned multipart upload (experiments.multipart); Experiment.archive then reads
`s3://<bucket>/<key>`. The name says where the archive is, so an experiment can still be
resubmitted after the backend changed.

An upload cut short (the server killed mid-stream, a CLI interrupted and never re-run, a crash
between the storage write and the experiment row) leaves a file, an object or an incomplete
multipart upload that no experiment references. The sweep removes them once old (or idle) long
enough that no upload can still be writing them or about to link them."""

import io
import logging
from datetime import datetime, timedelta
from functools import lru_cache

from botocore.exceptions import BotoCoreError, ClientError
from django.conf import settings
from django.core.files.storage import default_storage
from django.utils import timezone

from datasets.storage import is_s3, s3_client, s3_options
from experiments.models import Experiment

log = logging.getLogger(__name__)

ARCHIVES_DIR = "archives"
S3_SCHEME = "s3://"


def s3_name(bucket: str, key: str) -> str:
    return f"{S3_SCHEME}{bucket}/{key}"


def split_s3_name(name: str) -> tuple[str, str] | None:
    """(bucket, key) of an archive in object storage; None for one in default storage."""
    if not name.startswith(S3_SCHEME):
        return None
    bucket, _, key = name[len(S3_SCHEME) :].partition("/")
    return bucket, key


def error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def archive_bucket() -> str:
    """The archive bucket, created on first use (harmless when it exists)."""
    return _ensured_bucket(settings.AICHOR_ARCHIVE_BUCKET, s3_options())


# Per bucket and S3 options: a settings change (tests switch servers) checks again.
@lru_cache(maxsize=16)
def _ensured_bucket(bucket: str, options: tuple) -> str:
    try:
        s3_client(bucket).create_bucket(Bucket=bucket)
    except ClientError as exc:
        if error_code(exc) not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
            raise
    return bucket


def open_archive(name: str) -> io.RawIOBase:
    """The archive as a file read front to back (tarfile's stream mode): from default storage,
    or straight from the object's GET body, never spooled to disk first as S3Storage.open would.
    FileNotFoundError when it is gone; OSError for any other failure to read it."""
    where = split_s3_name(name)
    if where is None:
        return default_storage.open(name, "rb")
    bucket, key = where
    try:
        body = s3_client(bucket).get_object(Bucket=bucket, Key=key)["Body"]
    except ClientError as exc:
        if error_code(exc) in ("NoSuchKey", "NoSuchBucket", "404"):
            raise FileNotFoundError(name) from None
        raise OSError(f"cannot read {name}: {error_code(exc) or exc}") from None
    except BotoCoreError as exc:
        raise OSError(f"cannot read {name}: {exc}") from None
    return _ObjectBody(body)


class _ObjectBody(io.RawIOBase):
    """A GET body whose read failures are OSErrors, as for a file (the clone step reports them)."""

    def __init__(self, body) -> None:
        self.body = body

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        try:
            data = self.body.read(len(buffer))
        except (BotoCoreError, ValueError) as exc:
            raise OSError(f"reading the archive from object storage failed: {exc}") from None
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            self.body.close()
        super().close()


def delete_archive(name: str) -> None:
    where = split_s3_name(name)
    if where is None:
        default_storage.delete(name)
    else:
        s3_client(where[0]).delete_object(Bucket=where[0], Key=where[1])


# --- The sweep -----------------------------------------------------------------------------
def sweep_orphan_archives(max_age_seconds: float | None = None) -> list[str]:
    """Delete archives older than `max_age_seconds` that no experiment references, in default
    storage and, on the S3 backend, in the archive bucket, and abort multipart uploads idle that
    long; returns what was removed."""
    if max_age_seconds is None:
        max_age_seconds = settings.ORPHAN_ARCHIVE_SECONDS
    cutoff = timezone.now() - timedelta(seconds=max_age_seconds)
    removed = _sweep_default_storage(cutoff)
    if is_s3():
        removed += _sweep_bucket(cutoff)
    if removed:
        log.info("removed %d orphan archive(s): %s", len(removed), ", ".join(removed))
    return removed


def _unreferenced(old: list[str]) -> list[str]:
    # Checked after the ages: an archive linked while we looked is seen as referenced.
    referenced = set(Experiment.objects.filter(archive__in=old).values_list("archive", flat=True))
    return [name for name in old if name not in referenced]


def _sweep_default_storage(cutoff: datetime) -> list[str]:
    # By modification time: a file still being written keeps getting fresher.
    if not default_storage.exists(ARCHIVES_DIR):
        return []
    _, files = default_storage.listdir(ARCHIVES_DIR)
    old = []
    for name in files:
        path = f"{ARCHIVES_DIR}/{name}"
        try:
            if default_storage.get_modified_time(path) < cutoff:
                old.append(path)
        except FileNotFoundError:
            continue  # removed meanwhile
    removed = _unreferenced(old)
    for path in removed:
        default_storage.delete(path)
    return removed


def _sweep_bucket(cutoff: datetime) -> list[str]:
    bucket = settings.AICHOR_ARCHIVE_BUCKET
    client = s3_client(bucket)
    try:
        # An object exists only once its upload completed, so its time is final.
        old = [
            s3_name(bucket, item["Key"])
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{ARCHIVES_DIR}/")
            for item in page.get("Contents", [])
            if item["LastModified"] < cutoff
        ]
        uploads = [
            upload
            for page in client.get_paginator("list_multipart_uploads").paginate(
                Bucket=bucket, Prefix=f"{ARCHIVES_DIR}/"
            )
            for upload in page.get("Uploads", [])
            if upload["Initiated"] < cutoff
        ]
    except ClientError as exc:
        if error_code(exc) == "NoSuchBucket":
            return []  # no archive was ever sent here
        raise
    removed = _unreferenced(old)
    for name in removed:
        client.delete_object(Bucket=bucket, Key=split_s3_name(name)[1])
    for upload in uploads:
        # Idle, not merely old: a large upload on a slow link may take longer than the cutoff,
        # and each part it sends keeps it alive.
        try:
            pages = client.get_paginator("list_parts").paginate(
                Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"]
            )
            if any(part["LastModified"] >= cutoff for page in pages for part in page.get("Parts", [])):
                continue
            client.abort_multipart_upload(Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])
        except ClientError as exc:
            if error_code(exc) == "NoSuchUpload":
                continue  # completed or aborted meanwhile
            raise
        removed.append(f"{s3_name(bucket, upload['Key'])} (incomplete upload)")
    return removed
