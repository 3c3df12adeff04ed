"""The API token page, the token services and `manage.py create_token`."""

from datetime import timedelta

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.utils import timezone

from projects.models import ApiToken
from projects.services import create_api_token, revoke_api_token
from projects.tokens import authenticate_token

pytestmark = pytest.mark.django_db


def test_token_is_shown_once_stored_hashed_and_works(client, member_user):
    client.force_login(member_user)
    response = client.post("/account/tokens/create/", {"expires_at": ""})
    assert response.status_code == 200
    raw = response.context["raw"]
    assert raw in response.content.decode()
    assert response["Cache-Control"] == "no-store"
    token = ApiToken.objects.get(user=member_user)
    assert token.digest == ApiToken.digest_of(raw) and raw not in (token.digest, token.prefix)
    page = client.get("/account/tokens/").content.decode()
    assert raw not in page and token.prefix in page
    assert client.get("/api/v1/me", headers={"Authorization": f"Bearer {raw}"}).status_code == 200


def test_new_token_revokes_the_old_one(client, member_user):
    client.force_login(member_user)
    first = client.post("/account/tokens/create/", {}).context["raw"]
    second = client.post("/account/tokens/create/", {}).context["raw"]
    assert authenticate_token(first) is None
    assert authenticate_token(second) == member_user
    assert ApiToken.objects.active().filter(user=member_user).count() == 1


def test_revoke_from_the_page(client, member_user):
    raw = create_api_token(member_user)
    client.force_login(member_user)
    response = client.post("/account/tokens/revoke/")
    assert response.status_code == 302 and response.url == "/account/tokens/"
    assert authenticate_token(raw) is None
    assert "no active token" in client.get("/account/tokens/").content.decode()


def test_expiry_must_be_in_the_future_and_is_enforced(client, member_user):
    client.force_login(member_user)
    past = (timezone.now() - timedelta(days=1)).strftime("%Y-%m-%dT%H:%M")
    response = client.post("/account/tokens/create/", {"expires_at": past})
    assert response.status_code == 400 and "must be in the future" in response.content.decode()
    assert not ApiToken.objects.exists()
    raw = create_api_token(member_user, timezone.now() + timedelta(days=1))
    assert authenticate_token(raw) == member_user
    ApiToken.objects.update(expires_at=timezone.now() - timedelta(seconds=1))
    assert authenticate_token(raw) is None


def test_inactive_user_token_is_refused(member_user):
    raw = create_api_token(member_user)
    member_user.is_active = False
    member_user.save()
    assert authenticate_token(raw) is None


def test_revoke_service_counts(member_user):
    create_api_token(member_user)
    assert revoke_api_token(member_user) == 1
    assert revoke_api_token(member_user) == 0


@pytest.mark.parametrize("path", ["/account/tokens/", "/account/tokens/create/", "/account/tokens/revoke/"])
def test_token_pages_need_login_and_the_right_method(client, member_user, path):
    method = "get" if path == "/account/tokens/" else "post"
    response = getattr(client, method)(path)
    assert response.status_code == 302 and "/login/" in response.url
    client.force_login(member_user)
    wrong = "post" if method == "get" else "get"
    assert getattr(client, wrong)(path).status_code == 405


def test_create_token_command_prints_a_working_token(member_user, capsys):
    call_command("create_token", "member@example.com")
    raw = capsys.readouterr().out.strip()
    assert authenticate_token(raw) == member_user
    with pytest.raises(CommandError, match="no user named"):
        call_command("create_token", "nobody@example.com")
