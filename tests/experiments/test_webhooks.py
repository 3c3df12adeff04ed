"""Webhook endpoints: signature checks, idempotency, the commit-message rules (SPEC §2)."""

import json
import uuid

import pytest

from experiments.models import Experiment, WebhookDelivery
from experiments.webhooks import manifest_path_for
from tests.helpers import github_push, github_signature, post_github

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


# --- Field limits (issue 10 #9): 422 naming the field, nothing stored --------------------------
def github_body(sha: str = "a" * 40, message: str = "exp: x", ref: str = "refs/heads/main", **extra) -> dict:
    return {
        "ref": ref,
        "after": sha,
        "head_commit": {"id": sha, "message": message, "author": {"username": "researcher"}},
        **extra,
    }


def post_json(client, project, payload: dict, **kwargs):
    return post_github(client, project, json.dumps(payload).encode(), **kwargs)


@pytest.mark.parametrize(
    ("payload", "delivery", "field"),
    [
        (github_body(ref="refs/heads/" + "b" * 250), None, "ref"),
        (github_body(sha="a" * 65), None, "head_commit.id"),
        (github_body(message="aichor[" + "p/" * 250 + "x.yaml]: long"), None, "head_commit.message"),
        (github_body(message="exp: " + "x" * 70_000), None, "head_commit.message"),
        (
            {**github_body(), "head_commit": {"id": "a" * 40, "message": "exp: x", "author": {"username": "u" * 256}}},
            None,
            "head_commit.author",
        ),  # fmt: skip
        (github_body(), "d" * 5000, "X-GitHub-Delivery"),
    ],
    ids=["ref", "commit-id", "manifest-path", "message", "author", "delivery-id"],
)
def test_over_long_fields_are_refused_naming_the_field(client, project, payload, delivery, field):
    response = post_json(client, project, payload, delivery=delivery)
    assert response.status_code == 422, response.content
    assert response.json()["field"] == field
    assert field in response.json()["error"]
    assert not Experiment.objects.exists()
    assert not WebhookDelivery.objects.exists()


def test_fields_at_their_limits_are_accepted(client, project):
    ref = "refs/heads/" + "b" * (255 - len("refs/heads/"))
    message = "aichor[" + "p" * (500 - len("aichor_manifests/") - len(".yaml")) + ".yaml]: at the limit"
    payload = github_body(ref=ref, sha="a" * 64, message=message)
    payload["head_commit"]["author"] = {"username": "u" * 255}
    response = post_json(client, project, payload, delivery="d" * 100)
    assert response.status_code == 201, response.content
    experiment = Experiment.objects.get()
    assert (len(experiment.branch), len(experiment.manifest_path), len(experiment.author_name)) == (244, 500, 255)


@pytest.mark.parametrize("sha", ["not-hex-at-all", "abc", "--upload-pack=x", 42])
def test_a_commit_id_that_is_not_a_hex_sha_is_refused(client, project, sha):
    response = post_json(client, project, github_body(sha=sha))
    assert response.status_code == 422
    assert response.json()["field"] == "head_commit.id"
    assert not Experiment.objects.exists()


# --- Replays (issue 10 #15) --------------------------------------------------------------------
def test_the_same_signed_body_under_a_fresh_delivery_id_creates_nothing(client, project):
    body = json.dumps(github_body(message="exp: once")).encode()
    first = post_github(client, project, body, delivery="delivery-1")
    replay = post_github(client, project, body, delivery="delivery-2")
    assert first.status_code == 201
    assert replay.status_code == 200
    assert replay.json()["created"] is False
    assert Experiment.objects.count() == 1


def test_the_same_body_after_24_hours_is_a_new_push(client, project):
    from datetime import timedelta

    from django.utils import timezone

    body = json.dumps(github_body(message="exp: daily")).encode()
    assert post_github(client, project, body).status_code == 201
    WebhookDelivery.objects.update(received_at=timezone.now() - timedelta(hours=25))
    assert post_github(client, project, body).status_code == 201
    assert Experiment.objects.count() == 2


def test_a_different_body_for_the_same_commit_is_not_a_replay(client, project):
    assert post_json(client, project, github_body(message="exp: a")).status_code == 201
    assert post_json(client, project, github_body(message="exp: b")).status_code == 201
    assert Experiment.objects.count() == 2


def test_replay_check_is_one_indexed_lookup(client, project):
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    with CaptureQueriesContext(connection) as queries:
        assert post_json(client, project, github_body(message="exp: counted")).status_code == 201
    lookups = [q["sql"] for q in queries if q["sql"].startswith("SELECT") and "webhookdelivery" in q["sql"]]
    assert len(lookups) == 1
    assert "body_digest" in lookups[0]


def gitlab_raw(client, project, payload: dict, headers: dict | None = None):
    return client.post(
        f"/webhooks/gitlab/{project.slug}/",
        data=json.dumps(payload),
        content_type="application/json",
        headers={"X-Gitlab-Token": "s3cret-webhook", "X-Gitlab-Event": "Push Hook", **(headers or {})},
    )


