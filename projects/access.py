"""The only way views, consumers and API endpoints fetch protected projects (experiments:
experiments/access.py). Anything the user may not see answers 404, never 403, so outsiders
learn nothing about what exists. Each helper returns the object and the user's role in its
project, read by the same query."""

from django.http import Http404

from projects.models import Membership, Project


def get_project(user, slug: str, *, admin: bool = False) -> tuple[Project, str]:
    qs = Project.objects.visible_to(user).select_related("default_engine")
    if admin:
        qs = qs.filter(role=Membership.Role.ADMIN)
    try:
        project = qs.get(slug=slug)
    except Project.DoesNotExist:
        raise Http404("No such project") from None
    return project, project.role
