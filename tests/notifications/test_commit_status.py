"""Commit statuses on GitHub and GitLab (fake APIs on loopback): posted from the notify queue,
in order, retried with backoff, never in the experiment's way; refusals shown to the project."""

import hashlib
import hmac
import json
import logging
import time
import uuid

import pytest
from django.conf import settings

from experiments import services as experiment_services
from experiments.models import Experiment, Status
from notifications import services
from notifications.models import CommitStatus, GitHost
from tests.helpers import ended, github_push, manifest_yaml, wait_for
from tests.notifications.conftest import GITLAB_TOKEN, TOKEN
from tests.notifications.fakes import Answer

CONTEXT = "aichor/aichor_manifests/train.yaml"
MESSAGE = "aichor[train.yaml]: try lr 3e-4"


def commit(git_repo, command: str) -> str:
    files = {"aichor_manifests/train.yaml": manifest_yaml(command), "nonce.txt": uuid.uuid4().hex}
    return git_repo.commit(files, MESSAGE)


def push(client, project, git_repo, command: str) -> tuple[str, Experiment]:
    sha = commit(git_repo, command)
    response = github_push(client, project, sha=sha, message=MESSAGE)
    assert response.status_code == 201, response.content
    return sha, ended(response.json()["experiment"])


def gitlab_push(client, project, sha: str, message: str):
    body = json.dumps(
        {
            "object_kind": "push",
            "ref": "refs/heads/main",
            "after": sha,
            "checkout_sha": sha,
            "user_username": "researcher",
            "commits": [{"id": sha, "message": message, "author": {"email": "researcher@example.com"}}],
            "project": {"git_http_url": project.repo_clone_url},
        }
    ).encode()
    headers = {
        "X-Gitlab-Event": "Push Hook",
        "X-Gitlab-Token": "s3cret-webhook",
        "X-Gitlab-Event-UUID": str(uuid.uuid4()),
    }
    return client.post(f"/webhooks/gitlab/{project.slug}/", data=body, content_type="application/json", headers=headers)


def page_of(experiment) -> str:
    return f"{settings.PUBLIC_URL}/experiments/{experiment.pk}/"


@pytest.mark.django_db(transaction=True)
def test_push_ends_with_pending_then_success_on_the_sha_and_context(
    client, project, git_repo, github, github_statuses, fast_retries, celery_worker_thread
):
    sha, experiment = push(client, project, git_repo, "echo trained")
    assert experiment.status == Status.SUCCEEDED, experiment.failure_reason
    states = wait_for(
        lambda: (s := github.states(sha, CONTEXT)) and s[-1] == "success" and s, message="the success status"
    )
    assert states[0] == "pending"
    # Never an earlier state after a later one.
    assert states == sorted(states, key=["pending", "success"].index)
    final = github.statuses[-1]
    assert final["target_url"] == page_of(experiment)
    assert final["description"].startswith("Succeeded in ") and len(final["description"]) <= 140
    assert all(seen.headers["Authorization"] == f"Bearer {TOKEN}" for seen in github.requests())
    # Recorded once the host's answer is back, just after the fake saw the post.
    wait_for(lambda: CommitStatus.objects.get(pk=experiment.pk).posted_state == "success", message="the posted state")


@pytest.mark.django_db(transaction=True)
def test_a_failing_run_posts_failure(
    client, project, git_repo, github, github_statuses, fast_retries, celery_worker_thread
):
    sha, experiment = push(client, project, git_repo, "echo broken; exit 3")
    assert experiment.status == Status.FAILED
    wait_for(lambda: github.states(sha, CONTEXT)[-1:] == ["failure"], message="the failure status")
    description = github.statuses[-1]["description"]
    assert description.startswith("Failed in ") and experiment.failure_reason.splitlines()[0][:40] in description


