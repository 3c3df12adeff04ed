"""The request gate in aichor.asgi: anonymous bodies and oversized bodies are answered from the
headers, before the server reads (and Django spools to disk) a single body byte."""

import asyncio
import json
import uuid
from urllib.parse import urlencode

import pytest
from asgiref.sync import async_to_sync

from aichor.asgi import application
from experiments.models import Experiment
from tests.helpers import github_signature

pytestmark = pytest.mark.django_db(transaction=True)

MiB = 1024 * 1024
HUGE = 512 * MiB
CSRF = "k" * 32


class Sent:
    def __init__(self) -> None:
        self.status: int | None = None
        self.headers: dict[str, str] = {}
        self.body = b""
        self.consumed = 0  # body bytes the application took from the client
        self.receives = 0

    def json(self):
        return json.loads(self.body)


def drive(method: str, path: str, headers: dict[str, str], pieces, *, query: str = "", budget: int | None = None):
    """One request through aichor.asgi:application as a server hands it over: `pieces` are body
    messages, produced only when the application asks for them. A client declaring 512 MB gives
    up after `budget` pieces (so an application that reads it all does not take minutes to be
    caught: it gets a disconnect instead and answers nothing)."""
    sent = Sent()
    pieces = iter(pieces)

    async def run() -> Sent:
        done = asyncio.Event()
        remaining = budget

        async def receive() -> dict:
            nonlocal remaining
            sent.receives += 1
            if remaining is not None:
                if remaining <= 0:
                    return {"type": "http.disconnect"}
                remaining -= 1
            piece = next(pieces, None)
            if piece is None:
                await done.wait()  # Django listens for a disconnect once it has the body
                return {"type": "http.disconnect"}
            body, more = piece
            sent.consumed += len(body)
            return {"type": "http.request", "body": body, "more_body": more}

        async def send(message: dict) -> None:
            if message["type"] == "http.response.start":
                assert sent.status is None, "a second response"
                sent.status = message["status"]
                sent.headers = {k.decode().lower(): v.decode() for k, v in message.get("headers", [])}
            elif message["type"] == "http.response.body":
                sent.body += message.get("body", b"")
                if not message.get("more_body"):
                    done.set()

        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": method,
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "root_path": "",
            "query_string": query.encode(),
            "headers": [(b"host", b"testserver")] + [(k.lower().encode(), v.encode()) for k, v in headers.items()],
            "server": ("testserver", 80),
            "client": ("127.0.0.1", 50000),
        }
        await asyncio.wait_for(application(scope, receive, send), 30)
        return sent

    return async_to_sync(run)()


def declared(size: int) -> tuple[dict[str, str], object]:
    """Headers declaring `size` bytes and the body that would follow, 1 MiB at a time."""
    count = -(-size // MiB)
    return {"Content-Length": str(size)}, ((b"\0" * MiB, i < count - 1) for i in range(count))


def chunked(size: int, piece: int = 8192):
    count = -(-size // piece)
    return ((b"x" * piece, i < count - 1) for i in range(count))


ANONYMOUS_HUGE = [
    ("PUT", "/p/vision/datasets/uploads/part/", 302),
    ("POST", "/login/", 413),
    ("POST", "/admin/login/", 413),
    ("POST", "/webhooks/github/vision/", 413),
    ("POST", "/webhooks/gitlab/vision/", 413),
    ("POST", "/api/v1/projects/vision/experiments", 413),
    ("POST", "/api/v1/projects/vision/experiments/archive", 401),
    ("POST", "/p/vision/variables/", 413),
    ("POST", "/account/tokens/create/", 413),
]


@pytest.mark.parametrize(("method", "path", "status"), ANONYMOUS_HUGE)
def test_anonymous_512_mb_body_is_answered_before_a_byte_is_read(project, method, path, status):
    headers, body = declared(HUGE)
    sent = drive(method, path, {**headers, "Content-Type": "application/octet-stream"}, body, budget=4)
    assert sent.status == status, sent.body
    assert sent.consumed == 0
    if status == 302:
        assert sent.headers["location"].startswith("/login/?next=/p/vision/datasets/uploads/part/")


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/p/vision/datasets/uploads/part/", 302),
        ("/p/vision/variables/", 302),
        ("/experiments/00000000-0000-0000-0000-000000000000/cancel/", 302),
        ("/api/v1/projects/vision/experiments", 401),
    ],
)
def test_anonymous_body_within_the_limit_is_refused_unread(project, path, status):
    # Under every limit: only the missing user refuses it, before the server reads it.
    headers, body = declared(MiB)
    sent = drive("POST" if "part" not in path else "PUT", path, headers, body, budget=4)
    assert sent.status == status, sent.body
    assert sent.consumed == 0


def test_forged_or_logged_out_session_cookie_is_anonymous(project):
    headers, body = declared(MiB)
    headers["Cookie"] = "sessionid=notasession; csrftoken=" + CSRF
    sent = drive("POST", "/p/vision/variables/", headers, body, budget=4)
    assert sent.status == 302 and sent.consumed == 0


