from datetime import timedelta

import pytest
from django.utils import timezone


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def tokens(db, admin_user, member_user, outsider_user, django_user_model):
    """Authorization headers per persona, including a user whose token expired and one whose
    token was revoked (both members of the project, so only the token decides)."""
    from projects.models import ApiToken
    from projects.services import create_api_token, revoke_api_token

    expired_user = django_user_model.objects.create_user("expired@example.com", "expired@example.com", "pw-x-123")
    revoked_user = django_user_model.objects.create_user("revoked@example.com", "revoked@example.com", "pw-r-123")
    headers = {
        "admin": bearer(create_api_token(admin_user)),
        "member": bearer(create_api_token(member_user)),
        "outsider": bearer(create_api_token(outsider_user)),
        "anonymous": {},
    }
    expired = create_api_token(expired_user, timezone.now() + timedelta(seconds=30))
    ApiToken.objects.filter(user=expired_user).update(expires_at=timezone.now() - timedelta(seconds=1))
    revoked = create_api_token(revoked_user)
    revoke_api_token(revoked_user)
    headers["expired"] = bearer(expired)
    headers["revoked"] = bearer(revoked)
    headers["_users"] = {"expired": expired_user, "revoked": revoked_user}
    return headers


@pytest.fixture
def project_with_all(project, tokens):
    from projects.services import add_member

    add_member(project, tokens["_users"]["expired"])
    add_member(project, tokens["_users"]["revoked"])
    return project


def streamed(response) -> bytes:
    """The whole body of a (possibly async) streaming response."""
    from asgiref.sync import async_to_sync

    async def collect() -> bytes:
        return b"".join([chunk async for chunk in response.streaming_content])

    return async_to_sync(collect)() if response.is_async else b"".join(response.streaming_content)


class AsgiResponse:
    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status_code, self.headers, self.content = status, headers, body

    def json(self):
        import json

        return json.loads(self.content)


def asgi_request(
    method: str, path: str, headers: dict[str, str], body: bytes = b"", *, pieces: int = 1, query: str = ""
) -> AsgiResponse:
    """One request through aichor.asgi:application, the body sent in `pieces` messages: the way a
    server hands it over, so routes served ahead of Django are exercised too. Tests using it
    need django_db(transaction=True): the app's database_sync_to_async closes connections."""
    from asgiref.sync import async_to_sync
    from asgiref.testing import ApplicationCommunicator

    from aichor.asgi import application

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method.upper(),
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": query.encode(),
        "headers": [(b"host", b"testserver")] + [(k.lower().encode(), v.encode()) for k, v in headers.items()],
        "server": ("testserver", 80),
        "client": ("127.0.0.1", 50000),
    }
    size = max(1, -(-len(body) // pieces))
    parts = [body[i : i + size] for i in range(0, len(body), size)] or [b""]

    async def run() -> AsgiResponse:
        app = ApplicationCommunicator(application, scope)
        for i, part in enumerate(parts):
            await app.send_input({"type": "http.request", "body": part, "more_body": i < len(parts) - 1})
        start = await app.receive_output(10)
        content = b""
        while True:
            message = await app.receive_output(10)
            content += message.get("body", b"")
            if not message.get("more_body"):
                break
        await app.wait(10)
        head = {k.decode().lower(): v.decode() for k, v in start.get("headers", [])}
        return AsgiResponse(start["status"], head, content)

    return async_to_sync(run)()
