"""The only way views, consumers and API endpoints fetch protected objects. Anything the user
may not see answers 404, never 403, so outsiders learn nothing about what exists."""

import uuid

from django.http import Http404

from experiments.models import Experiment
from projects.models import Membership, Project


def get_project(user, slug: str, *, admin: bool = False) -> Project:
    if user.is_authenticated and user.is_superuser:
        # Organisation admins see every project.
        qs = Project.objects.all()
    elif admin:
        # One filter() call: the user and the role must be the same membership row.
        qs = Project.objects.filter(memberships__user=user, memberships__role=Membership.Role.ADMIN)
    else:
        qs = Project.objects.for_user(user)
    try:
        return qs.select_related("default_engine").distinct().get(slug=slug)
    except Project.DoesNotExist:
        raise Http404("No such project") from None


def get_experiment(user, experiment_id) -> Experiment:
    try:
        pk = uuid.UUID(str(experiment_id))
    except ValueError:
        raise Http404("No such experiment") from None
    qs = Experiment.objects.all() if user.is_authenticated and user.is_superuser else Experiment.objects.for_user(user)
    try:
        return qs.select_related("project", "engine", "author").distinct().get(pk=pk)
    except Experiment.DoesNotExist:
        raise Http404("No such experiment") from None


def role_in(user, project: Project) -> str | None:
    if not user.is_authenticated:
        return None
    if user.is_superuser:
        return Membership.Role.ADMIN
    membership = Membership.objects.filter(user=user, project=project).only("role").first()
    return membership.role if membership else None
