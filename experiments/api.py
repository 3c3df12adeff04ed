"""API routes for experiments: list, detail, steps, logs (follow by streaming), cancel,
resubmit, and submission from a pushed commit or from an uploaded archive."""

import asyncio
import base64
import binascii
import uuid
from datetime import datetime

from asgiref.sync import sync_to_async
from django.db.models import Q
from django.http import HttpRequest, HttpResponse, StreamingHttpResponse
from ninja import Field, Query, Router, Schema
from ninja.errors import HttpError
from ninja.responses import Status as Reply
from pydantic import field_validator

from aichor.lib.git import GitInputError, check_branch
from experiments import queue, services
from experiments.access import get_experiment
from experiments.logs import read_log, streams
from experiments.logview import MAX_LINES, follow_ended, tail
from experiments.models import Experiment, Status
from projects.access import get_project

router = Router(tags=["experiments"])

DEFAULT_MANIFEST = "aichor_manifests/manifest.yaml"
FOLLOW_POLL_SECONDS = 0.5


# --- schemas -----------------------------------------------------------------------------
class ResourcesOut(Schema):
    """What the manifest asks for while every process that runs at once runs."""

    processes: int
    cpus: int | float
    gpus: int
    gpus_by_type: dict[str, int] = Field(
        ..., description='GPUs by the product, else the type, the manifest names; "" when neither'
    )
    memory_gb: int | float
    tpu_chips: int


class ExperimentOut(Schema):
    id: uuid.UUID
    short_id: str
    project: str = Field(..., alias="project.slug")
    engine: str = Field(..., alias="engine.name")
    source: str
    commit_sha: str
    branch: str
    commit_url: str
    archive: str
    message: str
    author: str = Field(..., alias="author_name")
    manifest_path: str
    status: str
    current_step: str
    exit_code: int | None
    failure_reason: str
    waiting_reason: str = Field(..., description="why it is still Waiting (an engine limit); empty otherwise")
    resubmitted_from: uuid.UUID | None = Field(None, alias="resubmitted_from_id")
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    is_terminal: bool
    resources: ResourcesOut | None = Field(None, description="null until Cloning has read the manifest")

    @staticmethod
    def resolve_resources(experiment: Experiment) -> dict | None:
        # From the row's stored manifest: no query, so the list costs the same with totals.
        return experiment.typed_manifest.totals().as_json() if experiment.manifest else None


class ExperimentPage(Schema):
    items: list[ExperimentOut]
    next: str | None = Field(None, description="pass as `cursor` for the next (older) page")


class StepOut(Schema):
    name: str
    status: str
    started_at: datetime | None
    ended_at: datetime | None


class Error(Schema):
    detail: str


class ListFilters(Schema):
    status: Status | None = None
    engine: str | None = Field(None, max_length=64)
    author: str | None = Field(None, max_length=255, description="author name, exact")
    q: str | None = Field(None, max_length=200, description="text in the message, or an id prefix")
    cursor: str | None = Field(None, max_length=200)
    limit: int = Field(50, ge=1, le=200)


def check_manifest_path(path: str) -> str:
    """Relative to the code's root, inside it, a YAML file (as the webhook's rule)."""
    if not path.endswith((".yaml", ".yml")):
        raise ValueError("the manifest path must end in .yaml or .yml")
    if path.startswith("/") or "\\" in path or ".." in path or any(ord(c) < 32 for c in path):
        raise ValueError("the manifest path must be relative, without '..' or '\\'")
    return path


def check_git_branch(name: str) -> str:
    # Same rules as the webhooks and the pipeline: a branch reaches `git fetch`.
    try:
        return check_branch(name)
    except GitInputError as exc:
        raise ValueError(str(exc)) from None


class CommitIn(Schema):
    sha: str = Field(..., pattern=r"^[0-9a-fA-F]{7,64}$", description="7 to 64 hexadecimal characters")
    branch: str = Field(
        ..., min_length=1, max_length=255, description="a branch name (`git check-ref-format --branch`)"
    )
    manifest_path: str = Field(DEFAULT_MANIFEST, max_length=500)
    message: str = Field("", max_length=10000)
    engine: str | None = Field(None, max_length=64, description="engine name; the project default when empty")

    _manifest = field_validator("manifest_path")(check_manifest_path)
    _branch = field_validator("branch")(check_git_branch)


class ArchiveParams(Schema):
    manifest_path: str = Field(DEFAULT_MANIFEST, max_length=500)
    message: str = Field("", max_length=10000)
    engine: str | None = Field(None, max_length=64)

    _manifest = field_validator("manifest_path")(check_manifest_path)


