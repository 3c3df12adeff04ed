"""The pipeline's tasks: clone, build and submit follow each other in one task (a hop through
the broker each was most of the pipeline's own overhead); watching stays a task of its own.
Everything reaches the broker through experiments.queue, which imports no task."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from celery.signals import task_prerun

from aichor.celery import app
from experiments import pipeline, queue, services, tasks
from experiments.models import Status, StepName
from tests.helpers import ended, manifest_yaml

pytestmark = pytest.mark.django_db(transaction=True)

MANIFEST = "aichor_manifests/train.yaml"
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def sent(monkeypatch) -> list[str]:
    """The names of the tasks sent through the broker (the broker itself is left out)."""
    names: list[str] = []
    monkeypatch.setattr(app, "send_task", lambda name, *a, **k: names.append(name.removeprefix("experiments.")))
    return names


def test_one_clone_task_carries_the_experiment_to_running(project, git_repo, sent):
    sha = git_repo.commit({MANIFEST: manifest_yaml("sleep 30")}, "aichor[train.yaml]: chained")
    experiment = services.create_experiment(project=project, commit_sha=sha, branch="main", manifest_path=MANIFEST)
    assert sent == ["clone"]  # the push itself
    try:
        tasks.clone(experiment.pk)
        experiment.refresh_from_db()
        assert (experiment.status, experiment.current_step) == (Status.PROCESSING, StepName.RUNNING)
        assert sent == ["clone", "watch_engine"]  # build and submit ran in the clone task
    finally:
        services.cancel_experiment(experiment)
        pipeline.stop(experiment.pk)


def test_a_failed_step_ends_the_chain(project, git_repo, sent):
    sha = git_repo.commit({MANIFEST: "kind: AIchorManifest\nspec: 3\n"}, "aichor[train.yaml]: broken")
    experiment = services.create_experiment(project=project, commit_sha=sha, branch="main", manifest_path=MANIFEST)
    tasks.clone(experiment.pk)
    experiment.refresh_from_db()
    assert (experiment.status, experiment.current_step) == (Status.FAILED, StepName.CLONING)
    assert "build" not in sent and "submit" not in sent


def test_a_step_resumed_by_reconcile_still_arrives_as_its_own_task(project, git_repo, sent):
    sha = git_repo.commit({MANIFEST: manifest_yaml("true")}, "aichor[train.yaml]: lost")
    experiment = services.create_experiment(project=project, commit_sha=sha, branch="main", manifest_path=MANIFEST)
    assert services.begin_step(experiment.pk, StepName.CLONING)
    # Outside any task (reconcile, a test calling the step): the next step goes to the broker.
    queue.next_step("build", experiment.pk)
    assert sent == ["clone", "build"]


def test_a_worker_runs_clone_build_and_submit_in_one_task(project, git_repo, celery_worker_thread):
    """Through the real broker: the tasks a worker runs for one experiment, and the id each got."""
    received: list[tuple[str, list]] = []

    def note(sender=None, args=None, **kwargs) -> None:
        received.append((sender.name, list(args or [])))

    task_prerun.connect(note, weak=False)
    try:
        sha = git_repo.commit({MANIFEST: manifest_yaml("echo done")}, "aichor[train.yaml]: one task")
        experiment = services.create_experiment(project=project, commit_sha=sha, branch="main", manifest_path=MANIFEST)
        assert ended(experiment.pk).status == Status.SUCCEEDED
    finally:
        task_prerun.disconnect(note)
    ours = [name for name, args in received if args == [experiment.pk]]
    assert ours[0] == "experiments.clone"
    assert "experiments.build" not in ours and "experiments.submit" not in ours
    assert set(ours) <= {"experiments.clone", "experiments.stop"}


def test_eager_mode_runs_the_pipeline_inline(project, git_repo, monkeypatch):
    """AICHOR_CELERY_EAGER (debugging): no worker, the experiment runs within the request."""
    monkeypatch.setitem(app.conf, "task_always_eager", True)
    sha = git_repo.commit({MANIFEST: manifest_yaml("echo inline")}, "aichor[train.yaml]: eager")
    experiment = services.create_experiment(project=project, commit_sha=sha, branch="main", manifest_path=MANIFEST)
    experiment.refresh_from_db()
    assert experiment.status == Status.SUCCEEDED, experiment.failure_reason


@pytest.mark.parametrize("module", ["experiments.services", "experiments.pipeline", "experiments.webhooks"])
def test_the_web_side_does_not_import_the_tasks(module):
    """No import circle: services and the pipeline send tasks by name, so loading them (as every
    web process does) loads no task module."""
    code = f"import sys, django; django.setup(); import {module}; print('experiments.tasks' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**os.environ, "DJANGO_SETTINGS_MODULE": "aichor.settings"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
