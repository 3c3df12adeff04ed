"""The pipeline on the local engine (processes on this host): fast, and the same state machine."""

import pytest

from experiments import logs
from experiments.models import Event, Experiment, Status, StepName, StepStatus
from tests.conftest import github_push, manifest_yaml, wait_for

pytestmark = pytest.mark.django_db(transaction=True)


def push_and_wait(client, project, git_repo, command: str, message: str = "aichor[train.yaml]: try", **manifest_kwargs):
    sha = git_repo.commit(
        {"aichor_manifests/train.yaml": manifest_yaml(command, **manifest_kwargs), "Dockerfile": "FROM scratch\n"},
        message,
    )
    response = github_push(client, project, sha=sha, message=message)
    assert response.status_code == 201, response.content
    experiment_id = response.json()["experiment"]
    return wait_for(
        lambda: Experiment.objects.filter(
            pk=experiment_id, status__in=[Status.SUCCEEDED, Status.FAILED, Status.CANCELLED]
        ).first(),
        message="the experiment to end",
    )


def test_push_runs_on_local_engine_and_keeps_output(client, project, git_repo, celery_worker_thread):
    experiment = push_and_wait(
        client,
        project,
        git_repo,
        "echo hello from $AICHOR_EXPERIMENT_ID; ls train.yaml 2>/dev/null; ls aichor_manifests",
    )
    assert experiment.status == Status.SUCCEEDED, experiment.failure_reason
    assert experiment.exit_code == 0
    output = logs.log_text(experiment.pk, "process:worker-0")
    assert f"hello from {experiment.pk}" in output
    assert "train.yaml" in output  # the workload runs inside the checked-out code
    steps = {s.name: s.status for s in experiment.steps.all()}
    assert steps == {name: StepStatus.SUCCEEDED for name in StepName.values}
    statuses = list(Event.objects.filter(experiment=experiment, kind="status").values_list("new", flat=True))
    assert statuses == ["Created", "Processing", "Succeeded"]


def test_non_zero_exit_fails_with_exit_code(client, project, git_repo, celery_worker_thread):
    experiment = push_and_wait(client, project, git_repo, "echo about to fail; exit 3")
    assert experiment.status == Status.FAILED
    assert experiment.exit_code == 3
    assert "exited with code 3" in experiment.failure_reason
    assert "about to fail" in logs.log_text(experiment.pk, "process:worker-0")
    assert experiment.steps.get(name=StepName.RUNNING).status == StepStatus.FAILED


def test_invalid_manifest_fails_at_cloning_listing_every_error(client, project, git_repo, celery_worker_thread):
    bad_types = (
        "    worker:\n      count: -1\n      resources:\n        cpus: 1\n        ramRatio: 1\n        memory: 4\n"
    )
    experiment = push_and_wait(client, project, git_repo, "true", types=bad_types)
    assert experiment.status == Status.FAILED
    assert experiment.current_step == StepName.CLONING
    log = logs.log_text(experiment.pk, "step:Cloning")
    assert "spec.types.worker.resources: set exactly one of ramRatio or memory" in log
    assert "spec.types.worker.count" in log


def test_timeout_stops_the_workload(client, project, git_repo, celery_worker_thread):
    experiment = push_and_wait(client, project, git_repo, "sleep 60", extra_spec='  timeout: "1s"\n')
    assert experiment.status == Status.FAILED
    assert "Timed out" in experiment.failure_reason
