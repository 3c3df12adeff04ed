"""Projects from the dashboard: the New project page (organisation admins), members on the
project's page (project admins) and the Connect your repository panel with its test delivery."""

import pytest
from django.test import Client

from experiments.models import WebhookDelivery
from projects.models import Membership, Project

pytestmark = pytest.mark.django_db


@pytest.fixture
def boss(django_user_model):
    return django_user_model.objects.create_superuser("boss@example.com", "boss@example.com", "pw-boss-123")


def members_of(project) -> dict[str, str]:
    return dict(project.memberships.values_list("user__username", "role"))


# --- New project -----------------------------------------------------------------------------
def test_organisation_admin_creates_a_project_and_lands_on_the_connect_panel(client, boss, local_engine, git_repo):
    client.force_login(boss)
    page = client.get("/projects/new/")
    assert page.status_code == 200 and "Repository URL" in page.content.decode()
    response = client.post(
        "/projects/new/", {"name": "Speech Lab", "repo_clone_url": git_repo.url, "engines": [local_engine.pk]}
    )
    assert response.status_code == 302 and response.url == "/p/speech-lab/connect/"
    project = Project.objects.get(slug="speech-lab")
    assert project.repo_clone_url == git_repo.url and project.default_engine == local_engine
    assert members_of(project) == {"boss@example.com": "admin"}
    html = client.get(response.url).content.decode()
    assert "http://testserver" not in html  # the public URL, not the request's host
    assert "/webhooks/github/speech-lab/" in html and "/webhooks/gitlab/speech-lab/" in html
    assert project.webhook_secret in html and "Just the <code>push</code> event" in html
    assert "application/json" in html and "Secret token" in html and "Push events" in html
    assert "No delivery received yet." in html


def test_new_project_refuses_a_taken_slug_a_bad_url_and_no_engine(client, boss, project, local_engine):
    client.force_login(boss)
    response = client.post("/projects/new/", {"name": "Vision", "repo_clone_url": "--upload-pack=x"})
    assert response.status_code == 400
    html = response.content.decode()
    assert "A project with the slug vision already exists." in html
    assert "This field is required." in html  # engines
    assert 'id="id_repo_clone_url"' in html and "field-invalid" in html
    assert Project.objects.count() == 1


@pytest.mark.parametrize("persona", ["admin_user", "member_user", "outsider_user"])
def test_new_project_is_only_for_organisation_admins(client, request, project, local_engine, persona):
    client.force_login(request.getfixturevalue(persona))
    assert client.get("/projects/new/").status_code == 404
    assert client.post("/projects/new/", {"name": "X", "engines": [local_engine.pk]}).status_code == 404
    assert Project.objects.count() == 1
    assert "New project" not in client.get("/p/vision/details/").content.decode()


def test_new_project_needs_login_and_csrf(client, boss, local_engine):
    assert client.get("/projects/new/")["Location"].startswith("/login/")
    strict = Client(enforce_csrf_checks=True)
    strict.force_login(boss)
    assert strict.post("/projects/new/", {"name": "X", "engines": [local_engine.pk]}).status_code == 403
    assert not Project.objects.exists()
    client.force_login(boss)
    assert client.put("/projects/new/").status_code == 405


# --- Members ---------------------------------------------------------------------------------
def test_project_admin_adds_changes_and_removes_a_member(client, admin_user, outsider_user, project):
    client.force_login(admin_user)
    response = client.post("/p/vision/members/", {"email": "OUTSIDER@example.com", "role": "member"}, follow=True)
    assert "outsider@example.com is now member of Vision." in response.content.decode()
    assert members_of(project)["outsider@example.com"] == "member"
    client.post("/p/vision/members/", {"email": "outsider@example.com", "role": "admin"})
    assert members_of(project)["outsider@example.com"] == "admin"
    membership = Membership.objects.get(project=project, user=outsider_user)
    response = client.post(f"/p/vision/members/{membership.pk}/remove/", follow=True)
    assert "outsider@example.com removed from Vision." in response.content.decode()
    assert "outsider@example.com" not in members_of(project)
    client.force_login(outsider_user)
    assert client.get("/p/vision/details/").status_code == 404


