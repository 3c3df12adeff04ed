"""The Django admin: project admins manage their own projects and see nothing of the others."""

import re

import pytest

from datasets.storage import bucket_root
from experiments import services
from projects.models import Membership, Project
from projects.services import create_project
from tests.helpers import project_change_form

pytestmark = pytest.mark.django_db


@pytest.fixture
def other_project(outsider_user, local_engine):
    return create_project(name="Secret", slug="secret", engines=[local_engine], admins=[outsider_user])


def test_project_admin_enters_the_admin_and_sees_only_their_projects(client, admin_user, project, other_project):
    assert not admin_user.is_staff
    client.force_login(admin_user)
    html = client.get("/admin/projects/project/").content.decode()
    assert "Vision" in html and "Secret" not in html
    assert client.get(f"/admin/projects/project/{project.pk}/change/").status_code == 200
    # Someone else's project: the admin answers as for a missing object.
    response = client.get(f"/admin/projects/project/{other_project.pk}/change/")
    assert response.status_code == 302 and response["Location"] == "/admin/"


def test_project_admin_edits_settings_and_members(client, admin_user, member_user, project, django_user_model):
    newcomer = django_user_model.objects.create_user("new@example.com", "new@example.com", "pw-new-12345")
    client.force_login(admin_user)
    data = project_change_form(
        project,
        new_member=newcomer.email,
        name="Vision",
        repo_clone_url="https://github.com/acme/vision2.git",
        repo_web_url="https://github.com/acme/vision2",
    )
    response = client.post(f"/admin/projects/project/{project.pk}/change/", data)
    assert response.status_code == 302, response.content.decode()[:3000]
    project.refresh_from_db()
    assert project.repo_web_url == "https://github.com/acme/vision2"
    assert Membership.objects.filter(project=project, user=newcomer, role="member").exists()


def membership_data(project, add_email: str) -> dict:
    """The change form as the admin page posts it, with one new member row."""
    return project_change_form(project, new_member=add_email)


def test_member_picker_shows_only_people_sharing_a_project(
    client, admin_user, member_user, project, other_project, django_user_model
):
    django_user_model.objects.create_user("stranger@example.com", "stranger@example.com", "pw-str-12345")
    client.force_login(admin_user)
    html = client.get(f"/admin/projects/project/{project.pk}/change/").content.decode()
    assert "member@example.com" in html  # a colleague, suggested
    assert "stranger@example.com" not in html
    assert "outsider@example.com" not in html  # admin of another project only
    assert "<datalist" in html


def test_superuser_picker_suggests_every_user(client, project, django_user_model):
    root = django_user_model.objects.create_superuser("root@example.com", "root@example.com", "pw-root-123")
    django_user_model.objects.create_user("stranger@example.com", "stranger@example.com", "pw-str-12345")
    client.force_login(root)
    html = client.get(f"/admin/projects/project/{project.pk}/change/").content.decode()
    assert "stranger@example.com" in html


def test_project_admin_adds_a_member_by_exact_email(client, admin_user, project, django_user_model):
    stranger = django_user_model.objects.create_user("Stranger@Example.com", "Stranger@Example.com", "pw-s-12345")
    client.force_login(admin_user)
    response = client.post(
        f"/admin/projects/project/{project.pk}/change/", membership_data(project, "stranger@example.com")
    )
    assert response.status_code == 302, response.content.decode()[:3000]
    assert Membership.objects.filter(project=project, user=stranger, role="member").exists()


def test_unknown_email_is_a_form_error(client, admin_user, project):
    client.force_login(admin_user)
    before = Membership.objects.filter(project=project).count()
    response = client.post(
        f"/admin/projects/project/{project.pk}/change/", membership_data(project, "nobody@example.com")
    )
    assert response.status_code == 200
    assert "No user with the e-mail nobody@example.com." in response.content.decode()
    assert Membership.objects.filter(project=project).count() == before


def test_adding_an_existing_member_again_is_a_form_error(client, admin_user, member_user, project):
    client.force_login(admin_user)
    response = client.post(f"/admin/projects/project/{project.pk}/change/", membership_data(project, member_user.email))
    assert response.status_code == 200
    assert "member@example.com is already a member of this project." in response.content.decode()


