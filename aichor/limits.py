"""The gate in front of every HTTP request: body size limits and "who are you" before any body
byte is read.

Django's ASGIHandler reads a whole request body into a spooled temporary file before a view (or
its login_required) runs, so without this gate an anonymous client could make the server write
512 MB to disk per request just to be refused afterwards. Here, from the headers alone:

- a body declared larger than its route's limit is answered 413 at once; a body without a
  declared length (chunked) is counted as it arrives and cut with 413 once over;
- a request carrying a body to a route that needs a user is refused unless it holds a logged-in
  session cookie or a valid API token: 401 for the API, a redirect to the login page otherwise
  (what the view itself would answer), without reading the body.

Requests without a body pass untouched (Django checks those itself), as do archive uploads
(experiments.upload authenticates and limits them itself, before reading). Webhooks are
authenticated by their signature, which needs the body: they only get the size limit, and no
database query here, so their latency is unchanged."""

import json
import re
from collections.abc import Awaitable, Callable
from importlib import import_module
from typing import Any
from urllib.parse import quote

from channels.db import database_sync_to_async
from django.conf import settings
from django.contrib.auth import SESSION_KEY
from django.shortcuts import resolve_url

from datasets.services import MAX_OBJECT_SIZE, part_size_for
from experiments.upload import ARCHIVE_PATH
from projects.tokens import authenticate_token, bearer_of

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# A username, a password, a CSRF token and a `next`: nothing a login form sends comes near it.
LOGIN_BYTES = 16 * 1024
# Multipart framing and headers around a part of exactly the part size.
PART_SLACK = 64 * 1024
PUBLIC_FORMS = frozenset({"/login/", "/logout/", "/admin/login/", "/admin/logout/"})
UPLOAD_PART = re.compile(r"/p/[^/]+/datasets/uploads/part/")


class Route:
    """What a request's path allows: its body limit and whether a body needs a user."""

    def __init__(self, limit: int, needs_user: bool, api: bool = False) -> None:
        self.limit, self.needs_user, self.api = limit, needs_user, api


def route_of(path: str) -> Route | None:
    """None for a route that limits and authenticates its body itself (archive uploads)."""
    if path.startswith("/webhooks/"):
        return Route(settings.MAX_WEBHOOK_BYTES, needs_user=False)
    if path in PUBLIC_FORMS:
        return Route(LOGIN_BYTES, needs_user=False)
    if UPLOAD_PART.fullmatch(path):
        # The largest part the uploader may send (parts grow past AICHOR_UPLOAD_PART_MB only
        # for objects over 10 000 parts); the view refuses a larger declared length too.
        return Route(part_size_for(MAX_OBJECT_SIZE) + PART_SLACK, needs_user=True)
    if path.startswith("/api/"):
        return Route(settings.MAX_REQUEST_BYTES, needs_user=True, api=True)
    return Route(settings.MAX_REQUEST_BYTES, needs_user=True)


def limit_requests(app: ASGIApp) -> ASGIApp:
    async def gate(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        path = scope["path"]
        root = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root) :]
        if scope["method"] == "POST" and ARCHIVE_PATH.fullmatch(path):
            await app(scope, receive, send)
            return
        route = route_of(path)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        length_header = headers.get("content-length")
        chunked = "chunked" in headers.get("transfer-encoding", "").lower()
        declared = None
        if length_header is not None:
            try:
                declared = int(length_header)
            except ValueError:
                declared = -1
            if declared < 0:
                await _answer(send, 400, {"detail": "Content-Length is not a number"})
                return
        if declared is not None and declared > route.limit:
            await _too_large(send, route.limit)
            return
        if route.needs_user and (chunked or (declared or 0) > 0) and not await _has_user(headers):
            if route.api:
                await _answer(send, 401, {"detail": "Unauthorized"})
            else:
                await _to_login(send, scope, path)
            return
        counted = _Counted(receive, send, route.limit)
        await app(scope, counted.receive, counted.send)

    return gate


class _Counted:
    """receive() and send() for the app, cutting a body longer than `limit` (sent without a
    declared length, or longer than declared): it answers 413 itself and tells the app the
    client left, so Django drops the request (RequestAborted) without reading further."""

    def __init__(self, receive: Receive, send: Send, limit: int) -> None:
        self._receive, self._send, self.limit = receive, send, limit
        self.seen = 0
        self.cut = self.started = False

    async def receive(self) -> dict:
        if self.cut:
            return {"type": "http.disconnect"}
        message = await self._receive()
        if message["type"] == "http.request":
            self.seen += len(message.get("body", b""))
            if self.seen > self.limit:
                self.cut = True
                if not self.started:
                    await _too_large(self._send, self.limit)
                return {"type": "http.disconnect"}
        return message

    async def send(self, message: dict) -> None:
        # After the 413 the response is over: the server would refuse a second one.
        if self.cut:
            return
        self.started = True
        await self._send(message)


async def _has_user(headers: dict[str, str]) -> bool:
    token = bearer_of(headers.get("authorization"))
    if token:
        return await database_sync_to_async(authenticate_token)(token) is not None
    key = _cookie(headers.get("cookie", ""), settings.SESSION_COOKIE_NAME)
    if not key:
        return False
    return await database_sync_to_async(_session_has_user)(key)


def _session_has_user(key: str) -> bool:
    # Only the session row: whether its user still exists and is active is Django's to check
    # once the body is in; a logged-in session is what an anonymous client cannot forge.
    store = import_module(settings.SESSION_ENGINE).SessionStore(key)
    return store.get(SESSION_KEY) is not None


def _cookie(header: str, name: str) -> str | None:
    for part in header.split(";"):
        key, sep, value = part.strip().partition("=")
        if sep and key == name:
            return value.strip().strip('"') or None
    return None


async def _too_large(send: Send, limit: int) -> None:
    await _answer(send, 413, {"detail": f"the request body is larger than this route's limit of {limit} bytes"})


async def _to_login(send: Send, scope: Scope, path: str) -> None:
    login = resolve_url("admin:login" if path.startswith("/admin/") else settings.LOGIN_URL)
    target = scope.get("root_path", "") + path
    query = scope.get("query_string", b"").decode("latin-1")
    if query:
        target += "?" + query
    location = f"{login}?next={quote(target, safe='/')}"
    await send({"type": "http.response.start", "status": 302, "headers": [(b"location", location.encode("latin-1"))]})
    await send({"type": "http.response.body", "body": b""})


async def _answer(send: Send, status: int, body: dict) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json; charset=utf-8"), (b"connection", b"close")],
        }
    )
    await send({"type": "http.response.body", "body": json.dumps(body).encode()})
