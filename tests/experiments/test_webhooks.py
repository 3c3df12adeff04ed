"""Webhook endpoints: signature checks, idempotency, the commit-message rules (SPEC §2)."""

import json
import uuid

import pytest

from experiments.models import Experiment, WebhookDelivery
from experiments.webhooks import manifest_path_for
from tests.conftest import github_push, post_github

pytestmark = pytest.mark.django_db


def gitlab_push(
    client,
    project,
    *,
    sha: str,
    message: str,
    token: str = "s3cret-webhook",
    delivery: str | None = None,
    event: str = "Push Hook",
):
    body = {
        "object_kind": "push",
        "ref": "refs/heads/main",
        "checkout_sha": sha,
        "user_username": "researcher",
        "commits": [{"id": "0" * 40, "message": "older"}, {"id": sha, "message": message}],
        "project": {"git_http_url": project.repo_clone_url},
    }
    return client.post(
        f"/webhooks/gitlab/{project.slug}/",
        data=json.dumps(body),
        content_type="application/json",
        headers={
            "X-Gitlab-Token": token,
            "X-Gitlab-Event": event,
            "X-Gitlab-Event-UUID": delivery or str(uuid.uuid4()),
        },
    )


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        ("aichor[train.yaml]: try lr 3e-4", "aichor_manifests/train.yaml"),
        ("aichor(sub/dir/exp.yml): try", "aichor_manifests/sub/dir/exp.yml"),
        ("exp: try lr 3e-4", "manifest.yaml"),
        ("EXP-42 bigger batch", "manifest.yaml"),
        ("exp", "manifest.yaml"),
        ("experiment with things", None),
        ("fix typo", None),
        ("aichor[train.txt]: not yaml", None),
        ("aichor[../secrets.yaml]: escape", None),
        ("aichor[/etc/x.yaml]: absolute", None),
        ("aichor[a\\b.yaml]: backslash", None),
        ("Aichor[train.yaml]: wrong case", None),
    ],
)
def test_commit_message_rules_pick_the_manifest(message, expected):
    assert manifest_path_for(message)[0] == expected


def test_signed_push_creates_a_waiting_experiment(client, project):
    response = github_push(client, project, sha="a" * 40, message="aichor[train.yaml]: first run")
    assert response.status_code == 201
    experiment = Experiment.objects.get(pk=response.json()["experiment"])
    assert experiment.status == "Created"
    assert experiment.current_step == "Waiting"
    assert experiment.manifest_path == "aichor_manifests/train.yaml"
    assert experiment.commit_sha == "a" * 40
    assert experiment.branch == "main"
    assert experiment.author_name == "researcher"
    assert experiment.engine == project.default_engine
    assert [s.name for s in experiment.steps.all()] == [
        "Waiting",
        "Cloning",
        "Building",
        "Submitting",
        "Running",
        "Completed",
    ]


@pytest.mark.parametrize("secret", ["wrong-secret", ""])
def test_bad_signature_is_refused_and_creates_nothing(client, project, secret):
    response = github_push(client, project, sha="b" * 40, message="aichor[train.yaml]: x", secret=secret)
    assert response.status_code == 403
    assert not Experiment.objects.exists()
    assert not WebhookDelivery.objects.exists()


def test_missing_signature_is_refused(client, project):
    response = client.post(
        f"/webhooks/github/{project.slug}/",
        data=json.dumps({"head_commit": {"id": "c" * 40, "message": "exp: x"}}),
        content_type="application/json",
        headers={"X-GitHub-Event": "push", "X-GitHub-Delivery": "d1"},
    )
    assert response.status_code == 403
    assert not Experiment.objects.exists()


def test_replayed_delivery_creates_nothing_new(client, project):
    first = github_push(client, project, sha="d" * 40, message="exp: once", delivery="delivery-1")
    again = github_push(client, project, sha="d" * 40, message="exp: once", delivery="delivery-1")
    assert first.status_code == 201
    assert again.status_code == 200
    assert again.json()["created"] is False
    assert Experiment.objects.count() == 1


def test_message_without_rule_creates_nothing(client, project):
    response = github_push(client, project, sha="e" * 40, message="refactor data loader")
    assert response.status_code == 202
    assert not Experiment.objects.exists()


def test_dotdot_manifest_path_is_rejected(client, project):
    response = github_push(client, project, sha="f" * 40, message="aichor[../../etc/passwd.yaml]: escape")
    assert response.status_code == 202
    assert "not allowed" in response.json()["reason"]
    assert not Experiment.objects.exists()


def test_non_push_event_is_acknowledged_and_ignored(client, project):
    response = post_github(client, project, b'{"zen": "Keep it logically awesome."}', event="ping", delivery="p1")
    assert response.status_code == 202
    assert not Experiment.objects.exists()


def test_unknown_project_is_404(client, db):
    response = client.post("/webhooks/github/nope/", data=b"{}", content_type="application/json")
    assert response.status_code == 404


def test_webhook_rejects_get(client, project):
    assert client.get(f"/webhooks/github/{project.slug}/").status_code == 405
    assert client.get(f"/webhooks/gitlab/{project.slug}/").status_code == 405


def test_gitlab_push_uses_the_head_commit(client, project):
    response = gitlab_push(client, project, sha="1" * 40, message="aichor(train.yaml): via gitlab")
    assert response.status_code == 201
    experiment = Experiment.objects.get()
    assert experiment.commit_sha == "1" * 40
    assert experiment.message == "aichor(train.yaml): via gitlab"
    assert experiment.author_name == "researcher"


def test_gitlab_bad_token_is_refused(client, project):
    assert gitlab_push(client, project, sha="2" * 40, message="exp: x", token="nope").status_code == 403
    assert not Experiment.objects.exists()


def test_gitlab_replay_and_other_events(client, project):
    assert gitlab_push(client, project, sha="3" * 40, message="exp: x", delivery="g1").status_code == 201
    assert gitlab_push(client, project, sha="3" * 40, message="exp: x", delivery="g1").status_code == 200
    assert gitlab_push(client, project, sha="4" * 40, message="exp: y", event="Merge Request Hook").status_code == 202
    assert Experiment.objects.count() == 1


def test_malformed_json_is_a_clear_400(client, project):
    response = post_github(client, project, b"not json", delivery="m1")
    assert response.status_code == 400
    assert not Experiment.objects.exists()
