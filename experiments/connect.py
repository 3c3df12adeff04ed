"""The *Connect your repository* panel: where a new project ends. It shows what to paste into the
Git host's webhook settings, sends a signed test delivery to the project's own webhook endpoint
and lists the last deliveries received (it lives here, not in `projects`, because deliveries are
recorded by the webhook endpoints in this app)."""

import hashlib
import hmac
import json
import uuid

import requests
from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.urls import reverse
from django.views.decorators.http import require_GET, require_POST

from experiments.models import WebhookDelivery
from projects.access import get_project
from projects.models import Project

RECENT_DELIVERIES = 10
# Far below the Git hosts' own 10 s: the endpoint records and answers within milliseconds.
TEST_TIMEOUT = 5


def _webhook_url(project: Project, provider: str) -> str:
    return settings.PUBLIC_URL + reverse(f"webhook-{provider}", kwargs={"slug": project.slug})


@login_required
@require_GET
def connect(request: HttpRequest, slug: str) -> HttpResponse:
    project, _ = get_project(request.user, slug, admin=True)
    deliveries = (
        WebhookDelivery.objects.filter(project=project)
        .select_related("experiment")
        .order_by("-received_at")[:RECENT_DELIVERIES]
    )
    context = {
        "project": project,
        "section": "details",
        "github_url": _webhook_url(project, "github"),
        "gitlab_url": _webhook_url(project, "gitlab"),
        "deliveries": deliveries,
    }
    return render(request, "experiments/connect.html", context)


@login_required
@require_POST
def send_test(request: HttpRequest, slug: str) -> HttpResponse:
    """POST a signed GitHub `ping` to the project's public webhook URL, through the network like
    GitHub would: it proves the URL is reachable from here and the secret matches, and starts nothing."""
    project, _ = get_project(request.user, slug, admin=True)
    delivery_id = f"aichor-test-{uuid.uuid4()}"
    body = json.dumps({"zen": "Test delivery from the aichor dashboard.", "hook_id": delivery_id}).encode()
    signature = hmac.new(project.webhook_secret.encode(), body, hashlib.sha256).hexdigest()
    url = _webhook_url(project, "github")
    headers = {
        "Content-Type": "application/json",
        "X-GitHub-Event": "ping",
        "X-GitHub-Delivery": delivery_id,
        "X-Hub-Signature-256": f"sha256={signature}",
        "User-Agent": "aichor-test-delivery",
    }
    try:
        response = requests.post(url, data=body, headers=headers, timeout=TEST_TIMEOUT, allow_redirects=False)
    except requests.RequestException as exc:
        messages.error(
            request,
            f"The test delivery did not arrive: {url} is unreachable from the server ({exc.__class__.__name__}).",
        )
    else:
        if response.status_code < 300:
            messages.success(request, f"Test delivery arrived: {url} answered HTTP {response.status_code}.")
        else:
            messages.error(request, f"The test delivery was refused: {url} answered HTTP {response.status_code}.")
    return redirect("project-connect", slug=slug)