class LogParams(Schema):
    stream: str | None = Field(
        None, max_length=100, description='"process:<name>" or "step:<Step>"; every process when empty'
    )
    follow: bool = Field(False, description="keep streaming until the experiment ends")
    tail: int | None = Field(
        None, ge=1, le=MAX_LINES, description="only the last lines of each stream (not with follow)"
    )

    @field_validator("stream")
    @classmethod
    def _printable(cls, value: str | None) -> str | None:
        # A stream name is looked up in the database, which refuses NUL in text.
        if value is not None and any(ord(c) < 32 for c in value):
            raise ValueError("a stream name has no control characters")
        return value


# --- helpers -----------------------------------------------------------------------------
def _encode_cursor(experiment: Experiment) -> str:
    return base64.urlsafe_b64encode(f"{experiment.created_at.isoformat()}|{experiment.pk}".encode()).decode()


def _decode_cursor(cursor: str) -> Q | None:
    try:
        stamp, _, pk = base64.urlsafe_b64decode(cursor.encode()).decode().partition("|")
        created, pk = datetime.fromisoformat(stamp), uuid.UUID(pk)
    except (ValueError, binascii.Error, UnicodeDecodeError):
        return None
    if created.tzinfo is None:
        return None
    return Q(created_at__lt=created) | Q(created_at=created, id__lt=pk)


# --- routes ------------------------------------------------------------------------------
@router.get("/projects/{slug}/experiments", response=ExperimentPage, summary="A project's experiments, newest first")
def list_experiments(request: HttpRequest, slug: str, filters: Query[ListFilters]):
    project, _ = get_project(request.auth, slug)
    qs = Experiment.objects.filter(project=project).select_related("project", "engine").order_by("-created_at", "-id")
    if filters.status:
        qs = qs.filter(status=filters.status)
    if filters.engine:
        qs = qs.filter(engine__name=filters.engine)
    if filters.author:
        qs = qs.filter(author_name=filters.author)
    if filters.q:
        qs = qs.filter(Q(message__icontains=filters.q) | Q(id__startswith=filters.q.lower()))
    if filters.cursor:
        after = _decode_cursor(filters.cursor)
        if after is None:
            raise HttpError(400, "invalid cursor")
        qs = qs.filter(after)
    page = list(qs[: filters.limit + 1])
    more = len(page) > filters.limit
    page = page[: filters.limit]
    return {"items": page, "next": _encode_cursor(page[-1]) if more else None}


def _created(experiment: Experiment) -> Reply:
    """201, or 202 when the broker refused the task: the experiment is committed and waits in
    Created for reconcile, which starts it later."""
    return Reply(202 if queue.refused(experiment.pk) else 201, experiment)


@router.post(
    "/projects/{slug}/experiments",
    response={201: ExperimentOut, 202: ExperimentOut, 409: Error},
    summary="Run a pushed commit",
    description="202 instead of 201 when the task queue is unreachable: the experiment is kept and "
    "started later by the periodic reconcile.",
)
def submit_commit(request: HttpRequest, slug: str, payload: CommitIn):
    project, _ = get_project(request.auth, slug)
    experiment = services.create_experiment(
        project=project,
        engine=services.chosen_engine(project, payload.engine),
        source=Experiment.Source.GIT,
        commit_sha=payload.sha.lower(),
        branch=payload.branch,
        message=payload.message,
        author=request.auth,
        manifest_path=payload.manifest_path,
    )
    return _created(experiment)


@router.post(
    "/projects/{slug}/experiments/archive",
    response={201: ExperimentOut, 409: Error, 413: Error},
    summary="Run an uploaded tar archive of the code (the request body, streamed)",
    description="The body is a tar (or gzipped tar) of the code, streamed to storage as it arrives; "
    "larger than the server's limit is answered 413. An empty body or an engine the project lacks is 409.",
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/x-tar": {"schema": {"type": "string", "format": "binary"}},
                "application/gzip": {"schema": {"type": "string", "format": "binary"}},
            },
        }
    },
)
def submit_archive(request: HttpRequest, slug: str, params: Query[ArchiveParams]):
    """Documents the route; aichor.asgi sends these POSTs to experiments.upload before Django
    sees them (Django would spool the whole body to disk first). Only a caller that bypasses
    aichor.asgi (Django's test client) lands here."""
    get_project(request.auth, slug)
    raise HttpError(501, "archive uploads are served by the ASGI application (aichor.asgi:application)")