def test_invalid_api_token_is_refused_unread(project):
    headers, body = declared(MiB)
    headers["Authorization"] = "Bearer aichor_not-a-token"
    sent = drive("POST", "/api/v1/projects/vision/experiments", headers, body, budget=4)
    assert sent.status == 401 and sent.consumed == 0


def test_chunked_login_body_is_cut_at_the_limit():
    sent = drive(
        "POST", "/login/", {"Transfer-Encoding": "chunked", "Content-Type": "application/x-www-form-urlencoded"},
        chunked(HUGE), budget=1000,
    )  # fmt: skip
    assert sent.status == 413, sent.body
    assert "limit" in sent.json()["detail"]
    # Cut within one piece of the 16 KiB limit, not after the client's 512 MB.
    assert sent.consumed <= 16 * 1024 + 8192


def test_chunked_webhook_body_is_cut_at_the_webhook_limit(project, settings):
    settings.MAX_WEBHOOK_BYTES = 100_000
    sent = drive(
        "POST", f"/webhooks/github/{project.slug}/", {"Transfer-Encoding": "chunked"}, chunked(HUGE), budget=1000
    )
    assert sent.status == 413
    assert sent.consumed <= 100_000 + 8192
    assert not Experiment.objects.exists()


def test_member_chunked_body_over_the_form_limit_is_cut(client, project, member_user, settings):
    settings.MAX_REQUEST_BYTES = 50_000
    client.force_login(member_user)
    cookie = f"sessionid={client.cookies['sessionid'].value}; csrftoken={CSRF}"
    headers = {"Transfer-Encoding": "chunked", "Cookie": cookie, "X-CSRFToken": CSRF}
    sent = drive("POST", "/p/vision/variables/", headers, chunked(HUGE), budget=1000)
    assert sent.status == 413
    assert sent.consumed <= 50_000 + 8192


def test_webhook_delivery_still_works(project):
    body = json.dumps(
        {"ref": "refs/heads/main", "head_commit": {"id": "a" * 40, "message": "aichor[train.yaml]: gate"}}
    ).encode()
    headers = {
        "Content-Type": "application/json",
        "Content-Length": str(len(body)),
        "X-GitHub-Event": "push",
        "X-GitHub-Delivery": str(uuid.uuid4()),
        "X-Hub-Signature-256": github_signature(body),
    }
    sent = drive("POST", f"/webhooks/github/{project.slug}/", headers, [(body, False)])
    assert sent.status == 201, sent.body
    assert Experiment.objects.filter(project=project, commit_sha="a" * 40).exists()


def test_login_through_the_gate_still_works(project, member_user):
    form = urlencode(
        {"username": member_user.username, "password": "pw-member-123", "csrfmiddlewaretoken": CSRF}
    ).encode()
    headers = {
        "Content-Type": "application/x-www-form-urlencoded",
        "Content-Length": str(len(form)),
        "Cookie": f"csrftoken={CSRF}",
    }
    sent = drive("POST", "/login/", headers, [(form, False)])
    assert sent.status == 302, sent.body
    assert "sessionid=" in sent.headers.get("set-cookie", "")


def test_member_uploads_a_dataset_in_parts_through_the_gate(client, project, member_user, settings):
    from datasets import services

    settings.AICHOR_STORAGE = "filesystem"
    settings.AICHOR_UPLOAD_PART_MB = 1
    client.force_login(member_user)
    payload = bytes(range(256)) * (10 * 1024)  # 2.5 MiB: three parts
    start = client.post(
        "/p/vision/datasets/uploads/start/", {"bucket": "inputs", "key": "data/blob.bin", "size": len(payload)}
    )
    assert start.status_code == 201, start.content
    info = start.json()
    assert info["parts"] == 3
    cookie = f"sessionid={client.cookies['sessionid'].value}; csrftoken={CSRF}"
    for number in range(1, info["parts"] + 1):
        chunk = payload[(number - 1) * info["part_size"] : number * info["part_size"]]
        query = urlencode({"bucket": "inputs", "key": "data/blob.bin", "upload_id": info["upload_id"], "part": number})
        headers = {
            "Content-Type": "application/octet-stream",
            "Content-Length": str(len(chunk)),
            "Cookie": cookie,
            "X-CSRFToken": CSRF,
        }
        pieces = [(chunk[i : i + 65536], i + 65536 < len(chunk)) for i in range(0, len(chunk), 65536)]
        sent = drive("PUT", "/p/vision/datasets/uploads/part/", headers, pieces, query=query)
        assert sent.status == 200, sent.body
    done = client.post(
        "/p/vision/datasets/uploads/complete/",
        {"bucket": "inputs", "key": "data/blob.bin", "upload_id": info["upload_id"], "size": len(payload)},
    )
    assert done.status_code == 201, done.content
    stored = services.open_object(services.bucket_name(project, "inputs"), "data/blob.bin")
    assert b"".join(stored.chunks()) == payload
