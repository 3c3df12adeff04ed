"""The access helpers: the one gate for every protected object, answering with the caller's role."""

import uuid

import pytest
from django.contrib.auth.models import AnonymousUser
from django.db import connection
from django.http import Http404
from django.test.utils import CaptureQueriesContext

from experiments.access import get_experiment
from experiments.services import create_experiment
from projects.access import get_project

pytestmark = pytest.mark.django_db


def test_member_is_not_admin_even_when_the_project_has_admins(project, member_user, admin_user):
    assert get_project(admin_user, project.slug, admin=True) == (project, "admin")
    assert get_project(member_user, project.slug) == (project, "member")
    with pytest.raises(Http404):
        get_project(member_user, project.slug, admin=True)


def test_outsider_and_anonymous_see_nothing(project, outsider_user):
    experiment = create_experiment(project=project, commit_sha="0" * 40, manifest_path="manifest.yaml")
    for user in (outsider_user, AnonymousUser()):
        with pytest.raises(Http404):
            get_project(user, project.slug)
        with pytest.raises(Http404):
            get_experiment(user, experiment.pk)


def test_bad_and_unknown_ids_are_404(project, member_user):
    for bad in ("not-a-uuid", uuid.uuid4(), "../etc"):
        with pytest.raises(Http404):
            get_experiment(member_user, bad)


def test_superuser_sees_every_project_and_experiment_as_admin(project, django_user_model):
    root = django_user_model.objects.create_superuser("root@example.com", "root@example.com", "pw-root-123")
    experiment = create_experiment(project=project, commit_sha="0" * 40, manifest_path="manifest.yaml")
    assert get_project(root, project.slug, admin=True) == (project, "admin")
    assert get_experiment(root, experiment.pk) == (experiment, "admin")


def test_experiment_and_role_come_in_one_query(project, member_user, django_assert_num_queries):
    experiment = create_experiment(project=project, commit_sha="0" * 40, manifest_path="manifest.yaml")
    with django_assert_num_queries(1):
        found, role = get_experiment(member_user, experiment.pk)
        assert (found.project.slug, found.engine.name, role) == (project.slug, project.default_engine.name, "member")


def membership_lookups(queries: CaptureQueriesContext) -> list[str]:
    """Queries that read only memberships by user: the separate role lookup the pages used to make."""
    return [
        q["sql"] for q in queries.captured_queries if q["sql"].split(" FROM ")[1].startswith('"projects_membership"')
    ]


def test_project_page_reads_the_role_with_the_project(client, member_user, project):
    client.force_login(member_user)
    client.get("/p/vision/details/")  # the first visit also remembers the project in the session
    with CaptureQueriesContext(connection) as queries:
        html = client.get("/p/vision/details/").content.decode()
    assert "<dt>Your role</dt><dd>member</dd>" in html
    # Session, user, the project with the role, its engines, its members, the top bar's
    # projects, the last commit status posting errors (notifications card).
    assert len(queries) == 7
    assert [sql for sql in membership_lookups(queries) if '"auth_user"' not in sql] == []


def test_experiment_page_reads_the_role_with_the_experiment(client, member_user, project):
    experiment = create_experiment(project=project, commit_sha="0" * 40, manifest_path="manifest.yaml")
    client.force_login(member_user)
    client.get(f"/experiments/{experiment.pk}/")  # the first visit also writes the session
    with CaptureQueriesContext(connection) as queries:
        assert client.get(f"/experiments/{experiment.pk}/").status_code == 200
    assert membership_lookups(queries) == []
    assert len(queries) <= 9
