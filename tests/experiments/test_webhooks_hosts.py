"""Deliveries shaped as GitHub and GitLab really send them (their documented push events, every
field and header): GitHub's form encoding, GitLab without an event UUID, tag pushes and branch
deletions (issue 14 item 5)."""

import json
import uuid
from urllib.parse import urlencode

import pytest

from experiments.models import Experiment, WebhookDelivery
from tests.helpers import github_signature

pytestmark = pytest.mark.django_db

ZERO = "0" * 40
SHA = "7fd1a60b01f91b314f59955a4e4d4e80d8edf11d"
BEFORE = "95790bf891e76fee5e1747ab589903a6a1f80f22"


def github_push_payload(project, *, ref="refs/heads/main", sha=SHA, message="aichor[train.yaml]: lr 3e-4", **extra):
    """GitHub's push event (docs: webhook-events-and-payloads#push), abridged only in URLs."""
    repository = {
        "id": 35129377,
        "node_id": "MDEwOlJlcG9zaXRvcnkzNTEyOTM3Nw==",
        "name": "vision",
        "full_name": "acme/vision",
        "private": True,
        "owner": {"name": "acme", "email": None, "login": "acme", "id": 21031067, "type": "Organization"},
        "html_url": "https://github.com/acme/vision",
        "clone_url": project.repo_clone_url,
        "git_url": "git://github.com/acme/vision.git",
        "ssh_url": "git@github.com:acme/vision.git",
        "default_branch": "main",
        "master_branch": "main",
        "pushed_at": 1719916800,
    }
    commit = {
        "id": sha,
        "tree_id": "f9d2a07e9488b91af2641b26b9407fe22a451433",
        "distinct": True,
        "message": message,
        "timestamp": "2026-11-30T10:12:41+01:00",
        "url": f"https://github.com/acme/vision/commit/{sha}",
        "author": {"name": "Ada Researcher", "email": "ada@example.com", "username": "ada-r"},
        "committer": {"name": "GitHub", "email": "noreply@github.com", "username": "web-flow"},
        "added": ["aichor_manifests/train.yaml"],
        "removed": [],
        "modified": ["src/train.py"],
    }
    payload = {
        "ref": ref,
        "before": BEFORE,
        "after": sha,
        "repository": repository,
        "pusher": {"name": "ada-r", "email": "ada@example.com"},
        "sender": {"login": "ada-r", "id": 6752317, "type": "User", "site_admin": False},
        "created": False,
        "deleted": False,
        "forced": False,
        "base_ref": None,
        "compare": f"https://github.com/acme/vision/compare/{BEFORE[:12]}...{sha[:12]}",
        "commits": [commit],
        "head_commit": commit,
    }
    return {**payload, **extra}


def github_delivery(client, project, payload: dict, *, form: bool, delivery: str | None = None):
    """Posted as GitHub posts it: the form encoding puts the JSON in `payload=`, and the
    signature covers the raw body either way."""
    if form:
        body, content_type = urlencode({"payload": json.dumps(payload)}).encode(), "application/x-www-form-urlencoded"
    else:
        body, content_type = json.dumps(payload).encode(), "application/json"
    return client.post(
        f"/webhooks/github/{project.slug}/",
        data=body,
        content_type=content_type,
        headers={
            "User-Agent": "GitHub-Hookshot/044aadd",
            "X-GitHub-Event": "push",
            "X-GitHub-Delivery": delivery or str(uuid.uuid4()),
            "X-GitHub-Hook-ID": "292430182",
            "X-GitHub-Hook-Installation-Target-Type": "repository",
            "X-Hub-Signature": "sha1=ignored-by-aichor",
            "X-Hub-Signature-256": github_signature(body),
        },
    )


def gitlab_push_payload(project, *, ref="refs/heads/main", after=SHA, checkout_sha=SHA, commits=None, **extra):
    """GitLab's Push Hook (docs: user/project/integrations/webhook_events#push-events)."""
    if commits is None:
        commits = [
            {
                "id": BEFORE,
                "message": "Update the data loader\n",
                "title": "Update the data loader",
                "timestamp": "2026-11-30T09:57:08+01:00",
                "url": f"https://gitlab.example.com/acme/vision/-/commit/{BEFORE}",
                "author": {"name": "Ada Researcher", "email": "ada@example.com"},
                "added": [],
                "modified": ["src/data.py"],
                "removed": [],
            },
            {
                "id": SHA,
                "message": "exp: bigger batch\n",
                "title": "exp: bigger batch",
                "timestamp": "2026-11-30T10:12:41+01:00",
                "url": f"https://gitlab.example.com/acme/vision/-/commit/{SHA}",
                "author": {"name": "Ada Researcher", "email": "ada@example.com"},
                "added": [],
                "modified": ["manifest.yaml"],
                "removed": [],
            },
        ]
    payload = {
        "object_kind": "push",
        "event_name": "push",
        "before": BEFORE,
        "after": after,
        "ref": ref,
        "ref_protected": True,
        "checkout_sha": checkout_sha,
        "message": None,
        "user_id": 4,
        "user_name": "Ada Researcher",
        "user_username": "ada-r",
        "user_email": "",
        "user_avatar": "https://gitlab.example.com/uploads/-/system/user/avatar/4/avatar.jpg",
        "project_id": 15,
        "project": {
            "id": 15,
            "name": "Vision",
            "description": "",
            "web_url": "https://gitlab.example.com/acme/vision",
            "git_ssh_url": "git@gitlab.example.com:acme/vision.git",
            "git_http_url": project.repo_clone_url,
            "namespace": "acme",
            "visibility_level": 0,
            "path_with_namespace": "acme/vision",
            "default_branch": "main",
        },
        "commits": commits,
        "total_commits_count": len(commits),
        "push_options": {},
        "repository": {
            "name": "Vision",
            "url": "git@gitlab.example.com:acme/vision.git",
            "description": "",
            "homepage": "https://gitlab.example.com/acme/vision",
            "git_http_url": project.repo_clone_url,
            "git_ssh_url": "git@gitlab.example.com:acme/vision.git",
            "visibility_level": 0,
        },
    }
    return {**payload, **extra}


