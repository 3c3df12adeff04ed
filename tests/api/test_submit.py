"""Submitting a pushed commit through the API: what may reach git (SPEC §2), and what the
caller is told when the task queue is down."""

import logging

import pytest

from experiments import pipeline
from experiments.models import Experiment, Status
from tests.helpers import manifest_yaml, wait_for

pytestmark = pytest.mark.django_db

API = "/api/v1"


def submit(client, tokens, **payload):
    return client.post(
        f"{API}/projects/vision/experiments", payload, content_type="application/json", headers=tokens["member"]
    )


@pytest.mark.django_db(transaction=True)
def test_submit_commit_refuses_an_option_as_branch_and_runs_nothing(
    client, project, tokens, tmp_path, celery_worker_thread
):
    # The unknown sha made the pipeline fall back to `git fetch URL <branch>`, and the worker ran
    # the upload-pack command. Refused up front now, with the field named.
    marker = tmp_path / "pwned"
    response = submit(client, tokens, sha="deadbeefdeadbeef", branch=f"--upload-pack=id>{marker};false")
    assert response.status_code == 422
    assert "cannot start with '-'" in response.content.decode()
    assert not Experiment.objects.exists()
    assert not marker.exists()


@pytest.mark.parametrize("branch", ["-b", "a..b", "HEAD", "x.lock", "a@{1}", "a/.hidden", "end."])
def test_submit_commit_refuses_a_branch_git_check_ref_format_refuses(client, project, tokens, branch):
    response = submit(client, tokens, sha="a" * 40, branch=branch)
    assert response.status_code == 422
    assert "branch" in response.content.decode()
    assert not Experiment.objects.exists()


@pytest.mark.parametrize("sha", ["--upload-pack=id", "deadbee-", "abc", "g" * 40, "a" * 65])
def test_submit_commit_refuses_a_sha_that_is_not_hex(client, project, tokens, sha):
    response = submit(client, tokens, sha=sha, branch="main")
    assert response.status_code == 422
    assert "sha" in response.content.decode()
    assert not Experiment.objects.exists()


def test_submit_commit_accepts_an_ordinary_branch_with_slashes(client, project, tokens):
    response = submit(client, tokens, sha="a" * 40, branch="feature/lr-3e-4")
    assert response.status_code == 201, response.content
    assert Experiment.objects.get().branch == "feature/lr-3e-4"


@pytest.mark.django_db(transaction=True)
def test_submit_with_the_broker_down_is_accepted_and_reconcile_starts_it_later(
    client, project, tokens, git_repo, celery_worker_thread, broker_down, caplog
):
    message = "aichor[train.yaml]: while the broker is down"
    sha = git_repo.commit({"aichor_manifests/train.yaml": manifest_yaml("echo late")}, message)
    with caplog.at_level(logging.ERROR, logger="experiments.services"):
        first = submit(client, tokens, sha=sha, branch="main", manifest_path="aichor_manifests/train.yaml")
        second = submit(client, tokens, sha=sha, branch="main", manifest_path="aichor_manifests/train.yaml")
    # Committed, not started: 202 with the experiment, instead of a 500.
    assert (first.status_code, second.status_code) == (202, 202), first.content
    assert first.json()["status"] == Status.CREATED
    ids = {first.json()["id"], second.json()["id"]}
    assert {str(pk) for pk in Experiment.objects.values_list("id", flat=True)} == ids
    outage = [r for r in caplog.records if "task queue is unreachable" in r.getMessage()]
    assert len(outage) == 1  # once, not once per request

    broker_down.restore()
    assert ids <= set(pipeline.reconcile(stale_seconds=0))
    # To the end: a pipeline still under way when the test ends would outlive its worker.
    wait_for(
        lambda: Experiment.objects.filter(pk__in=ids, status=Status.SUCCEEDED).count() == len(ids),
        message="reconcile to start both experiments and run them to the end",
    )
