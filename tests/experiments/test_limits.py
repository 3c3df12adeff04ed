"""Per-engine limits (SPEC §4, issue 10 finding 4): processes at once per experiment, checked
when the manifest is validated, and running experiments per project, over which experiments
wait in Waiting with the reason shown and start in order."""

import logging
import re
import threading
from datetime import timedelta

import psycopg
import pytest
from django.db import connection
from django.utils import timezone
from django.utils.html import escape

from experiments import logs, pipeline, services
from experiments.limits import DEFAULTS, check_processes, check_started, engine_limit, processes_at_once
from experiments.manifest import parse_manifest
from experiments.models import Event, Experiment, Status, StepName, StepStatus
from tests.helpers import github_push, manifest_yaml, wait_for

pytestmark = pytest.mark.django_db(transaction=True)

API = "/api/v1"
RES = "      resources:\n        cpus: 1\n        ramRatio: 1\n"
MANIFEST = "aichor_manifests/train.yaml"
SLOT_REASON = (
    "waiting for a slot: 1 experiment of this project already runs on engine local "
    "(max_running_experiments_per_project = 1)"
)


@pytest.fixture(autouse=True)
def _local_engine_and_repos(settings):
    # The local engine and file:// repositories are the embedded default; tests turn them on in
    # case the deployment default is off.
    settings.LOCAL_ENGINE = True
    settings.ALLOW_LOCAL_REPOS = True


def types_of(**groups: str) -> str:
    return "".join(f"    {name}:\n{body}{RES}" for name, body in groups.items())


def jobset(count: int, completions: int = 1, parallelisms: int = 1, name: str = "workers") -> str:
    body = f"      count: {count}\n      completions: {completions}\n      parallelisms: {parallelisms}\n"
    return types_of(**{name: body})


KUBERAY_POOLS = (
    f"    Head:\n{RES}"
    "    Workers:\n"
    "      - name: small\n        count: 100\n        resources: {cpus: 1, ramRatio: 1}\n"
    "      - name: big\n        count: 30\n        resources: {cpus: 1, ramRatio: 1}\n"
)


def queued(project, git_repo, command: str = "true", **manifest_kwargs) -> Experiment:
    """An experiment of a fresh commit, created as a push creates it; no worker takes its task."""
    sha = git_repo.commit({MANIFEST: manifest_yaml(command, **manifest_kwargs), "Dockerfile": "FROM scratch\n"}, "c")
    return services.create_experiment(project=project, commit_sha=sha, branch="main", manifest_path=MANIFEST)


def set_engine_config(engine, **config) -> None:
    engine.config = {**(engine.config or {}), **config}
    engine.save(update_fields=["config"])


# --- processes at once per experiment ------------------------------------------------------
@pytest.mark.parametrize(
    "operator,types,expected",
    [
        ("batch", None, 1),
        ("pytorch", types_of(worker="      count: 6\n"), 6),
        ("xgboost", types_of(Master="      count: 1\n", Worker="      count: 3\n"), 4),
        ("jax", types_of(worker="      count: 5\n"), 5),
        # AIchor's largest public demo: 10 jobs × 10 completions, 2 at a time.
        ("jobset", jobset(10, completions=10, parallelisms=2), 20),
        ("jobset", jobset(3, completions=2, parallelisms=8) + jobset(1, name="driver"), 7),
        ("kuberay", KUBERAY_POOLS, 132),
    ],
)
def test_processes_at_once_follow_each_operator(operator, types, expected):
    manifest = parse_manifest(manifest_yaml("python train.py", operator=operator, types=types))
    assert sum(count for _path, count in processes_at_once(manifest)) == expected