def gitlab_delivery(client, project, payload: dict, *, event: str = "Push Hook", uuid_header: str | None = None):
    """Older GitLab versions send no X-Gitlab-Event-UUID (nor X-Gitlab-Webhook-UUID)."""
    headers = {"User-Agent": "GitLab/15.11.13", "X-Gitlab-Event": event, "X-Gitlab-Token": "s3cret-webhook"}
    if uuid_header:
        headers |= {"X-Gitlab-Event-UUID": uuid_header, "X-Gitlab-Instance": "https://gitlab.example.com"}
    return client.post(
        f"/webhooks/gitlab/{project.slug}/", data=json.dumps(payload), content_type="application/json", headers=headers
    )


# --- GitHub ---------------------------------------------------------------------------------
def test_github_form_encoded_push_starts_the_experiment(client, project):
    response = github_delivery(client, project, github_push_payload(project), form=True)
    assert response.status_code == 201, response.content
    experiment = Experiment.objects.get()
    assert (experiment.commit_sha, experiment.branch) == (SHA, "main")
    assert (experiment.manifest_path, experiment.author_name) == ("aichor_manifests/train.yaml", "ada-r")


def test_github_form_signature_is_over_the_raw_body(client, project):
    payload = github_push_payload(project)
    body = urlencode({"payload": json.dumps(payload)}).encode()
    # Signed over the JSON alone (what a proxy re-encoding the form would leave): refused.
    forged = client.post(
        f"/webhooks/github/{project.slug}/",
        data=body,
        content_type="application/x-www-form-urlencoded",
        headers={
            "X-GitHub-Event": "push",
            "X-GitHub-Delivery": "d1",
            "X-Hub-Signature-256": github_signature(json.dumps(payload).encode()),
        },
    )
    assert forged.status_code == 403
    assert not Experiment.objects.exists()


@pytest.mark.parametrize("form", [True, False])
def test_github_tag_push_is_acknowledged_and_starts_nothing(client, project, form):
    payload = github_push_payload(project, ref="refs/tags/v1.2.0", base_ref="refs/heads/main", created=True)
    response = github_delivery(client, project, payload, form=form)
    assert response.status_code == 202
    assert response.json() == {"created": False, "reason": "tag pushes start nothing"}
    assert not Experiment.objects.exists()


@pytest.mark.parametrize("form", [True, False])
def test_github_branch_deletion_is_acknowledged_and_starts_nothing(client, project, form):
    payload = github_push_payload(project, ref="refs/heads/old-idea", after=ZERO, deleted=True, head_commit=None)
    payload["commits"] = []
    response = github_delivery(client, project, payload, form=form)
    assert response.status_code == 202
    assert response.json() == {"created": False, "reason": "branch deletions start nothing"}
    assert not Experiment.objects.exists()


# --- GitLab ---------------------------------------------------------------------------------
def test_gitlab_push_without_event_uuid_starts_once(client, project):
    payload = gitlab_push_payload(project)
    first = gitlab_delivery(client, project, payload)
    assert first.status_code == 201, first.content
    experiment = Experiment.objects.get()
    assert (experiment.commit_sha, experiment.manifest_path) == (SHA, "manifest.yaml")
    assert experiment.message == "exp: bigger batch\n" and experiment.author_name == "ada-r"
    # GitLab retries a delivery it thinks failed: the same body, still without a UUID.
    again = gitlab_delivery(client, project, payload)
    assert again.status_code == 200 and again.json()["created"] is False
    assert Experiment.objects.count() == 1
    assert WebhookDelivery.objects.get().delivery_id.startswith("sha256:")


def test_gitlab_push_with_event_uuid_still_starts(client, project):
    response = gitlab_delivery(client, project, gitlab_push_payload(project), uuid_header=str(uuid.uuid4()))
    assert response.status_code == 201, response.content


@pytest.mark.parametrize("checkout_sha", [None, ZERO])
def test_gitlab_branch_deletion_is_acknowledged_and_starts_nothing(client, project, checkout_sha):
    payload = gitlab_push_payload(project, ref="refs/heads/old-idea", after=ZERO, checkout_sha=checkout_sha, commits=[])
    response = gitlab_delivery(client, project, payload)
    assert response.status_code == 202
    assert response.json() == {"created": False, "reason": "branch deletions start nothing"}
    assert not Experiment.objects.exists()


def test_gitlab_tag_push_is_acknowledged_and_starts_nothing(client, project):
    # A tag pushed where push events include tags (object_kind push, ref refs/tags/...) ...
    response = gitlab_delivery(client, project, gitlab_push_payload(project, ref="refs/tags/v1.2.0"))
    assert response.status_code == 202
    assert response.json()["reason"] == "tag pushes start nothing"
    # ... and GitLab's own Tag Push Hook.
    tag_hook = gitlab_push_payload(project, ref="refs/tags/v1.2.0", object_kind="tag_push", event_name="tag_push")
    assert gitlab_delivery(client, project, tag_hook, event="Tag Push Hook").status_code == 202
    assert not Experiment.objects.exists()