def gitlab_body(sha: str = "5" * 40, message: str = "exp: gl", **extra) -> dict:
    return {
        "object_kind": "push",
        "ref": "refs/heads/main",
        "after": sha,
        "checkout_sha": sha,
        "user_username": "researcher",
        "commits": [{"id": sha, "message": message}],
        **extra,
    }


def test_gitlab_push_without_event_uuid_is_deduplicated_by_body(client, project):
    first = gitlab_raw(client, project, gitlab_body())
    again = gitlab_raw(client, project, gitlab_body())
    assert first.status_code == 201, first.content
    assert again.status_code == 200
    assert Experiment.objects.count() == 1
    assert WebhookDelivery.objects.get().delivery_id.startswith("sha256:")


def test_gitlab_same_body_under_a_fresh_event_uuid_creates_nothing(client, project):
    assert gitlab_raw(client, project, gitlab_body(), {"X-Gitlab-Event-UUID": "u1"}).status_code == 201
    assert gitlab_raw(client, project, gitlab_body(), {"X-Gitlab-Event-UUID": "u2"}).status_code == 200
    assert Experiment.objects.count() == 1


# --- What starts nothing, and GitHub's form encoding ---------------------------------------------
def test_tag_push_is_acknowledged_and_starts_nothing(client, project):
    response = post_json(client, project, github_body(ref="refs/tags/v1.0", message="exp: release"))
    assert response.status_code == 202
    assert "tag" in response.json()["reason"]
    assert not Experiment.objects.exists()


def test_branch_deletion_is_acknowledged_and_starts_nothing(client, project):
    payload = {"ref": "refs/heads/old", "after": "0" * 40, "deleted": True, "head_commit": None}
    response = post_json(client, project, payload)
    assert response.status_code == 202
    assert "deletion" in response.json()["reason"]
    gitlab = gitlab_raw(client, project, gitlab_body(sha="0" * 40, checkout_sha=None, commits=[]))
    assert gitlab.status_code == 202
    assert not Experiment.objects.exists()


def test_gitlab_tag_push_is_acknowledged_and_starts_nothing(client, project):
    response = gitlab_raw(client, project, gitlab_body(ref="refs/tags/v2"))
    assert response.status_code == 202
    assert not Experiment.objects.exists()


def test_github_form_encoded_push_is_accepted(client, project):
    from urllib.parse import urlencode

    body = urlencode({"payload": json.dumps(github_body(sha="6" * 40, message="aichor[train.yaml]: form"))}).encode()
    response = client.post(
        f"/webhooks/github/{project.slug}/",
        data=body,
        content_type="application/x-www-form-urlencoded",
        headers={
            "X-GitHub-Event": "push",
            "X-GitHub-Delivery": str(uuid.uuid4()),
            "X-Hub-Signature-256": github_signature(body),
        },
    )
    assert response.status_code == 201, response.content
    experiment = Experiment.objects.get()
    assert (experiment.commit_sha, experiment.manifest_path) == ("6" * 40, "aichor_manifests/train.yaml")


def test_github_form_without_a_payload_is_a_clear_400(client, project):
    body = b"something=else"
    response = client.post(
        f"/webhooks/github/{project.slug}/",
        data=body,
        content_type="application/x-www-form-urlencoded",
        headers={"X-GitHub-Event": "push", "X-GitHub-Delivery": "f1", "X-Hub-Signature-256": github_signature(body)},
    )
    assert response.status_code == 400
    assert "payload=" in response.json()["error"]


# --- Broker down (issue 10 #10) ------------------------------------------------------------------
@pytest.mark.django_db(transaction=True)
def test_push_with_the_broker_down_is_accepted_and_reconcile_starts_it(
    client, project, git_repo, celery_worker_thread, broker_down, caplog
):
    import logging

    from experiments import pipeline
    from experiments.models import Status
    from tests.helpers import manifest_yaml, wait_for

    message = "aichor[train.yaml]: broker down"
    sha = git_repo.commit({"aichor_manifests/train.yaml": manifest_yaml("echo later")}, message)
    with caplog.at_level(logging.ERROR, logger="experiments.services"):
        response = github_push(client, project, sha=sha, message=message)
        gitlab = gitlab_push(client, project, sha=sha, message=message)
    assert (response.status_code, gitlab.status_code) == (202, 202), response.content
    assert response.json()["created"] is True
    assert "reconcile" in response.json()["reason"]
    ids = {response.json()["experiment"], gitlab.json()["experiment"]}
    assert set(Experiment.objects.filter(status=Status.CREATED).values_list("id", flat=True)) == {
        uuid.UUID(i) for i in ids
    }
    assert len([r for r in caplog.records if "task queue is unreachable" in r.getMessage()]) == 1

    broker_down.restore()
    assert ids <= set(pipeline.reconcile(stale_seconds=0))
    # To the end: a pipeline still under way when the test ends would outlive its worker.
    wait_for(
        lambda: Experiment.objects.filter(pk__in=ids, status=Status.SUCCEEDED).count() == len(ids),
        message="reconcile to start the experiments and run them to the end",
    )
