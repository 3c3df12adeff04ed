"""Home, login and the project details page."""

from django.conf import settings
from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.urls import reverse
from django.views.decorators.http import require_GET

from projects.access import get_project
from projects.models import Engine, Membership, Project


def remember(request: HttpRequest, project: Project, engine: Engine | None = None) -> None:
    """Keep the user's last project and engine in the session (written only when they change,
    so a poll does not cost a session UPDATE)."""
    if request.session.get("project") != project.slug:
        request.session["project"] = project.slug
    if engine and request.session.get(f"engine:{project.slug}") != engine.name:
        request.session[f"engine:{project.slug}"] = engine.name


@login_required
@require_GET
def home(request: HttpRequest) -> HttpResponse:
    """Send the user to the project they asked for, else the one they used last, else their first."""
    projects = Project.objects.visible_to(request.user)
    wanted = request.GET.get("project") or request.session.get("project")
    project = projects.filter(slug=wanted).first() if wanted else None
    project = project or projects.order_by("name").first()
    if project is None:
        return render(request, "projects/no_projects.html")
    return redirect("experiment-list", slug=project.slug)


@login_required
@require_GET
def project_detail(request: HttpRequest, slug: str) -> HttpResponse:
    project, role = get_project(request.user, slug)
    remember(request, project)
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