@router.get("/experiments/{experiment_id}", response=ExperimentOut, summary="One experiment")
def experiment_detail(request: HttpRequest, experiment_id: str):
    return get_experiment(request.auth, experiment_id)[0]


@router.post("/experiments/{experiment_id}/cancel", response={200: ExperimentOut, 409: Error}, summary="Cancel")
def cancel(request: HttpRequest, experiment_id: str):
    experiment, _ = get_experiment(request.auth, experiment_id)
    services.cancel_experiment(experiment, actor=request.auth)
    return experiment


@router.post(
    "/experiments/{experiment_id}/resubmit",
    response={201: ExperimentOut, 202: ExperimentOut, 409: Error},
    summary="Run the same code and manifest again as a new experiment",
    description="202 instead of 201 when the task queue is unreachable (started later by reconcile).",
)
def resubmit(request: HttpRequest, experiment_id: str):
    experiment, _ = get_experiment(request.auth, experiment_id)
    return _created(services.resubmit_experiment(experiment, actor=request.auth))


@router.get("/experiments/{experiment_id}/steps", response=list[StepOut], summary="An experiment's steps, in order")
def experiment_steps(request: HttpRequest, experiment_id: str):
    experiment, _ = get_experiment(request.auth, experiment_id)
    return experiment.steps.order_by("position")


@router.get("/experiments/{experiment_id}/logs/streams", response=list[str], summary="Names of the stored logs")
def log_streams(request: HttpRequest, experiment_id: str):
    experiment, _ = get_experiment(request.auth, experiment_id)
    return streams(experiment.pk)


@router.get(
    "/experiments/{experiment_id}/logs",
    response={200: None},
    summary="Logs as text; with follow=true the response streams until the experiment ends",
    # An int key, as ninja's own: a "200" string beside it would be served as a second "200".
    openapi_extra={"responses": {200: {"description": "log text", "content": {"text/plain": {}}}}},
)
def experiment_logs(request: HttpRequest, experiment_id: str, params: Query[LogParams]):
    experiment, _ = get_experiment(request.auth, experiment_id)
    if params.tail and params.follow:
        raise HttpError(400, "tail and follow cannot be combined")
    if params.tail:
        return HttpResponse(
            _tail_text(experiment.pk, params.stream, params.tail), content_type="text/plain; charset=utf-8"
        )
    response = StreamingHttpResponse(
        _log_text(experiment.pk, params.stream, params.follow), content_type="text/plain; charset=utf-8"
    )
    # Proxies (nginx) must pass each chunk on as it comes, not buffer a followed log.
    response["X-Accel-Buffering"] = "no"
    response["Cache-Control"] = "no-cache"
    return response


def _wanted_streams(experiment_id, stream: str | None) -> list[str]:
    if stream:
        return [stream]
    return [s for s in streams(experiment_id) if s.startswith("process:")]


def _labelled(name: str, text: str, several: bool) -> str:
    if not several:
        return text
    label = name.split(":", 1)[1]
    return "".join(f"[{label}] {line}" for line in text.splitlines(keepends=True))


def _tail_text(experiment_id, stream: str | None, count: int) -> str:
    wanted = _wanted_streams(experiment_id, stream)
    texts = []
    for name in wanted:
        lines = tail(experiment_id, name, count)[1]
        texts.append(_labelled(name, "".join(f"{line}\n" for line in lines), len(wanted) > 1))
    return "".join(texts)


def _read_new(experiment_id, stream: str | None, seen: dict[str, int]) -> list[str]:
    """Text stored since the last call, per stream; lines prefixed with the process name
    when several processes write."""
    wanted = _wanted_streams(experiment_id, stream)
    texts = []
    for name in wanted:
        for chunk in read_log(experiment_id, name, after_seq=seen.get(name, -1), limit=200):
            seen[name] = chunk.seq
            texts.append(_labelled(name, chunk.text, len(wanted) > 1))
    return texts


async def _log_text(experiment_id, stream: str | None, follow: bool):
    seen: dict[str, int] = {}
    while True:
        # Terminal is read before the chunks, so the chunks read after it include the tail.
        ended = not follow or await sync_to_async(follow_ended)(experiment_id) is not None
        while texts := await sync_to_async(_read_new)(experiment_id, stream, seen):
            for text in texts:
                yield text
        if ended:
            return
        await asyncio.sleep(FOLLOW_POLL_SECONDS)
