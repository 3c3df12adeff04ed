"""Notification settings of a project (its admins: Git host token, endpoints, deliveries) and a
user's own e-mail preferences."""

from uuid import UUID

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from notifications import services
from notifications.forms import EmailPreferenceForm, EndpointForm, GitHostForm
from notifications.models import EmailPreference, GitHost
from projects.access import get_project
from projects.models import Project

DELIVERIES_SHOWN = 10


def _admin_project(request: HttpRequest, slug: str) -> Project:
    project, _ = get_project(request.user, slug, admin=True)
    return project


def _page(request: HttpRequest, project: Project, *, git_host_form=None, endpoint_form=None) -> HttpResponse:
    git_host = GitHost.objects.filter(project=project).first()
    if git_host_form is None:
        initial = (
            {"kind": git_host.kind, "api_url": git_host.api_url, "repository": git_host.repository} if git_host else {}
        )
        git_host_form = GitHostForm(initial=initial)
    endpoints = list(project.notification_endpoints.all())
    for endpoint in endpoints:
        endpoint.recent = list(endpoint.deliveries.order_by("-created_at")[:DELIVERIES_SHOWN])
    context = {
        "project": project,
        "section": "details",
        "git_host": git_host,
        "git_host_form": git_host_form,
        "endpoint_form": endpoint_form or EndpointForm(),
        "endpoints": endpoints,
        "errors": services.last_posting_errors(project),
    }
    invalid = git_host_form.is_bound or (endpoint_form is not None and endpoint_form.is_bound)
    return render(request, "notifications/settings.html", context, status=400 if invalid else 200)


@login_required
@require_GET
def notification_settings(request: HttpRequest, slug: str) -> HttpResponse:
    return _page(request, _admin_project(request, slug))


@login_required
@require_POST
def git_host(request: HttpRequest, slug: str) -> HttpResponse:
    project = _admin_project(request, slug)
    form = GitHostForm(request.POST)
    if not form.is_valid():
        return _page(request, project, git_host_form=form)
    saved = services.save_git_host(project, **form.cleaned_data)
    ending = f", token ending in {saved.token_ending}" if saved.token_ending else ", no token"
    messages.success(request, f"Git host settings saved{ending}.")
    return redirect("notification-settings", slug=project.slug)


@login_required
@require_POST
def git_host_token_remove(request: HttpRequest, slug: str) -> HttpResponse:
    project = _admin_project(request, slug)
    if services.remove_git_host_token(project):
        messages.success(request, "Token removed: commit statuses are no longer posted.")
    return redirect("notification-settings", slug=project.slug)


@login_required
@require_POST
def endpoint_create(request: HttpRequest, slug: str) -> HttpResponse:
    project = _admin_project(request, slug)
    form = EndpointForm(request.POST)
    if not form.is_valid():
        return _page(request, project, endpoint_form=form)
    endpoint = services.create_endpoint(project, **form.cleaned_data)
    messages.success(request, f"Endpoint {endpoint.url} added.")
    return redirect("notification-settings", slug=project.slug)


@login_required
@require_POST
def endpoint_delete(request: HttpRequest, slug: str, pk: int) -> HttpResponse:
    project = _admin_project(request, slug)
    if not services.delete_endpoint(project, pk):
        raise Http404("No such endpoint")
    return redirect("notification-settings", slug=project.slug)


@login_required
@require_POST
def delivery_redeliver(request: HttpRequest, slug: str, delivery_id: UUID) -> HttpResponse:
    project = _admin_project(request, slug)
    if services.redeliver(project, delivery_id) is None:
        raise Http404("No such delivery")
    messages.success(request, "Redelivery queued.")
    return redirect("notification-settings", slug=project.slug)


@login_required
@require_http_methods(["GET", "POST"])
def email_preferences(request: HttpRequest) -> HttpResponse:
    current = EmailPreference.objects.filter(user=request.user).first() or EmailPreference(user=request.user)
    form = EmailPreferenceForm(request.POST or None, instance=current)
    if request.method == "POST" and form.is_valid():
        services.save_email_preference(request.user, **form.cleaned_data)
        messages.success(request, "E-mail preferences saved.")
        return redirect("email-preferences")
    context = {"form": form, "section": "notifications", "has_email": bool(request.user.email)}
    return render(request, "notifications/email.html", context)
