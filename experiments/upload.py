"""POST /api/v1/projects/<slug>/experiments/archive, served as a raw ASGI app ahead of Django.

Django's ASGIHandler reads a whole request body into a SpooledTemporaryFile before any view
runs, so a 1 GB archive would be written to disk twice and could not be refused early. Here the
body goes from the socket to default_storage through a pipe of a few MiB: when storage is slower
than the network the pipe fills, receive() is no longer called and uvicorn stops reading the
socket (its flow control), so memory stays bounded whatever the size.

The route keeps the REST API's contract (and stays documented in its OpenAPI schema, see
experiments/api.py): Bearer token, projects.access (outsider 404), the same query parameters,
201 with the experiment as JSON (202 when the task queue is down: reconcile starts it later), 409 for an engine the project lacks or an empty archive, 413
past settings.MAX_ARCHIVE_BYTES (declared or discovered while streaming).

This is the filesystem backend's path (and an older CLI's): on the S3 backend the CLI sends the
archive straight to the archive bucket instead (experiments.multipart, experiments.upload_api)."""

import asyncio
import json
import re
import threading
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qsl

import pydantic
from channels.db import database_sync_to_async
from django.conf import settings
from django.core.files import File
from django.core.files.storage import default_storage
from django.http import Http404
from django.http.request import split_domain_port, validate_host
from ninja.responses import NinjaJSONEncoder

from experiments import queue, services
from experiments.api import ArchiveParams, ExperimentOut
from experiments.models import Experiment
from projects.access import get_project
from projects.tokens import authenticate_token, bearer_of

ARCHIVE_PATH = re.compile(r"/api/v1/projects/(?P<slug>[^/]+)/experiments/archive")
PIECE = 1024 * 1024
# Bytes buffered between the socket and the storage write: the server's memory per upload.
PIPE_BYTES = 4 * PIECE
GZIP_TYPES = ("application/gzip", "application/x-gzip")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class TooLarge(Exception):
    pass


class ClientGone(Exception):
    pass


class Refusal(Exception):
    def __init__(self, status: int, detail: Any) -> None:
        super().__init__(detail)
        self.status, self.detail = status, detail


