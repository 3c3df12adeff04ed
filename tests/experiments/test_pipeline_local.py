"""The pipeline on the local engine (processes on this host): fast, and the same state machine."""

import pytest
from django.conf import settings
from django.utils.html import escape

from experiments import logs
from experiments.manifest import parse_manifest
from experiments.models import Event, Experiment, Status, StepName, StepStatus
from experiments.workload import Workload, groups_of
from projects.services import set_variable
from tests.helpers import github_push, manifest_yaml, wait_for

pytestmark = pytest.mark.django_db(transaction=True)

# What a process has besides what aichor injects: its shell's, its image's, the server's locale.
OWN_VARIABLES = {"PATH", "HOME", "HOSTNAME", "PWD", "OLDPWD", "SHLVL", "_", "LANG", "LC_ALL", "TZ", "TERM"}
# spec.env beside project variables, one of which it overrides, and a protected name it cannot.
# (A protected name such as AICHOR_INPUT_PATH here is a validation error: test_manifest.py.)
VARIABLES_SPEC = "  env:\n    FROM_SPEC: from-spec\n    SHARED: spec-wins\n"


def set_project_variables(project) -> None:
    set_variable(project, name="PLAIN", kind="runtime", value="plain-value", sensitive=False)
    set_variable(project, name="SHARED", kind="runtime", value="project-loses", sensitive=False)
    set_variable(project, name="API_TOKEN", kind="runtime", value="tok-4f9a2c-secret", sensitive=True)
    set_variable(project, name="BUILD_ONLY", kind="build", value="not-at-runtime", sensitive=False)


def assert_page_shows_the_environment(client, user, experiment: Experiment, output: str) -> None:
    """The experiment page's injected variables are, name for name and value for value, what
    the workload printed with `env`; sensitive values are masked on the page only."""
    env = dict(line.split("=", 1) for line in output.splitlines() if "=" in line)
    client.force_login(user)
    response = client.get(f"/experiments/{experiment.pk}/")
    page = response.content.decode()
    shown = {v.name: v for v in response.context["variables"]}
    assert set(env) - set(shown) <= OWN_VARIABLES, "the workload got variables the page does not show"
    for name, variable in shown.items():
        assert name in env, f"the page shows {name}, which the workload did not get"
        if variable.sensitive:
            assert env[name] and variable.value == "" and env[name] not in page
        else:
            assert variable.value == env[name], name
            assert escape(variable.value) in page, name


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


def test_include_dot_git_and_depth_reach_the_workload(client, project, git_repo, celery_worker_thread):
    git_repo.commit({"README": "first"}, "initial")
    git_repo.commit({"README": "second"}, "second")
    manifest = manifest_yaml("git log --format=%s | wc -l; git remote get-url origin").replace(
        "spec:\n", "clone:\n  depth: 2\n  includeDotGit: true\nspec:\n", 1
    )
    message = "aichor[train.yaml]: with history"
    sha = git_repo.commit({"aichor_manifests/train.yaml": manifest}, message)
    response = github_push(client, project, sha=sha, message=message)
    experiment = wait_for(
        lambda: Experiment.objects.filter(pk=response.json()["experiment"], status__in=["Succeeded", "Failed"]).first()
    )
    assert experiment.status == Status.SUCCEEDED, experiment.failure_reason
    lines = logs.log_text(experiment.pk, "process:worker-0").split()
    assert lines[0] == "2"  # exactly the requested depth of history
    assert lines[1] == git_repo.url


def test_code_without_dot_git_by_default(client, project, git_repo, celery_worker_thread):
    experiment = push_and_wait(client, project, git_repo, "test -d .git && echo has-git || echo no-git")
    assert logs.log_text(experiment.pk, "process:worker-0").strip() == "no-git"