@pytest.mark.django_db(transaction=True)
def test_gitlab_push_reports_pending_running_and_failed(
    client, project, git_repo, gitlab, fast_retries, celery_worker_thread
):
    project.repo_web_url = "https://gitlab.example.com/acme/ml/vision"
    project.save(update_fields=["repo_web_url"])
    services.save_git_host(project, kind="", api_url=gitlab.api_url, repository="", token=GITLAB_TOKEN)
    sha = commit(git_repo, "exit 1")
    response = gitlab_push(client, project, sha, MESSAGE)
    assert response.status_code == 201, response.content
    experiment = ended(response.json()["experiment"])
    assert experiment.status == Status.FAILED
    states = wait_for(lambda: (s := gitlab.states(sha, CONTEXT)) and s[-1] == "failed" and s, message="failed")
    assert states[0] == "pending" and set(states) <= {"pending", "running", "failed"}
    assert gitlab.statuses[-1]["ref"] == "main" and gitlab.statuses[-1]["target_url"] == page_of(experiment)
    assert all(seen.headers["PRIVATE-TOKEN"] == GITLAB_TOKEN for seen in gitlab.requests())


@pytest.mark.django_db(transaction=True)
def test_a_git_host_answering_500_delays_the_status_never_the_experiment(
    client, project, git_repo, github, github_statuses, fast_retries, celery_worker_thread
):
    github.down = Answer(500, {"message": "Server Error"}, {"Retry-After": "1"})
    started = time.monotonic()
    sha, experiment = push(client, project, git_repo, "echo on time")
    took = time.monotonic() - started
    assert experiment.status == Status.SUCCEEDED, experiment.failure_reason
    # The experiment finished while every post was refused...
    assert github.requests() and all(seen.code == 500 for seen in github.requests())
    assert took < 60
    github.down = None
    # ...and its final status arrives through a retry once the host answers 201 again. The
    # notify queue's fan-out of Succeeded may come after the host is back, so a retry can first
    # post the running state it still has: the last state is what the commit shows.
    wait_for(lambda: github.states(sha, CONTEXT)[-1:] == ["success"], timeout=30, message="the status after retries")
    assert [seen.code for seen in github.requests()][-1] == 201


def _experiment(project, sha: str = "a" * 40) -> Experiment:
    experiment = experiment_services.create_experiment(
        project=project, commit_sha=sha, branch="main", message=MESSAGE, manifest_path="aichor_manifests/train.yaml"
    )
    services.experiment_changed(experiment.pk, "created")  # what the notify queue's fan-out does
    return experiment


@pytest.mark.django_db
def test_a_late_earlier_state_never_overwrites_a_later_one(project, github, github_statuses, fast_retries):
    experiment = _experiment(project)
    github.answer_next(Answer(502, {"message": "Bad Gateway"}))
    with pytest.raises(services.Later):
        services.post_commit_status(experiment.pk, 0)  # pending refused: a retry is due
    experiment_services.fail_experiment(experiment.pk, "exit code 1")
    services.experiment_changed(experiment.pk, "failed")
    services.post_commit_status(experiment.pk, 0)
    assert github.states(experiment.commit_sha, CONTEXT) == ["failure"]
    # The pending post's retry arrives late: it finds the later state posted and sends nothing.
    services.post_commit_status(experiment.pk, 1)
    assert github.states(experiment.commit_sha, CONTEXT) == ["failure"] and len(github.requests()) == 2
    # A fan-out of an earlier event that ran late (parallel workers) changes nothing either.
    services.experiment_changed(experiment.pk, "running")
    assert CommitStatus.objects.values_list("seq", "event").get(pk=experiment.pk) == (2, "failed")


@pytest.mark.django_db
def test_description_has_the_step_and_duration_within_140_characters(project, github, github_statuses):
    experiment = _experiment(project)
    experiment_services.fail_experiment(experiment.pk, "Cloning failed: " + "x" * 300)
    services.experiment_changed(experiment.pk, "failed")
    services.post_commit_status(experiment.pk, 0)
    (status,) = github.statuses
    assert status["state"] == "failure" and len(status["description"]) == 140
    assert status["description"].startswith("Failed in Waiting after 0s: Cloning failed: xxx")


