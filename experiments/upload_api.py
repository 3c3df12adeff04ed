"""API routes for sending an archive straight to object storage (experiments.multipart): start
(or resume) an upload, sign part URLs, complete it into an experiment, or abandon it. On the
filesystem backend, start answers `method: stream`: the archive is POSTed to
/projects/{slug}/experiments/archive as before."""

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

from django.conf import settings
from django.http import HttpRequest
from ninja import Field, Router, Schema
from ninja.errors import HttpError
from ninja.responses import Status as Reply

from datasets.storage import is_s3
from experiments import multipart, services
from experiments.api import ArchiveParams, Error, ExperimentOut, _created
from experiments.archives import delete_archive
from experiments.models import Experiment
from projects.access import get_project

router = Router(tags=["experiments"])

SHA256_B64 = r"^[A-Za-z0-9+/]{43}=$"


class UploadIn(ArchiveParams):
    size: int = Field(..., ge=1, description="the archive's exact length in bytes")
    fingerprint: str = Field(
        ...,
        pattern=r"^[0-9a-f]{64}$",
        description="SHA-256 (hex) of the archive's tar headers: announcing the same one again resumes the "
        "upload left by an interrupted run",
    )


class PartIn(Schema):
    number: int = Field(..., ge=1, le=multipart.MAX_PARTS)
    sha256: str = Field(..., pattern=SHA256_B64, description="the part's SHA-256, base64")


class PartsIn(Schema):
    parts: list[PartIn] = Field(..., min_length=1, max_length=multipart.MAX_PARTS)


class CompleteIn(ArchiveParams):
    parts: list[PartIn] = Field(..., min_length=1, max_length=multipart.MAX_PARTS, description="every part, once")


class UploadedPart(Schema):
    number: int
    size: int
    sha256: str = Field("", description="as S3 reports it; empty when it does not")


class UploadOut(Schema):
    method: Literal["multipart", "stream"] = Field(
        ..., description="stream: POST the archive to /projects/{slug}/experiments/archive instead"
    )
    upload: str = Field("", description="the upload's id for the routes below")
    size: int = 0
    part_size: int = Field(0, description="every part but the last is this long")
    parts: int = Field(0, description="how many parts")
    uploaded: list[UploadedPart] = Field([], description="parts already held (an interrupted upload resumed)")


class SignedPart(Schema):
    number: int
    url: str = Field(..., description="PUT the part's bytes here, with the headers below")
    headers: dict[str, str]


class SignedOut(Schema):
    parts: list[SignedPart]


def _out(upload: multipart.Upload, uploaded: list[multipart.Part]) -> dict:
    return {
        "method": "multipart",
        "upload": upload.token,
        "size": upload.size,
        "part_size": upload.part_size,
        "parts": upload.parts,
        "uploaded": [{"number": p.number, "size": p.size, "sha256": p.sha256} for p in uploaded],
    }


@contextmanager
def _answering() -> Iterator[None]:
    """An UploadError as the API's answer: its status and reason."""
    try:
        yield
    except multipart.UploadError as exc:
        raise HttpError(exc.status, exc.detail) from None


def _find(request: HttpRequest, slug: str, upload: str):
    project, _ = get_project(request.auth, slug)
    with _answering():
        return project, multipart.find_upload(project, request.auth, upload)


def _digests(parts: list[PartIn]) -> dict[int, str]:
    digests: dict[int, str] = {}
    for part in parts:
        if digests.setdefault(part.number, part.sha256) != part.sha256:
            raise HttpError(422, f"part {part.number} is given twice with different checksums")
    return digests


GONE = {404: Error, 410: Error, 422: Error, 502: Error}


@router.post(
    "/projects/{slug}/experiments/uploads",
    response={200: UploadOut, 201: UploadOut, 409: Error, 413: Error, 502: Error},
    summary="Start (or resume) sending an archive straight to object storage",
    description="201 with an upload to send in parts when archives live in object storage; 200 with "
    "`method: stream` on the filesystem backend. Larger than the server's limit is 413; an engine the "
    "project lacks is 409. Nothing is created until the upload is completed.",
)
def start_upload(request: HttpRequest, slug: str, payload: UploadIn):
    project, _ = get_project(request.auth, slug)
    services.chosen_engine(project, payload.engine)  # 409 now rather than after the upload
    limit = settings.MAX_ARCHIVE_BYTES
    if payload.size > limit:
        raise HttpError(413, f"the archive ({payload.size} bytes) is larger than the limit of {limit} bytes")
    if not is_s3():
        return Reply(200, {"method": "stream"})
    with _answering():
        upload, uploaded = multipart.start_upload(project, request.auth, payload.size, payload.fingerprint)
    return Reply(201, _out(upload, uploaded))


@router.get(
    "/projects/{slug}/experiments/uploads/{upload}",
    response={200: UploadOut, **GONE},
    summary="An upload and the parts already received",
)
def upload_state(request: HttpRequest, slug: str, upload: str):
    _, found = _find(request, slug, upload)
    with _answering():
        return _out(found, multipart.uploaded_parts(found))


@router.post(
    "/projects/{slug}/experiments/uploads/{upload}/parts",
    response={200: SignedOut, **GONE},
    summary="Presigned URLs for parts, each accepting only bytes with the given SHA-256",
)
def sign_parts(request: HttpRequest, slug: str, upload: str, payload: PartsIn):
    _, found = _find(request, slug, upload)
    with _answering():
        signed = multipart.sign_parts(found, _digests(payload.parts))
    return {"parts": [{"number": n, "url": url, "headers": headers} for n, (url, headers) in signed.items()]}


@router.post(
    "/projects/{slug}/experiments/uploads/{upload}/complete",
    response={201: ExperimentOut, 202: ExperimentOut, 409: Error, **GONE},
    summary="Complete an upload: check its size and checksum, then run it as an experiment",
    description="409 when a part is missing or has the wrong size (the upload is kept: send the part and "
    "complete again) or when the parts do not match their checksums (the upload is discarded). 202 "
    "instead of 201 when the task queue is unreachable (started later by reconcile).",
)
def complete_upload(request: HttpRequest, slug: str, upload: str, payload: CompleteIn):
    project, found = _find(request, slug, upload)
    engine = services.chosen_engine(project, payload.engine)
    with _answering():
        archive = multipart.complete_upload(found, _digests(payload.parts))
    try:
        experiment = services.create_experiment(
            project=project,
            engine=engine,
            source=Experiment.Source.ARCHIVE,
            archive=archive,
            message=payload.message,
            author=request.auth,
            manifest_path=payload.manifest_path,
        )
    except BaseException:
        delete_archive(archive)  # no experiment will ever reference it
        raise
    return _created(experiment)


@router.delete(
    "/projects/{slug}/experiments/uploads/{upload}",
    response={204: None, **GONE},
    summary="Abandon an upload (its parts are removed)",
)
def abort_upload(request: HttpRequest, slug: str, upload: str):
    _, found = _find(request, slug, upload)
    with _answering():
        multipart.abort_upload(found)
    return Reply(204, None)
