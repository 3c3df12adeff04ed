"""The access helpers: the one gate for every protected object."""

import uuid

import pytest
from django.contrib.auth.models import AnonymousUser
from django.http import Http404

from experiments.services import create_experiment
from projects.access import get_experiment, get_project

pytestmark = pytest.mark.django_db


def test_member_is_not_admin_even_when_the_project_has_admins(project, member_user, admin_user):
    assert get_project(admin_user, project.slug, admin=True) == project
    assert get_project(member_user, project.slug) == project
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