def test_unknown_email_is_refused_with_the_form(client, admin_user, project):
    client.force_login(admin_user)
    response = client.post("/p/vision/members/", {"email": "nobody@example.com", "role": "member"})
    assert response.status_code == 400
    assert "No user with the e-mail nobody@example.com" in response.content.decode()
    assert len(members_of(project)) == 2


def test_a_project_keeps_at_least_one_admin(client, admin_user, project):
    client.force_login(admin_user)
    own = Membership.objects.get(project=project, user=admin_user)
    response = client.post(f"/p/vision/members/{own.pk}/remove/", follow=True)
    assert "must keep at least one admin" in response.content.decode()
    response = client.post("/p/vision/members/", {"email": "admin@example.com", "role": "member"})
    assert response.status_code == 400 and "must keep at least one admin" in response.content.decode()
    assert members_of(project)["admin@example.com"] == "admin"


@pytest.mark.parametrize("persona", ["member_user", "outsider_user"])
def test_members_are_managed_by_project_admins_only(client, request, project, outsider_user, persona):
    client.force_login(request.getfixturevalue(persona))
    membership = Membership.objects.get(project=project, role="member")
    assert client.post("/p/vision/members/", {"email": "outsider@example.com", "role": "admin"}).status_code == 404
    assert client.post(f"/p/vision/members/{membership.pk}/remove/").status_code == 404
    assert len(members_of(project)) == 2
    assert client.get("/p/vision/members/").status_code in (404, 405)


def test_members_of_another_project_cannot_be_removed_through_this_one(client, admin_user, project, member_user):
    from projects.services import create_project

    other = create_project(name="Other", slug="other", admins=[member_user])
    client.force_login(admin_user)
    foreign = Membership.objects.get(project=other)
    assert client.post(f"/p/vision/members/{foreign.pk}/remove/").status_code == 404
    assert Membership.objects.filter(pk=foreign.pk).exists()


def test_member_forms_need_csrf(admin_user, project):
    strict = Client(enforce_csrf_checks=True)
    strict.force_login(admin_user)
    assert strict.post("/p/vision/members/", {"email": "outsider@example.com", "role": "member"}).status_code == 403
    membership = Membership.objects.get(project=project, role="member")
    assert strict.post(f"/p/vision/members/{membership.pk}/remove/").status_code == 403
    assert len(members_of(project)) == 2


# --- Connect panel -----------------------------------------------------------------------
@pytest.mark.parametrize("persona,status", [("admin_user", 200), ("member_user", 404), ("outsider_user", 404)])
def test_connect_panel_is_for_project_admins(client, request, project, persona, status):
    client.force_login(request.getfixturevalue(persona))
    assert client.get("/p/vision/connect/").status_code == status
    if status == 404:
        assert client.post("/p/vision/connect/test/").status_code == 404
        assert not WebhookDelivery.objects.exists()


def test_send_test_delivery_arrives_over_http_and_is_listed(client, admin_user, project, live_server, settings):
    settings.PUBLIC_URL = live_server.url
    client.force_login(admin_user)
    response = client.post("/p/vision/connect/test/", follow=True)
    html = response.content.decode()
    assert f"Test delivery arrived: {live_server.url}/webhooks/github/vision/ answered HTTP 202." in html
    delivery = WebhookDelivery.objects.get(project=project)
    assert delivery.provider == "github" and delivery.delivery_id.startswith("aichor-test-")
    assert delivery.experiment is None and project.experiments.count() == 0
    assert delivery.delivery_id in html and "started nothing" in html


def test_send_test_delivery_reports_an_unreachable_url(client, admin_user, project, settings):
    settings.PUBLIC_URL = "http://127.0.0.1:9"  # the discard port: nothing listens there
    client.force_login(admin_user)
    html = client.post("/p/vision/connect/test/", follow=True).content.decode()
    assert "did not arrive: http://127.0.0.1:9/webhooks/github/vision/ is unreachable from the server" in html
    assert not WebhookDelivery.objects.exists()
    assert client.get("/p/vision/connect/test/").status_code == 405