def test_cancel_while_waiting_never_clones(project, member_user, git_repo):
    # No worker runs: the experiment stays queued in Waiting, as behind a busy queue.
    from experiments.services import cancel_experiment, create_experiment

    experiment = create_experiment(
        project=project, commit_sha="0" * 40, branch="main", manifest_path="aichor_manifests/x.yaml", author=member_user
    )
    cancel_experiment(experiment, actor=member_user)
    experiment.refresh_from_db()
    assert experiment.status == Status.CANCELLED
    assert experiment.failure_reason == f"Cancelled by {member_user.username}"
    steps = {s.name: s.status for s in experiment.steps.all()}
    assert set(steps.values()) == {StepStatus.CANCELLED}
    from experiments.pipeline import run_clone

    run_clone(experiment.pk)  # a late task finds nothing to do
    experiment.refresh_from_db()
    assert experiment.current_step == StepName.WAITING
    assert not logs.streams(experiment.pk)


def test_cancelling_twice_is_refused_clearly(project, member_user):
    from experiments.services import ExperimentError, cancel_experiment, create_experiment

    experiment = create_experiment(project=project, commit_sha="0" * 40, manifest_path="manifest.yaml")
    cancel_experiment(experiment, actor=member_user)
    with pytest.raises(ExperimentError, match="nothing to cancel"):
        cancel_experiment(experiment, actor=member_user)


def test_resubmit_reruns_the_same_code_as_a_new_linked_experiment(
    client, project, git_repo, member_user, celery_worker_thread
):
    from experiments.services import resubmit_experiment

    original = push_and_wait(client, project, git_repo, "echo run $AICHOR_EXPERIMENT_ID")
    again = resubmit_experiment(original, actor=member_user)
    assert again.pk != original.pk
    assert again.resubmitted_from == original
    assert (again.commit_sha, again.manifest_path) == (original.commit_sha, original.manifest_path)
    again = wait_for(lambda: Experiment.objects.filter(pk=again.pk, status__in=["Succeeded", "Failed"]).first())
    assert again.status == Status.SUCCEEDED
    assert f"run {again.pk}" in logs.log_text(again.pk, "process:worker-0")
    assert original.events.filter(kind="action", reason__startswith="resubmitted as").exists()


def test_resubmit_of_an_active_experiment_is_refused(project):
    from experiments.services import ExperimentError, create_experiment, resubmit_experiment

    experiment = create_experiment(project=project, commit_sha="0" * 40, manifest_path="manifest.yaml")
    with pytest.raises(ExperimentError, match="still Created"):
        resubmit_experiment(experiment)


def test_reconcile_moves_on_an_experiment_whose_message_was_lost(project, git_repo, request):
    from datetime import timedelta

    from django.utils import timezone

    from aichor.celery import app
    from experiments.pipeline import reconcile
    from experiments.services import create_experiment

    message = "aichor[train.yaml]: lost message"
    sha = git_repo.commit({"aichor_manifests/train.yaml": manifest_yaml("echo recovered")}, message)
    # The broker lost the clone message: purged before any worker runs (a worker already
    # running could take it first, and the test would watch two clones race).
    with app.connection_for_write() as conn:
        experiment = create_experiment(project=project, commit_sha=sha, manifest_path="aichor_manifests/train.yaml")
        conn.default_channel.queue_purge("celery")
    Experiment.objects.filter(pk=experiment.pk).update(heartbeat_at=timezone.now() - timedelta(minutes=10))
    assert reconcile() == [str(experiment.pk)]
    request.getfixturevalue("celery_worker_thread")
    experiment = wait_for(
        lambda: Experiment.objects.filter(pk=experiment.pk, status__in=["Succeeded", "Failed"]).first()
    )
    assert experiment.status == Status.SUCCEEDED, experiment.failure_reason
    assert logs.log_text(experiment.pk, "process:worker-0") == "recovered\n"


# --- issue 10: the local engine keeps the server's environment to itself -------------------
SERVER_SECRETS = {
    "AICHOR_SECRET_KEY": "canary-secret-key-9f2e",
    "DATABASE_URL": "postgres://aichor:canary-db-password@db.internal:5432/aichor",
    "REDIS_URL": "redis://:canary-redis-password@redis.internal:6379/0",
    "AWS_SECRET_ACCESS_KEY": "canary-aws-secret",
}


