"""The pipeline's tasks: clone, build and submit follow each other in one task (a hop through
the broker each was most of the pipeline's own overhead); watching stays a task of its own."""

import pytest

from experiments import pipeline, services, tasks
from experiments.models import Status, StepName
from tests.conftest import manifest_yaml

pytestmark = pytest.mark.django_db(transaction=True)

MANIFEST = "aichor_manifests/train.yaml"


@pytest.fixture
def sent(monkeypatch) -> list[str]:
    """The names of the tasks sent through the broker."""
    names: list[str] = []
    for name in ("clone", "build", "submit", "watch", "stop"):
        task = getattr(tasks, name)
        monkeypatch.setattr(task, "apply_async", lambda *a, _name=name, **k: names.append(_name))
    return names


def test_one_clone_task_carries_the_experiment_to_running(project, git_repo, sent):
    sha = git_repo.commit({MANIFEST: manifest_yaml("sleep 30")}, "aichor[train.yaml]: chained")
    experiment = services.create_experiment(project=project, commit_sha=sha, branch="main", manifest_path=MANIFEST)
    assert sent == ["clone"]  # the push itself
    try:
        tasks.clone(str(experiment.pk))
        experiment.refresh_from_db()
        assert (experiment.status, experiment.current_step) == (Status.PROCESSING, StepName.RUNNING)
        assert sent == ["clone", "watch"]  # build and submit ran in the clone task
    finally:
        services.cancel_experiment(experiment)
        pipeline.stop(experiment.pk)


def test_a_failed_step_ends_the_chain(project, git_repo, sent):
    sha = git_repo.commit({MANIFEST: "kind: AIchorManifest\nspec: 3\n"}, "aichor[train.yaml]: broken")
    experiment = services.create_experiment(project=project, commit_sha=sha, branch="main", manifest_path=MANIFEST)
    tasks.clone(str(experiment.pk))
    experiment.refresh_from_db()
    assert (experiment.status, experiment.current_step) == (Status.FAILED, StepName.CLONING)
    assert "build" not in sent and "submit" not in sent


def test_a_step_resumed_by_reconcile_still_arrives_as_its_own_task(project, git_repo, sent):
    sha = git_repo.commit({MANIFEST: manifest_yaml("true")}, "aichor[train.yaml]: lost")
    experiment = services.create_experiment(project=project, commit_sha=sha, branch="main", manifest_path=MANIFEST)
    assert services.begin_step(experiment.pk, StepName.CLONING)
    # Outside any task (reconcile, a test calling the step): the next step goes to the broker.
    pipeline._next("build", experiment.pk)
    assert sent == ["clone", "build"]