def test_a_single_host_counts_only_the_completions_running_at_once(local_engine):
    # 20 jobs × 10 completions, 2 at a time: 40 run at once, on a single host as on a cluster;
    # the other 160 are planned, not started, until earlier ones end.
    manifest = parse_manifest(
        manifest_yaml("true", operator="jobset", types=jobset(20, completions=10, parallelisms=2))
    )
    assert check_processes(manifest, local_engine) is None
    assert check_started(manifest, local_engine) is None
    # Planning is bounded on its own: every completion is named and planned when it submits.
    huge = parse_manifest(manifest_yaml("true", operator="jobset", types=jobset(1, completions=10001)))
    assert check_processes(huge, local_engine) is None
    assert check_started(huge, local_engine) == (
        "spec.types: engine local plans every completion when it submits, 10001 completions, over the 10000 "
        "a single host plans (only parallelisms of them run at once)"
    )
    pytorch = parse_manifest(manifest_yaml("true", operator="pytorch", types=types_of(worker="      count: 200\n")))
    assert check_started(pytorch, local_engine) is None  # counted whole at Cloning already
    assert check_processes(pytorch, local_engine).startswith("spec.types.worker.count: 200 processes at once")


def test_worker_count_1000_fails_at_cloning_naming_the_limit(
    client, project, git_repo, member_user, celery_worker_thread, monkeypatch
):
    planned = []
    monkeypatch.setattr("experiments.engines.single_host.plan_processes", lambda *a, **k: planned.append(a) or [])
    message = "aichor[train.yaml]: a thousand workers"
    types = types_of(worker="      count: 1000\n")
    sha = git_repo.commit({MANIFEST: manifest_yaml("true", operator="pytorch", types=types)}, message)
    response = github_push(client, project, sha=sha, message=message)
    assert response.status_code == 201, response.content
    experiment = wait_for(
        lambda: Experiment.objects.filter(pk=response.json()["experiment"], status=Status.FAILED).first(),
        message="the experiment to fail",
    )
    error = (
        "spec.types.worker.count: 1000 processes at once exceed engine local's limit of 128 "
        "(max_processes_per_experiment)"
    )
    assert experiment.current_step == StepName.CLONING
    assert experiment.failure_reason == f"Invalid manifest: {error}"
    assert error in logs.log_text(experiment.pk, "step:Cloning")
    assert experiment.steps.get(name=StepName.SUBMITTING).status == StepStatus.INITIALIZE
    assert planned == []
    client.force_login(member_user)
    assert escape(error) in client.get(f"/experiments/{experiment.pk}/").content.decode()