@pytest.mark.django_db
def test_a_post_waits_while_another_holds_the_experiment(project, github, github_statuses):
    experiment = _experiment(project)
    CommitStatus.objects.filter(pk=experiment.pk).update(lease_owner="other", lease_until="2999-01-01T00:00:00Z")
    with pytest.raises(services.Later) as later:
        services.post_commit_status(experiment.pk, 0)
    assert not later.value.counts and github.requests() == []


@pytest.mark.django_db
@pytest.mark.parametrize(
    "answer, wait",
    [
        (Answer(429, {"message": "slow down"}, {"Retry-After": "7"}), 7),
        (Answer(403, {"message": "secondary rate limit"}, {"Retry-After": "12"}), 12),
        (
            Answer(
                403, {"message": "API rate limit exceeded"}, {"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": "+30"}
            ),
            30,
        ),
    ],
)
def test_rate_limits_are_retried_when_the_host_says(project, github, github_statuses, answer, wait):
    if answer.headers.get("X-RateLimit-Reset") == "+30":
        answer.headers["X-RateLimit-Reset"] = str(int(time.time()) + 30)
    experiment = _experiment(project)
    github.answer_next(answer)
    with pytest.raises(services.Later) as later:
        services.post_commit_status(experiment.pk, 0)
    assert later.value.counts and wait - 2 <= later.value.seconds <= wait
    assert CommitStatus.objects.get(pk=experiment.pk).error == ""


@pytest.mark.django_db
def test_retries_give_up_with_the_reason(project, github, github_statuses, settings):
    settings.NOTIFY_MAX_ATTEMPTS = 3
    experiment = _experiment(project)
    github.down = Answer(503, {"message": "unavailable"})
    services.post_commit_status(experiment.pk, 2)  # the third and last attempt: no Later
    assert CommitStatus.objects.get(pk=experiment.pk).error == "gave up after 3 attempts: the Git host answered 503"


@pytest.mark.django_db
def test_a_token_without_permission_shows_the_error_on_the_project_page(
    client, project, admin_user, member_user, outsider_user, github, github_statuses, caplog
):
    github.can_write_statuses = False
    experiment = _experiment(project)
    with caplog.at_level(logging.DEBUG):
        services.post_commit_status(experiment.pk, 0)  # 403 without rate limit: no retry
    assert [seen.code for seen in github.requests()] == [403]
    assert TOKEN not in caplog.text
    for user in (admin_user, member_user):
        client.force_login(user)
        page = client.get("/p/vision/details/").content.decode()
        assert "token lacks the statuses permission" in page and experiment.short_id in page
        assert TOKEN not in page
    client.force_login(admin_user)
    assert "token lacks the statuses permission" in client.get("/p/vision/notifications/").content.decode()
    # Fixed: the next post succeeds and the error goes.
    github.can_write_statuses = True
    services.experiment_changed(experiment.pk, "running")
    services.post_commit_status(experiment.pk, 0)
    assert "token lacks" not in client.get("/p/vision/details/").content.decode()


def test_no_status_without_a_token(db, project, github):
    experiment = _experiment(project)
    assert not CommitStatus.objects.filter(pk=experiment.pk).exists()
    GitHost.objects.create(project=project, api_url=github.url)
    services.experiment_changed(experiment.pk, "created")
    assert not CommitStatus.objects.filter(pk=experiment.pk).exists() and github.requests() == []


def test_signature_helper_is_github_style():
    body = b'{"a":1}'
    assert services.signature("k", body) == "sha256=" + hmac.new(b"k", body, hashlib.sha256).hexdigest()


def test_posting_runs_on_the_notify_queue_which_a_worker_consumes():
    from pathlib import Path

    from aichor.celery import app

    for name in (
        "notifications.fan_out",
        "notifications.post_status",
        "notifications.deliver",
        "notifications.send_email",
    ):
        assert app.amqp.router.route({}, name)["queue"].name == settings.NOTIFY_QUEUE
    assert app.amqp.router.route({}, "experiments.clone")["queue"].name == settings.PIPELINE_QUEUE
    run_sh = (Path(settings.BASE_DIR) / "scripts" / "run.sh").read_text()
    assert f"-Q {settings.WATCH_QUEUE},{settings.NOTIFY_QUEUE}" in run_sh