def test_local_workload_sees_its_variables_and_none_of_the_servers(
    client, project, git_repo, celery_worker_thread, monkeypatch
):
    for name, value in SERVER_SECRETS.items():
        monkeypatch.setenv(name, value)
    experiment = push_and_wait(client, project, git_repo, "env | sort")
    assert experiment.status == Status.SUCCEEDED, experiment.failure_reason
    output = logs.log_text(experiment.pk, "process:worker-0")
    assert f"AICHOR_EXPERIMENT_ID={experiment.pk}\n" in output
    assert "\nPATH=" in output
    for name, value in SERVER_SECRETS.items():
        assert value not in output, f"the server's {name} reached the workload"
    assert "AICHOR_SECRET_KEY=" not in output and "DATABASE_URL=" not in output


def test_terminal_in_a_local_process_gets_the_process_environment_not_the_servers(project, monkeypatch, tmp_path):
    from experiments.engines.local import LocalEngine

    for name, value in SERVER_SECRETS.items():
        monkeypatch.setenv(name, value)
    engine = LocalEngine({"root": str(tmp_path)})
    spec = parse_manifest(manifest_yaml("sleep 60")).spec
    env = {"AICHOR_EXPERIMENT_ID": "terminal-env"}
    handle = engine.submit(
        Workload("terminal-env", "p", "batch", "", spec.command, groups_of(spec), env, []), log=lambda text: None
    )
    try:
        session = engine.exec(handle, "worker-0", command=["sh", "-c", "env; echo END-OF-ENV"])
        output = b""
        while b"END-OF-ENV\r\n" not in output:
            chunk = session.read(timeout=10)
            assert chunk, f"the shell ended early: {output!r}"
            output += chunk
        session.close()
    finally:
        engine.cancel(handle)
        engine.cleanup(handle)
    text = output.decode()
    assert "AICHOR_EXPERIMENT_ID=terminal-env" in text
    for name, value in SERVER_SECRETS.items():
        assert value not in text, f"the server's {name} reached the terminal"


def test_local_experiment_fails_with_the_reason_when_the_local_engine_is_off(
    client, project, git_repo, celery_worker_thread, settings
):
    settings.LOCAL_ENGINE = False
    experiment = push_and_wait(client, project, git_repo, "echo should never run")
    assert experiment.status == Status.FAILED
    assert "the local engine is disabled: set AICHOR_LOCAL_ENGINE=true" in experiment.failure_reason
    assert experiment.current_step == StepName.BUILDING
    assert not logs.log_text(experiment.pk, "process:worker-0")


def test_unfinished_last_line_is_stored_once(client, project, git_repo, celery_worker_thread):
    experiment = push_and_wait(client, project, git_repo, "echo first; printf 'no newline at the end'")
    assert experiment.status == Status.SUCCEEDED, experiment.failure_reason
    from experiments.pipeline import stop

    stop(experiment.pk)  # a second stop task (a retried message) must not store it again
    assert logs.log_text(experiment.pk, "process:worker-0") == "first\nno newline at the end\n"


def test_page_shows_the_environment_the_local_workload_gets(
    client, project, member_user, git_repo, celery_worker_thread
):
    # On the local engine the buckets are folders of the server's own host, not mounts.
    set_project_variables(project)
    experiment = push_and_wait(client, project, git_repo, "env", extra_spec=VARIABLES_SPEC)
    assert experiment.status == Status.SUCCEEDED, experiment.failure_reason
    output = logs.log_text(experiment.pk, "process:worker-0")
    assert_page_shows_the_environment(client, member_user, experiment, output)
    assert "FROM_SPEC=from-spec\n" in output and "PLAIN=plain-value\n" in output
    assert "SHARED=spec-wins" in output and "API_TOKEN=tok-4f9a2c-secret" in output
    assert "BUILD_ONLY" not in output
    assert f"AICHOR_INPUT_PATH={settings.BUCKETS_ROOT}/{project.inputs_bucket}/" in output
