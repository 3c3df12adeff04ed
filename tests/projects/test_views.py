"""Login, home and the project details page through the test client."""

import pytest

pytestmark = pytest.mark.django_db


def test_login_page_and_login_lands_on_the_first_project(client, member_user, project):
    assert client.get("/login/").status_code == 200
    response = client.post("/login/", {"username": "member@example.com", "password": "pw-member-123"}, follow=True)
    # All engines is the default filter: no engine in the URL until the user picks one.
    assert response.redirect_chain[-1][0] == "/p/vision/"


def test_wrong_password_says_so(client, member_user):
    response = client.post("/login/", {"username": "member@example.com", "password": "nope"})
    assert response.status_code == 200
    assert "Please enter a correct" in response.content.decode()


def test_logout_is_a_post(client, member_user):
    client.force_login(member_user)
    assert client.get("/logout/").status_code == 405
    assert client.post("/logout/")["Location"] == "/login/"
    assert client.get("/")["Location"].startswith("/login/")


def test_home_without_projects_says_what_to_do(client, outsider_user, project):
    client.force_login(outsider_user)
    html = client.get("/").content.decode()
    assert "You are not in any project yet" in html
    assert "vision" not in html.lower()


def test_home_refuses_post(client, member_user):
    client.force_login(member_user)
    assert client.post("/").status_code == 405


def test_home_ignores_a_project_the_user_is_not_in(client, member_user, outsider_user, project):
    from projects.services import create_project

    create_project(name="Secret", slug="secret", admins=[outsider_user])
    client.force_login(member_user)
    assert client.get("/?project=secret")["Location"] == "/p/vision/"


@pytest.mark.parametrize("persona,status", [("admin_user", 200), ("member_user", 200), ("outsider_user", 404)])
def test_project_details_for_members_only(client, request, project, persona, status):
    client.force_login(request.getfixturevalue(persona))
    response = client.get("/p/vision/details/")
    assert response.status_code == status
    if status == 200:
        html = response.content.decode()
        assert project.namespace in html and project.inputs_bucket in html and project.outputs_bucket in html
        assert "/webhooks/github/vision/" in html and "/webhooks/gitlab/vision/" in html
        assert "local" in html


def test_webhook_secret_only_for_admins(client, admin_user, member_user, project):
    client.force_login(admin_user)
    assert "s3cret-webhook" in client.get("/p/vision/details/").content.decode()
    client.force_login(member_user)
    html = client.get("/p/vision/details/").content.decode()
    assert "s3cret-webhook" not in html and "Only project admins can see the webhook secret" in html


def test_project_details_anonymous_and_wrong_method(client, member_user, project):
    assert client.get("/p/vision/details/")["Location"].startswith("/login/")
    client.force_login(member_user)
    assert client.post("/p/vision/details/").status_code == 405


def test_superuser_sees_every_project(client, django_user_model, project):
    boss = django_user_model.objects.create_superuser("boss@example.com", "boss@example.com", "pw-boss-123")
    client.force_login(boss)
    assert client.get("/p/vision/details/").status_code == 200
    assert "s3cret-webhook" in client.get("/p/vision/details/").content.decode()


def test_pages_link_to_the_shared_urls(client, admin_user, project):
    admin_user.is_staff = True
    admin_user.save()
    client.force_login(admin_user)
    html = client.get("/p/vision/details/").content.decode()
    for href in (
        'href="/p/vision/datasets/"',
        'href="/account/tokens/"',
        'href="/admin/"',
        'href="/p/vision/"',
    ):
        assert href in html