def test_project_admin_cannot_create_projects_or_touch_engines_and_users(client, admin_user, project):
    client.force_login(admin_user)
    assert client.get("/admin/projects/project/add/").status_code == 403
    assert client.get("/admin/projects/engine/").status_code == 403
    assert client.get("/admin/auth/user/").status_code == 403
    index = client.get("/admin/").content.decode()
    assert "/admin/projects/project/" in index and "/admin/projects/engine/" not in index


def test_members_and_outsiders_do_not_enter_the_admin(client, member_user, outsider_user, project):
    for user in (member_user, outsider_user):
        client.force_login(user)
        assert client.get("/admin/").status_code == 302
        assert client.get("/admin/projects/project/").status_code == 302


def test_project_admin_sees_only_their_experiments_read_only(client, admin_user, project, other_project):
    mine = services.create_experiment(project=project, message="mine", manifest_path="m.yaml")
    theirs = services.create_experiment(project=other_project, message="theirs", manifest_path="m.yaml")
    client.force_login(admin_user)
    html = client.get("/admin/experiments/experiment/").content.decode()
    assert mine.short_id in html and theirs.short_id not in html
    assert "Secret" not in html  # no project filter listing other projects
    page = client.get(f"/admin/experiments/experiment/{mine.pk}/change/")
    assert page.status_code == 200 and "Waiting" in page.content.decode()
    assert client.get(f"/admin/experiments/experiment/{theirs.pk}/change/").status_code == 302
    client.post(f"/admin/experiments/experiment/{mine.pk}/change/", {"status": "Succeeded"})
    mine.refresh_from_db()
    assert mine.status == "Created"


def test_superuser_sees_everything(client, django_user_model, project, other_project):
    boss = django_user_model.objects.create_superuser("boss@example.com", "boss@example.com", "pw-boss-123")
    client.force_login(boss)
    html = client.get("/admin/projects/project/").content.decode()
    assert "Vision" in html and "Secret" in html
    assert client.get("/admin/projects/project/add/").status_code == 200
    response = client.post(
        "/admin/projects/project/add/",
        {
            "name": "Speech",
            "slug": "speech",
            "repo_clone_url": "",
            "repo_web_url": "",
            "engines": [project.default_engine_id],
            "default_engine": project.default_engine_id,
            "memberships-TOTAL_FORMS": "0",
            "memberships-INITIAL_FORMS": "0",
            "memberships-MIN_NUM_FORMS": "0",
            "memberships-MAX_NUM_FORMS": "1000",
        },
    )
    assert response.status_code == 302, response.content.decode()[:2000]
    from projects.models import Project

    speech = Project.objects.get(slug="speech")
    assert speech.namespace.startswith("speech-") and speech.webhook_secret


def test_project_added_in_the_admin_is_made_like_any_other(
    client, django_user_model, local_engine, member_user, django_capture_on_commit_callbacks
):
    root = django_user_model.objects.create_superuser("root@example.com", "root@example.com", "pw-root-123")
    client.force_login(root)
    data = {
        "name": "Speech",
        "slug": "speech",
        "repo_clone_url": "https://github.com/acme/speech.git",
        "repo_web_url": "https://github.com/acme/speech",
        "engines": [local_engine.pk],
        "default_engine": local_engine.pk,
        "memberships-TOTAL_FORMS": "1",
        "memberships-INITIAL_FORMS": "0",
        "memberships-MIN_NUM_FORMS": "0",
        "memberships-MAX_NUM_FORMS": "1000",
        "memberships-0-email": member_user.email,
        "memberships-0-role": "admin",
    }
    with django_capture_on_commit_callbacks(execute=True):
        response = client.post("/admin/projects/project/add/", data)
    assert response.status_code == 302, response.content.decode()[:3000]
    added = Project.objects.get(slug="speech")
    reference = create_project(name="Reference", slug="reference", engines=[local_engine])
    assert re.fullmatch(r"speech-[0-9a-f]{16}", added.namespace)
    assert re.fullmatch(r"reference-[0-9a-f]{16}", reference.namespace)
    assert len(added.webhook_secret) == len(reference.webhook_secret) == 40
    assert list(added.engines.all()) == [local_engine] and added.default_engine == local_engine
    assert Membership.objects.filter(project=added, user=member_user, role="admin").exists()
    for bucket in (added.inputs_bucket, added.outputs_bucket):
        assert bucket_root(bucket).is_dir()
