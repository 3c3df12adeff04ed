"""Login throttling: a run of wrong passwords locks that username out from that address for a
while, with the reason on the login page, until the cool-off ends or an organisation admin
lifts it."""

import pytest
from django.core.management import call_command
from django.test import Client

from projects.services import create_api_token

pytestmark = pytest.mark.django_db

LOCKED = "Too many failed attempts: try again in 15 minutes or ask an organisation admin."


def attempt(client: Client, username: str, password: str):
    return client.post("/login/", {"username": username, "password": password})


def lock_out(client: Client, username: str) -> list:
    return [attempt(client, username, f"wrong-{i}") for i in range(10)]


@pytest.fixture(autouse=True)
def _fast_passwords(settings):
    # Dozens of attempts per test: the production hasher would dominate the run time.
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@pytest.fixture
def superuser(django_user_model):
    return django_user_model.objects.create_superuser("root@example.com", "root@example.com", "pw-root-123")


def test_ten_wrong_passwords_lock_the_login_with_a_clear_message(client, member_user):
    responses = lock_out(client, member_user.username)
    assert [r.status_code for r in responses[:9]] == [200] * 9
    assert all(LOCKED not in r.content.decode() for r in responses[:9])
    assert responses[9].status_code == 429
    assert LOCKED in responses[9].content.decode()

    # The right password is refused too while locked.
    response = attempt(client, member_user.username, "pw-member-123")
    assert response.status_code == 429 and LOCKED in response.content.decode()
    assert "_auth_user_id" not in client.session
    assert client.get("/").status_code == 302


def test_lockout_is_per_username(client, member_user, admin_user):
    lock_out(client, member_user.username)
    response = attempt(client, admin_user.username, "pw-admin-123")
    assert response.status_code == 302 and response["Location"] == "/"


def test_superuser_lifts_the_lockout_in_the_admin(client, member_user, superuser):
    from axes.models import AccessAttempt

    lock_out(client, member_user.username)
    admin = Client()
    admin.force_login(superuser)
    listing = admin.get("/admin/axes/accessattempt/")
    assert listing.status_code == 200 and member_user.username in listing.content.decode()
    ids = list(AccessAttempt.objects.values_list("pk", flat=True))
    response = admin.post(
        "/admin/axes/accessattempt/", {"action": "delete_selected", "_selected_action": ids, "post": "yes"}
    )
    assert response.status_code == 302
    response = attempt(client, member_user.username, "pw-member-123")
    assert response.status_code == 302 and response["Location"] == "/"


def test_axes_reset_command_lifts_the_lockout(client, member_user):
    lock_out(client, member_user.username)
    call_command("axes_reset_username", member_user.username)
    assert attempt(client, member_user.username, "pw-member-123").status_code == 302


def test_api_tokens_and_forced_logins_are_not_throttled(client, member_user, project):
    lock_out(client, member_user.username)
    token = create_api_token(member_user)
    api = Client()
    assert api.get("/api/v1/me", headers={"Authorization": f"Bearer {token}"}).status_code == 200
    browser = Client()
    browser.force_login(member_user)
    assert browser.get("/account/tokens/").status_code == 200
    # The test client's login() has no HTTP request to throttle: it keeps working for fixtures.
    assert Client().login(username=member_user.username, password="pw-member-123")
