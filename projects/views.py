"""Home, login and the project details page."""

from django.conf import settings
from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.urls import reverse
from django.views.decorators.http import require_GET

from experiments.views import remember
from projects.access import get_project, role_in
from projects.models import Membership, Project


@login_required
@require_GET
def home(request: HttpRequest) -> HttpResponse:
    """Send the user to the project they asked for, else the one they used last, else their first."""
    projects = Project.objects.all() if request.user.is_superuser else Project.objects.for_user(request.user)
    wanted = request.GET.get("project") or request.session.get("project")
    project = projects.filter(slug=wanted).first() if wanted else None
    project = project or projects.order_by("name").first()
    if project is None:
        return render(request, "projects/no_projects.html")
    return redirect("experiment-list", slug=project.slug)


@login_required
@require_GET
def project_detail(request: HttpRequest, slug: str) -> HttpResponse:
    project = get_project(request.user, slug)
    remember(request, project)
    role = role_in(request.user, project)
    public = settings.PUBLIC_URL
    context = {
        "project": project,
        "role": role,
        "section": "details",
        "is_admin": role == Membership.Role.ADMIN,
        "engines": list(project.engines.all()),
        "members": list(project.memberships.select_related("user").order_by("user__username")),
        "webhook_urls": {
            "GitHub": public + reverse("webhook-github", kwargs={"slug": project.slug}),
            "GitLab": public + reverse("webhook-gitlab", kwargs={"slug": project.slug}),
        },
    }
    return render(request, "projects/detail.html", context)