def test_jobset_of_a_million_processes_fails_without_planning_them(project, git_repo, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("plan_processes reached for a manifest over the limit")

    monkeypatch.setattr("experiments.engines.single_host.plan_processes", never)
    experiment = queued(project, git_repo, operator="jobset", types=jobset(1000, 1000, 1000))
    pipeline.run_clone(experiment.pk)
    experiment.refresh_from_db()
    assert experiment.status == Status.FAILED
    assert experiment.current_step == StepName.CLONING
    assert experiment.failure_reason == (
        "Invalid manifest: spec.types.workers: 1000000 processes at once (count 1000 × 1000 completions in "
        "parallel) exceed engine local's limit of 128 (max_processes_per_experiment)"
    )
    # Not kept as the validated manifest: nothing later can plan from it.
    assert experiment.manifest is None


def test_aichor_demo_jobset_passes_the_default_and_fails_under_19(project, local_engine, git_repo):
    demo = jobset(10, completions=10, parallelisms=2)
    passes = queued(project, git_repo, operator="jobset", types=demo)
    pipeline.run_clone(passes.pk)
    passes.refresh_from_db()
    assert passes.status == Status.PROCESSING, passes.failure_reason
    assert "is valid" in logs.log_text(passes.pk, "step:Cloning")

    set_engine_config(local_engine, max_processes_per_experiment=19)
    fails = queued(project, git_repo, operator="jobset", types=demo)
    pipeline.run_clone(fails.pk)
    fails.refresh_from_db()
    assert fails.status == Status.FAILED
    assert fails.failure_reason == (
        "Invalid manifest: spec.types.workers: 20 processes at once (count 10 × 2 completions in parallel) "
        "exceed engine local's limit of 19 (max_processes_per_experiment)"
    )


def test_kuberay_pools_count_with_head_and_submitter(project, git_repo):
    experiment = queued(project, git_repo, operator="kuberay", types=KUBERAY_POOLS)
    pipeline.run_clone(experiment.pk)
    experiment.refresh_from_db()
    assert experiment.status == Status.FAILED
    # No single pool is over the limit: the types as a whole are.
    assert experiment.failure_reason == (
        "Invalid manifest: spec.types: 132 processes at once exceed engine local's limit of 128 "
        "(max_processes_per_experiment)"
    )

    one_big_pool = KUBERAY_POOLS.replace("count: 100", "count: 200")
    experiment = queued(project, git_repo, operator="kuberay", types=one_big_pool)
    pipeline.run_clone(experiment.pk)
    experiment.refresh_from_db()
    assert experiment.failure_reason.startswith("Invalid manifest: spec.types.Workers[0].count: 232 processes")


@pytest.mark.parametrize("value", [0, -3, "12", 2.5, True, None, [4]])
def test_a_limit_that_is_not_a_positive_integer_falls_back_to_the_default(local_engine, value, caplog):
    set_engine_config(local_engine, max_running_experiments_per_project=value)
    with caplog.at_level(logging.WARNING, logger="experiments.limits"):
        assert engine_limit(local_engine, "max_running_experiments_per_project") == 20
    if value is not None:
        assert "max_running_experiments_per_project" in caplog.text
        assert "not a positive integer" in caplog.text


def test_defaults_and_a_set_limit(local_engine):
    assert DEFAULTS == {"max_processes_per_experiment": 128, "max_running_experiments_per_project": 20}
    set_engine_config(local_engine, max_processes_per_experiment=7)
    assert engine_limit(local_engine, "max_processes_per_experiment") == 7
    assert engine_limit(local_engine, "max_running_experiments_per_project") == 20


# --- running experiments per project -------------------------------------------------------
@pytest.fixture
def one_slot(local_engine):
    set_engine_config(local_engine, max_running_experiments_per_project=1)
    return local_engine


def gated(gate) -> str:
    """A workload that runs until the test creates the file `gate`."""
    return f"while [ ! -e {gate} ]; do sleep 0.1; done; echo passed {gate.name}"


def push(client, project, git_repo, command: str) -> str:
    message = "aichor[train.yaml]: limited"
    sha = git_repo.commit({MANIFEST: manifest_yaml(command), "Dockerfile": "FROM scratch\n"}, message)
    response = github_push(client, project, sha=sha, message=message)
    assert response.status_code == 201, response.content
    return response.json()["experiment"]


def running(experiment_id) -> Experiment:
    return wait_for(
        lambda: Experiment.objects.filter(pk=experiment_id, current_step=StepName.RUNNING).first(),
        message="the experiment to run",
    )


def waiting(experiment_id) -> Experiment:
    return wait_for(
        lambda: Experiment.objects.filter(pk=experiment_id, status=Status.CREATED).exclude(waiting_reason="").first(),
        message="the experiment to wait for a slot",
    )


def ended(experiment_id) -> Experiment:
    return wait_for(
        lambda: Experiment.objects.filter(pk=experiment_id, status__in=[Status.SUCCEEDED, Status.FAILED]).first(),
        message="the experiment to end",
    )


def test_second_experiment_waits_with_its_reason_and_starts_when_the_first_ends(
    client, project, git_repo, member_user, one_slot, celery_worker_thread, tmp_path
):
    from projects.services import create_api_token

    first = push(client, project, git_repo, gated(tmp_path / "first"))
    running(first)
    second = push(client, project, git_repo, "echo second ran")
    held = waiting(second)
    assert held.waiting_reason == SLOT_REASON
    assert held.current_step == StepName.WAITING

    client.force_login(member_user)
    page = client.get(f"/experiments/{second}/").content.decode()
    assert f'<small class="step-reason muted" id="waiting-reason">{SLOT_REASON}</small>' in page
    listing = client.get(f"/p/{project.slug}/?engine=local").content.decode()
    assert f'title="Waiting: {SLOT_REASON}"' in listing
    token = create_api_token(member_user)
    api = client.get(f"{API}/experiments/{second}", headers={"Authorization": f"Bearer {token}"}).json()
    assert api["waiting_reason"] == SLOT_REASON
    assert (api["status"], api["current_step"]) == ("Created", "Waiting")
    assert logs.log_text(second, "step:Waiting") == SLOT_REASON + "\n"
    assert Event.objects.filter(experiment_id=second, step=StepName.WAITING, reason=SLOT_REASON).count() == 1

    (tmp_path / "first").touch()
    done_first, done_second = ended(first), ended(second)
    assert done_first.status == Status.SUCCEEDED, done_first.failure_reason
    assert done_second.status == Status.SUCCEEDED, done_second.failure_reason
    assert done_second.started_at >= done_first.finished_at
    assert done_second.waiting_reason == ""
    assert logs.log_text(second, "process:worker-0") == "second ran\n"
    api = client.get(f"{API}/experiments/{second}", headers={"Authorization": f"Bearer {token}"}).json()
    assert api["waiting_reason"] == ""


def test_waiting_experiments_start_oldest_first(client, project, git_repo, one_slot, celery_worker_thread, tmp_path):
    a = push(client, project, git_repo, gated(tmp_path / "a"))
    running(a)
    b = push(client, project, git_repo, gated(tmp_path / "b"))
    waiting(b)
    c = push(client, project, git_repo, gated(tmp_path / "c"))
    waiting(c)

    (tmp_path / "a").touch()
    started = wait_for(
        lambda: Experiment.objects.filter(pk__in=[b, c], status=Status.PROCESSING).first(),
        message="a waiting experiment to start",
    )
    assert str(started.pk) == b
    running(b)
    assert Experiment.objects.get(pk=c).status == Status.CREATED  # the slot is b's

    (tmp_path / "b").touch()
    running(c)
    (tmp_path / "c").touch()
    finished = [ended(x) for x in (a, b, c)]
    assert [e.status for e in finished] == [Status.SUCCEEDED] * 3
    assert finished[0].finished_at <= finished[1].started_at
    assert finished[1].finished_at <= finished[2].started_at


def test_cancel_while_waiting_for_a_slot(
    client, project, git_repo, member_user, one_slot, celery_worker_thread, tmp_path
):
    a = push(client, project, git_repo, gated(tmp_path / "a"))
    running(a)
    b = push(client, project, git_repo, "echo b ran")
    waiting(b)
    client.force_login(member_user)
    response = client.post(f"/experiments/{b}/cancel/")
    assert response.status_code == 302
    cancelled = Experiment.objects.get(pk=b)
    assert cancelled.status == Status.CANCELLED
    assert cancelled.failure_reason == f"Cancelled by {member_user.username}"
    assert cancelled.waiting_reason == ""
    assert set(cancelled.steps.values_list("status", flat=True)) == {StepStatus.CANCELLED}

    c = push(client, project, git_repo, "echo c ran")
    waiting(c)
    (tmp_path / "a").touch()
    assert ended(c).status == Status.SUCCEEDED  # the cancelled one neither ran nor kept the slot
    assert Experiment.objects.get(pk=b).status == Status.CANCELLED
    assert "step:Cloning" not in logs.streams(b)


def test_two_clone_tasks_starting_at_once_take_one_slot(project, git_repo, one_slot):
    first, second = queued(project, git_repo), queued(project, git_repo)
    barrier = threading.Barrier(2)
    results: dict = {}

    def start(experiment_id) -> None:
        try:
            barrier.wait(10)
            results[experiment_id] = services.begin_step(experiment_id, StepName.CLONING)
        finally:
            connection.close()

    threads = [threading.Thread(target=start, args=(e.pk,)) for e in (first, second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert sorted(results.values()) == [False, True]
    assert Experiment.objects.filter(project=project, status=Status.PROCESSING).count() == 1
    loser = next(pk for pk, ok in results.items() if not ok)
    assert Experiment.objects.get(pk=loser).waiting_reason == SLOT_REASON


def test_with_room_for_every_active_experiment_a_start_takes_no_project_lock(project, git_repo, local_engine):
    # A sweep of 500 under a limit it fits in: each start is a count and the move, never a
    # turn at the project lock (held here by another transaction, as a slot dispatch holds it).
    set_engine_config(local_engine, max_running_experiments_per_project=3)
    experiments = [queued(project, git_repo) for _ in range(3)]
    db = connection.settings_dict
    holder = psycopg.connect(host=db["HOST"], port=db["PORT"] or 5432, user=db["USER"], dbname=db["NAME"])
    try:
        holder.execute("SELECT id FROM projects_project WHERE id = %s FOR UPDATE", [project.pk])
        results: list[bool] = []

        def start() -> None:
            try:
                results.extend(services.begin_step(e.pk, StepName.CLONING) for e in experiments)
            finally:
                connection.close()

        thread = threading.Thread(target=start)
        thread.start()
        thread.join(10)
        assert results == [True, True, True]
    finally:
        holder.close()
        thread.join(30)
    # One more than fits takes the lock and the line, and waits with its reason.
    fourth = queued(project, git_repo)
    assert not services.begin_step(fourth.pk, StepName.CLONING)
    assert Experiment.objects.get(pk=fourth.pk).waiting_reason


def test_reconcile_rechecks_a_waiting_experiment_quietly_and_starts_it_when_a_slot_frees(project, git_repo, one_slot):
    first, second = queued(project, git_repo), queued(project, git_repo)
    assert services.begin_step(first.pk, StepName.CLONING)
    assert not services.begin_step(second.pk, StepName.CLONING)

    def reconcile_later() -> list[str]:
        Experiment.objects.filter(pk=second.pk).update(heartbeat_at=timezone.now() - timedelta(hours=1))
        return pipeline.reconcile()

    assert reconcile_later() == []
    assert reconcile_later() == []
    assert Event.objects.filter(experiment=second, step=StepName.WAITING).count() == 1
    assert logs.log_text(second.pk, "step:Waiting") == SLOT_REASON + "\n"
    assert not Event.objects.filter(experiment=second, reason__startswith="reconcile").exists()

    # The organisation admin raises the limit: no experiment ends, reconcile starts it.
    set_engine_config(one_slot, max_running_experiments_per_project=2)
    assert reconcile_later() == [str(second.pk)]
    second.refresh_from_db()
    assert (second.status, second.current_step, second.waiting_reason) == (Status.PROCESSING, StepName.CLONING, "")


def test_a_hundred_completions_two_at_a_time_run_under_a_limit_of_two(
    client, member_user, project, local_engine, git_repo, celery_worker_thread
):
    # 100 completions, 2 at a time: 2 processes at once, so an engine allowing 2 runs them all,
    # never more than 2 at a time, and the experiment page tells how far the job is.
    set_engine_config(local_engine, max_processes_per_experiment=2)
    command = 'echo "start=$(date +%s.%N)"; sleep 0.05; echo "end=$(date +%s.%N)"'
    message = "aichor[train.yaml]: a hundred completions"
    manifest = manifest_yaml(command, operator="jobset", types=jobset(1, completions=100, parallelisms=2))
    sha = git_repo.commit({MANIFEST: manifest, "Dockerfile": "FROM scratch\n"}, message)
    response = github_push(client, project, sha=sha, message=message)
    assert response.status_code == 201, response.content
    experiment_id = response.json()["experiment"]
    client.force_login(member_user)

    def told_progress() -> int | None:
        html = client.get(f"/experiments/{experiment_id}/", HTTP_HX_REQUEST="true").content.decode()
        found = re.search(r'id="process-progress">Processes: completed (\d+)/100<', html)
        return found and int(found.group(1))

    seen = wait_for(told_progress, timeout=120, message="the live section to tell the completions' progress")
    assert wait_for(lambda: (n := told_progress()) and n > seen and n, timeout=120, message="the progress to grow")
    experiment = ended(experiment_id)
    assert experiment.status == Status.SUCCEEDED, experiment.failure_reason
    spans = []
    for completion in range(100):
        output = logs.log_text(experiment.pk, f"process:workers-0-{completion}")
        fields = dict(part.split("=", 1) for part in output.split() if "=" in part)
        spans.append((float(fields["start"]), float(fields["end"])))
    edges = sorted([(start, 1) for start, _ in spans] + [(end, -1) for _, end in spans])
    running = [0]
    for _, step in edges:  # an end sorts before a start at the same instant
        running.append(running[-1] + step)
    assert max(running) == 2
    # Once the experiment has ended the page no longer tells a progress.
    assert "process-progress" not in client.get(f"/experiments/{experiment_id}/").content.decode()
