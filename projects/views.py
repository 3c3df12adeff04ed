"""Home, login and the project details page."""

from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import ValidationError
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.urls import reverse
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from projects import services
from projects.access import get_project
from projects.forms import MemberForm, ProjectForm
from projects.models import Membership, Project


def remember(request: HttpRequest, project: Project) -> None:
    """Keep the user's last project in the session (written only when it changes, so a poll
    does not cost a session UPDATE). The engine filter is kept by the experiments list."""
    if request.session.get("project") != project.slug:
        request.session["project"] = project.slug


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
    return _details_page(request, project, role, MemberForm())


def _details_page(request: HttpRequest, project: Project, role: str, member_form: MemberForm, status: int = 200):
    public = settings.PUBLIC_URL
    context = {
        "project": project,
        "role": role,
        "section": "details",
        "is_admin": role == Membership.Role.ADMIN,
        "engines": list(project.engines.all()),
        "members": list(project.memberships.select_related("user").order_by("user__username")),
        "member_form": member_form,
        "webhook_urls": {
            "GitHub": public + reverse("webhook-github", kwargs={"slug": project.slug}),
            "GitLab": public + reverse("webhook-gitlab", kwargs={"slug": project.slug}),
        },
    }
    return render(request, "projects/detail.html", context, status=status)


@login_required
@require_http_methods(["GET", "POST"])
def project_create(request: HttpRequest) -> HttpResponse:
    # Organisation admins only; to anyone else the page does not exist.
    if not request.user.is_superuser:
        raise Http404("No such page")
    form = ProjectForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        data = form.cleaned_data
        try:
            project = services.create_project(
                name=data["name"],
                slug=data["slug"],
                repo_clone_url=data["repo_clone_url"],
                repo_web_url=data["repo_web_url"],
                engines=list(data["engines"]),
                admins=[request.user],
            )
        except ValidationError as exc:
            form.add_error(None, exc)
        else:
            return redirect("project-connect", slug=project.slug)
    status = 400 if form.errors else 200
    return render(request, "projects/new.html", {"form": form, "section": "new-project"}, status=status)


@login_required
@require_POST
def member_set(request: HttpRequest, slug: str) -> HttpResponse:
    project, role = get_project(request.user, slug, admin=True)
    form = MemberForm(request.POST)
    if form.is_valid():
        try:
            membership = services.set_member_by_email(project, form.cleaned_data["email"], form.cleaned_data["role"])
        except ValidationError as exc:
            form.add_error(None if isinstance(exc, services.LastAdmin) else "email", exc.messages)
        else:
            messages.success(request, f"{membership.user.get_username()} is now {membership.role} of {project.name}.")
            return redirect("project-detail", slug=slug)
    return _details_page(request, project, role, form, status=400)


@login_required
@require_POST
def member_remove(request: HttpRequest, slug: str, pk: int) -> HttpResponse:
    project, _ = get_project(request.user, slug, admin=True)
    try:
        membership = services.remove_member(project, pk)
    except services.LastAdmin as exc:
        messages.error(request, exc.messages[0])
    else:
        if membership is None:
            raise Http404("No such member")
        messages.success(request, f"{membership.user.get_username()} removed from {project.name}.")
    return redirect("project-detail", slug=slug)
