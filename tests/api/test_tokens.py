"""The API token page, the token services and `manage.py create_token`."""

from datetime import timedelta

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.test import Client
from django.utils import timezone

from projects.models import ApiToken
from projects.services import create_api_token, revoke_api_token
from projects.tokens import authenticate_token

pytestmark = pytest.mark.django_db


def test_token_is_shown_once_after_redirect_stored_hashed_and_works(client, member_user):
    client.force_login(member_user)
    response = client.post("/account/tokens/create/", {"name": "laptop", "expires_at": ""})
    assert response.status_code == 302 and response.url == "/account/tokens/"
    shown = client.get("/account/tokens/")
    assert shown["Cache-Control"] == "no-store"
    raw = shown.context["new"]["raw"]
    assert raw in shown.content.decode() and 'data-copy="#new-token"' in shown.content.decode()
    token = ApiToken.objects.get(user=member_user)
    assert token.name == "laptop"
    assert token.digest == ApiToken.digest_of(raw) and raw not in (token.digest, token.prefix)
    # The session held it encrypted, and only until that one GET.
    refreshed = client.get("/account/tokens/").content.decode()
    assert raw not in refreshed and token.prefix in refreshed and "laptop" in refreshed
    assert ApiToken.objects.filter(user=member_user).count() == 1
    assert client.get("/api/v1/me", headers={"Authorization": f"Bearer {raw}"}).status_code == 200


def test_two_named_tokens_both_authenticate_and_revoking_one_leaves_the_other(client, member_user):
    client.force_login(member_user)
    client.post("/account/tokens/create/", {"name": "laptop"})
    laptop = client.get("/account/tokens/").context["new"]["raw"]
    client.post("/account/tokens/create/", {"name": "CI"})
    ci = client.get("/account/tokens/").context["new"]["raw"]
    assert authenticate_token(laptop) == member_user and authenticate_token(ci) == member_user
    html = client.get("/account/tokens/").content.decode()
    assert 'aria-label="Revoke laptop"' in html and 'aria-label="Revoke CI"' in html
    response = client.post(f"/account/tokens/{ApiToken.objects.get(name='laptop').pk}/revoke/")
    assert response.status_code == 302 and response.url == "/account/tokens/"
    assert authenticate_token(laptop) is None
    assert authenticate_token(ci) == member_user
    # A fresh client: the logged-in one would pass on its session alone.
    assert Client().get("/api/v1/me", headers={"Authorization": f"Bearer {laptop}"}).status_code == 401
    assert Client().get("/api/v1/me", headers={"Authorization": f"Bearer {ci}"}).status_code == 200
    html = client.get("/account/tokens/", follow=True).content.decode()
    assert "Token revoked." in html
    assert 'aria-label="Revoke laptop"' not in html and 'aria-label="Revoke CI"' in html


def test_an_active_name_cannot_be_reused(client, member_user):
    create_api_token(member_user, name="CI")
    client.force_login(member_user)
    response = client.post("/account/tokens/create/", {"name": "CI"})
    assert response.status_code == 400 and "already have a token with this name" in response.content.decode()
    assert ApiToken.objects.filter(user=member_user).count() == 1


def test_outsider_cannot_revoke_another_users_token(client, member_user, outsider_user):
    raw = create_api_token(member_user, name="laptop")
    client.force_login(outsider_user)
    token = ApiToken.objects.get(user=member_user)
    assert client.post(f"/account/tokens/{token.pk}/revoke/").status_code == 404
    assert authenticate_token(raw) == member_user
    assert 'aria-label="Revoke laptop"' not in client.get("/account/tokens/").content.decode()


def test_token_forms_need_the_csrf_token(member_user):
    raw = create_api_token(member_user, name="laptop")
    strict = Client(enforce_csrf_checks=True)
    strict.force_login(member_user)
    token = ApiToken.objects.get(user=member_user)
    assert strict.post("/account/tokens/create/", {"name": "x"}).status_code == 403
    assert strict.post(f"/account/tokens/{token.pk}/revoke/").status_code == 403
    assert ApiToken.objects.count() == 1 and authenticate_token(raw) == member_user


def test_expiry_must_be_in_the_future_and_is_enforced(client, member_user):
    client.force_login(member_user)
    past = (timezone.now() - timedelta(days=1)).strftime("%Y-%m-%dT%H:%M")
    response = client.post("/account/tokens/create/", {"name": "laptop", "expires_at": past})
    assert response.status_code == 400 and "must be in the future" in response.content.decode()
    assert not ApiToken.objects.exists()
    raw = create_api_token(member_user, timezone.now() + timedelta(days=1))
    assert authenticate_token(raw) == member_user
    ApiToken.objects.update(expires_at=timezone.now() - timedelta(seconds=1))
    assert authenticate_token(raw) is None
    assert Client().get("/api/v1/me", headers={"Authorization": f"Bearer {raw}"}).status_code == 401
    assert "expired" in client.get("/account/tokens/").content.decode()


def test_inactive_user_token_is_refused(member_user):
    raw = create_api_token(member_user)
    member_user.is_active = False
    member_user.save()
    assert authenticate_token(raw) is None


def test_revoke_service_counts(member_user):
    create_api_token(member_user, name="a")
    create_api_token(member_user, name="b")
    assert revoke_api_token(member_user) == 2
    assert revoke_api_token(member_user) == 0


@pytest.mark.parametrize("path", ["/account/tokens/", "/account/tokens/create/", "/account/tokens/1/revoke/"])
def test_token_pages_need_login_and_the_right_method(client, member_user, path):
    method = "get" if path == "/account/tokens/" else "post"
    response = getattr(client, method)(path)
    assert response.status_code == 302 and "/login/" in response.url
    client.force_login(member_user)
    wrong = "post" if method == "get" else "get"
    assert getattr(client, wrong)(path).status_code == 405


def test_create_token_command_prints_a_working_token(member_user, capsys):
    call_command("create_token", "member@example.com")
    first = capsys.readouterr().out.strip()
    call_command("create_token", "member@example.com", "--name", "CI")
    second = capsys.readouterr().out.strip()
    assert authenticate_token(first) == member_user and authenticate_token(second) == member_user
    assert ApiToken.objects.get(digest=ApiToken.digest_of(second)).name == "CI"
    with pytest.raises(CommandError, match="no user named"):
        call_command("create_token", "nobody@example.com")
