"""Git host webhooks: verify, pick the manifest from the head commit's message, record and
enqueue. Nothing slow happens here: Git hosts give up on a webhook after 10 s."""

import hashlib
import hmac
import json
import re

from django.http import HttpRequest, JsonResponse
from django.shortcuts import get_object_or_404
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_POST

from experiments import services
from projects.models import Project

# aichor[path]: message  or  aichor(path): message
RULE = re.compile(r"^aichor(?:\[(?P<b>[^\]\n]*)\]|\((?P<p>[^)\n]*)\)):")
LEGACY = re.compile(r"^(exp|EXP)(?![A-Za-z0-9])")


def manifest_path_for(message: str) -> tuple[str | None, str]:
    """(manifest path or None, why not). Only the head commit's message counts."""
    match = RULE.match(message)
    if match:
        path = (match.group("b") if match.group("b") is not None else match.group("p")).strip()
        if not path.endswith((".yaml", ".yml")):
            return None, f"manifest path {path!r} must end in .yaml or .yml"
        if path.startswith("/") or "\\" in path or ".." in path or not path:
            return None, f"manifest path {path!r} is not allowed"
        return f"aichor_manifests/{path}", ""
    if LEGACY.match(message):
        return "manifest.yaml", ""
    return None, "the commit message does not ask for an experiment"


def _json(request: HttpRequest) -> dict | None:
    try:
        payload = json.loads(request.body)
    except (ValueError, UnicodeDecodeError):
        return None
    return payload if isinstance(payload, dict) else None


def _project(slug: str) -> Project:
    # Only what verifying and recording a delivery needs: this endpoint must answer fast.
    fields = ("id", "slug", "webhook_secret_encrypted", "repo_clone_url", "default_engine_id")
    return get_object_or_404(Project.objects.only(*fields), slug=slug)


def _trigger(project: Project, provider: str, delivery_id: str, *, sha, branch, message, author_name, clone_url):
    path, why = manifest_path_for(message or "")
    if path is None:
        services.record_ignored_delivery(project=project, provider=provider, delivery_id=delivery_id)
        return JsonResponse({"created": False, "reason": why}, status=202)
    experiment, created = services.create_experiment_from_push(
        project=project,
        provider=provider,
        delivery_id=delivery_id,
        clone_url=project.repo_clone_url or clone_url,
        commit_sha=sha,
        branch=branch,
        message=message,
        author_name=author_name,
        manifest_path=path,
    )
    if not created:
        return JsonResponse({"created": False, "reason": "delivery already received"}, status=200)
    return JsonResponse({"created": True, "experiment": str(experiment.pk)}, status=201)


@csrf_exempt
@require_POST
def github(request: HttpRequest, slug: str) -> JsonResponse:
    project = _project(slug)
    signature = request.headers.get("X-Hub-Signature-256", "")
    expected = "sha256=" + hmac.new(project.webhook_secret.encode(), request.body, hashlib.sha256).hexdigest()
    if not hmac.compare_digest(signature, expected):
        return JsonResponse({"error": "bad or missing X-Hub-Signature-256"}, status=403)
    event = request.headers.get("X-GitHub-Event", "")
    if event != "push":
        return JsonResponse({"created": False, "reason": f"{event or 'unknown'} events are ignored"}, status=202)
    payload = _json(request)
    delivery_id = request.headers.get("X-GitHub-Delivery", "")
    if payload is None or not delivery_id:
        return JsonResponse({"error": "a push needs a JSON body and X-GitHub-Delivery"}, status=400)
    head = payload.get("head_commit") or {}
    if not head or payload.get("deleted"):
        return JsonResponse({"created": False, "reason": "push without a head commit"}, status=202)
    author = head.get("author") or {}
    return _trigger(
        project,
        "github",
        delivery_id,
        sha=str(head.get("id", "")),
        branch=_branch(payload.get("ref")),
        message=str(head.get("message", "")),
        author_name=str(author.get("username") or author.get("email") or author.get("name") or ""),
        clone_url=str((payload.get("repository") or {}).get("clone_url", "")),
    )


@csrf_exempt
@require_POST
def gitlab(request: HttpRequest, slug: str) -> JsonResponse:
    project = _project(slug)
    token = request.headers.get("X-Gitlab-Token", "")
    if not hmac.compare_digest(token.encode(), project.webhook_secret.encode()):
        return JsonResponse({"error": "bad or missing X-Gitlab-Token"}, status=403)
    payload = _json(request)
    if request.headers.get("X-Gitlab-Event") != "Push Hook" or (payload or {}).get("object_kind") != "push":
        return JsonResponse({"created": False, "reason": "only push events start experiments"}, status=202)
    delivery_id = request.headers.get("X-Gitlab-Event-UUID", "")
    if not delivery_id:
        return JsonResponse({"error": "a push needs X-Gitlab-Event-UUID"}, status=400)
    sha = str(payload.get("checkout_sha") or payload.get("after") or "")
    commits = payload.get("commits") or []
    head = next((c for c in commits if c.get("id") == sha), commits[-1] if commits else None)
    if not head or not sha:
        return JsonResponse({"created": False, "reason": "push without a head commit"}, status=202)
    return _trigger(
        project,
        "gitlab",
        delivery_id,
        sha=sha,
        branch=_branch(payload.get("ref")),
        message=str(head.get("message", "")),
        author_name=str(payload.get("user_username") or (head.get("author") or {}).get("email") or ""),
        clone_url=str((payload.get("project") or {}).get("git_http_url", "")),
    )


def _branch(ref) -> str:
    ref = str(ref or "")
    return ref.removeprefix("refs/heads/")