def route_archive_uploads(django_app: ASGIApp) -> ASGIApp:
    """Sends archive uploads to upload_archive, everything else (other methods on the same
    path included, so they get Django's 405) to Django."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            path = scope["path"]
            root = scope.get("root_path", "")
            match = ARCHIVE_PATH.fullmatch(path[len(root) :] if root and path.startswith(root) else path)
            if match:
                await upload_archive(scope, receive, send, match["slug"])
                return
        await django_app(scope, receive, send)

    return app


async def upload_archive(scope: Scope, receive: Receive, send: Send, slug: str) -> None:
    headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
    try:
        status, body = await _store_and_create(scope, receive, headers, slug)
    except Refusal as refusal:
        status, body = refusal.status, {"detail": refusal.detail}
    except ClientGone:
        return
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json; charset=utf-8")],
        }
    )
    await send({"type": "http.response.body", "body": json.dumps(body, cls=NinjaJSONEncoder).encode()})


async def _store_and_create(scope: Scope, receive: Receive, headers: dict[str, str], slug: str) -> tuple[int, dict]:
    _check_host(scope, headers)
    user = await database_sync_to_async(authenticate_token)(bearer_of(headers.get("authorization")))
    if user is None:
        raise Refusal(401, "Unauthorized")
    params = _params(scope)
    project, engine = await _target(user, slug, params.engine)
    limit = settings.MAX_ARCHIVE_BYTES
    try:
        declared = int(headers.get("content-length") or 0)
    except ValueError:
        declared = 0
    if declared > limit:
        raise Refusal(413, f"the archive ({declared} bytes) is larger than the limit of {limit} bytes")

    gzipped = headers.get("content-type", "").split(";")[0].strip().lower() in GZIP_TYPES
    name = f"archives/{uuid.uuid4()}.{'tar.gz' if gzipped else 'tar'}"
    stored = await _stream_to_storage(receive, name, limit)
    try:
        return await _create(project, engine, user, stored, params)
    except BaseException:
        await asyncio.to_thread(default_storage.delete, stored)
        raise


def _check_host(scope: Scope, headers: dict[str, str]) -> None:
    """The same Host check Django applies (a poisoned Host must not reach anything)."""
    host = headers.get("host") or (scope.get("server") or ("",))[0] or ""
    domain, _ = split_domain_port(host)
    allowed = settings.ALLOWED_HOSTS
    if settings.DEBUG and not allowed:
        allowed = [".localhost", "127.0.0.1", "[::1]"]
    if not domain or not validate_host(domain, allowed):
        raise Refusal(400, "Bad Request")


def _params(scope: Scope) -> ArchiveParams:
    # Last value wins for a repeated key, as Django's QueryDict.get.
    query = dict(parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True))
    try:
        return ArchiveParams.model_validate(query)
    except pydantic.ValidationError as exc:
        # The shape ninja gives a query validation error, so clients read both alike.
        raise Refusal(
            422, [{**e, "loc": ["query", *e["loc"]]} for e in exc.errors(include_url=False, include_context=False)]
        ) from None


@database_sync_to_async
def _target(user, slug: str, engine_name: str | None):
    try:
        project, _ = get_project(user, slug)
    except Http404:
        raise Refusal(404, "Not Found") from None
    try:
        return project, services.chosen_engine(project, engine_name)
    except services.ExperimentError as exc:
        raise Refusal(409, str(exc)) from None


@database_sync_to_async
def _create(project, engine, user, archive: str, params: ArchiveParams) -> tuple[int, dict]:
    try:
        experiment = services.create_experiment(
            project=project,
            engine=engine,
            source=Experiment.Source.ARCHIVE,
            archive=archive,
            message=params.message,
            author=user,
            manifest_path=params.manifest_path,
        )
    except services.ExperimentError as exc:
        raise Refusal(409, str(exc)) from None
    # 202 when the broker refused the task: the experiment is kept and reconcile starts it.
    status = 202 if queue.refused(experiment.pk) else 201
    return status, ExperimentOut.from_orm(experiment).model_dump()


# --- streaming -----------------------------------------------------------------------------
async def _stream_to_storage(receive: Receive, name: str, limit: int) -> str:
    pipe = _Pipe(asyncio.get_running_loop(), PIPE_BYTES)
    pump = asyncio.create_task(_pump(receive, pipe, limit))
    reader = _PipeReader(pipe)
    try:
        # Storage backends are synchronous (filesystem, boto3): the write runs in a thread and
        # pulls the pieces the event loop puts in the pipe.
        stored = await asyncio.to_thread(default_storage.save, name, _Upload(reader, name=name))
    except BaseException as exc:
        await asyncio.to_thread(default_storage.delete, name)
        if isinstance(exc, TooLarge):
            raise Refusal(413, str(exc)) from None
        raise
    finally:
        pump.cancel()
    if reader.total == 0:
        await asyncio.to_thread(default_storage.delete, stored)
        raise Refusal(409, "the archive is empty")
    return stored


async def _pump(receive: Receive, pipe: "_Pipe", limit: int) -> None:
    """Body messages into the pipe as they come, then b"" at the end; a failure is put in the
    pipe for the writer to raise."""
    total = 0
    try:
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ClientGone()
            body = message.get("body", b"")
            more = message.get("more_body", False)
            total += len(body)
            if total > limit:
                raise TooLarge(f"the archive is larger than the limit of {limit} bytes")
            if body:
                await pipe.put(body)
        pipe.put_nowait(b"")
    except (TooLarge, ClientGone) as exc:
        pipe.put_nowait(exc)
    except asyncio.CancelledError:
        pipe.put_nowait(ClientGone())  # never leave the writer's thread waiting
        raise


class _Pipe:
    """Body pieces from the event loop to the storage writer's thread. The event loop is the
    upload's bottleneck (it parses every byte of HTTP), so the pipe costs it as little as it
    can: a lock and an append per piece, no copy, and a wake-up from the writer only when the
    pipe was full. Pieces are joined into the sizes storage asks for in the writer's thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop, capacity: int) -> None:
        self.loop, self.capacity = loop, capacity
        self.items: deque[bytes | BaseException] = deque()
        self.ready = threading.Condition()
        self.buffered = 0
        self.room = asyncio.Event()

    def put_nowait(self, item: bytes | BaseException) -> bool:
        """Append `item`; whether the pipe is now full (then `room` is cleared, under the same
        lock as the writer's check, so its wake-up cannot be missed)."""
        with self.ready:
            self.items.append(item)
            if isinstance(item, bytes):
                self.buffered += len(item)
            self.ready.notify()
            full = self.buffered >= self.capacity
            if full:
                self.room.clear()
        return full

    async def put(self, item: bytes) -> None:
        if self.put_nowait(item):
            await self.room.wait()

    def get(self) -> bytes | BaseException:
        """From the writer's thread: the next item, waiting for one."""
        with self.ready:
            while not self.items:
                self.ready.wait()
            item = self.items.popleft()
            if isinstance(item, bytes):
                was_full = self.buffered >= self.capacity
                self.buffered -= len(item)
                if was_full and self.buffered < self.capacity:
                    self.loop.call_soon_threadsafe(self.room.set)
        return item


class _PipeReader:
    """A read-only, unseekable file over the pipe, for a storage backend's thread."""

    def __init__(self, pipe: _Pipe) -> None:
        self.pipe = pipe
        self.pending, self.offset = b"", 0
        self.eof = False
        self.total = 0

    def _next(self) -> None:
        item = self.pipe.get()
        if isinstance(item, BaseException):
            raise item
        self.eof = not item
        self.total += len(item)
        self.pending, self.offset = item, 0

    def read(self, size: int | None = -1) -> bytes:
        # Exactly `size` bytes unless the body ends (boto3's multipart upload relies on it);
        # a whole piece is handed on without a copy.
        wanted = size if size is not None and size >= 0 else None
        out: list[bytes] = []
        got = 0
        while wanted is None or got < wanted:
            if self.offset >= len(self.pending):
                if self.eof:
                    break
                self._next()
                continue
            end = len(self.pending) if wanted is None else min(len(self.pending), self.offset + wanted - got)
            piece = self.pending if self.offset == 0 and end == len(self.pending) else self.pending[self.offset : end]
            self.offset = end
            out.append(piece)
            got += len(piece)
        return out[0] if len(out) == 1 else b"".join(out)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False


class _Upload(File):
    DEFAULT_CHUNK_SIZE = PIECE
