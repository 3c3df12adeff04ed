"""The pipeline on a real Docker Engine: real image builds, real containers."""

import uuid

import pytest

from experiments import logs
from experiments.models import Experiment, Status, StepName, StepStatus
from experiments.services import cancel_experiment
from projects.services import create_project
from tests.datasets.conftest import s3_server, use_s3  # noqa: F401 (s3_server: a fixture)
from tests.experiments.test_pipeline_local import (
    VARIABLES_SPEC,
    assert_page_shows_the_environment,
    set_project_variables,
)
from tests.experiments.test_portforward import server_redis  # noqa: F401 (a fixture)
from tests.helpers import DOCKERFILE, TEST_IMAGE, containers_of, ended, github_push, manifest_yaml, push, wait_for

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.docker]


def test_push_builds_image_and_runs_container_with_aichor_env(
    client, docker_project, git_repo, docker_client, celery_worker_thread
):
    experiment_id = push(client, docker_project, git_repo, "env | sort; ls /app/Dockerfile")
    experiment = ended(experiment_id)
    assert experiment.status == Status.SUCCEEDED, experiment.failure_reason
    output = logs.log_text(experiment.pk, "process:worker-0")
    assert f"AICHOR_EXPERIMENT_ID={experiment.pk}" in output
    assert f"AICHOR_PROJECT_ID={docker_project.pk}" in output
    assert f"AICHOR_OUTPUT_PATH=/mnt/aichor/outputs/output/{experiment.pk}/" in output
    assert "AICHOR_INPUT_PATH=/mnt/aichor/inputs/" in output
    assert "AICHOR_EXPERIMENT_MESSAGE=aichor[train.yaml]: docker run" in output
    assert f"VCS_SHA={experiment.commit_sha}" in output
    assert "/app/Dockerfile" in output  # the code was cloned into the image
    assert "Successfully built" in logs.log_text(experiment.pk, "step:Building")
    assert docker_client.images.get(experiment.image)
    wait_for(lambda: containers_of(docker_client, experiment.pk) == [], timeout=30, message="containers removed")


def test_broken_dockerfile_fails_at_building_with_the_error(
    client, docker_project, git_repo, docker_client, celery_worker_thread
):
    experiment_id = push(client, docker_project, git_repo, "true", dockerfile=f"FROM {TEST_IMAGE}\nRUN exit 7\n")
    experiment = ended(experiment_id)
    assert experiment.status == Status.FAILED
    assert experiment.current_step == StepName.BUILDING
    assert experiment.steps.get(name=StepName.BUILDING).status == StepStatus.FAILED
    build_log = logs.log_text(experiment.pk, "step:Building")
    assert "returned a non-zero code: 7" in build_log
    assert "Build failed" in experiment.failure_reason


def test_workload_exit_code_fails_experiment(client, docker_project, git_repo, docker_client, celery_worker_thread):
    experiment = ended(push(client, docker_project, git_repo, "echo bad data >&2; exit 3"))
    assert experiment.status == Status.FAILED
    assert experiment.exit_code == 3
    assert "bad data" in logs.log_text(experiment.pk, "process:worker-0")
    wait_for(lambda: containers_of(docker_client, experiment.pk) == [], timeout=30, message="containers removed")


def test_pytorch_three_workers_get_ranks_and_one_master(
    client, docker_project, git_repo, docker_client, celery_worker_thread
):
    types = "    worker:\n      count: 3\n      resources:\n        cpus: 1\n        memory: 1\n"
    experiment = ended(
        push(
            client,
            docker_project,
            git_repo,
            "echo rank=$RANK world=$WORLD_SIZE master=$MASTER_ADDR:$MASTER_PORT",
            operator="pytorch",
            types=types,
        )
    )
    assert experiment.status == Status.SUCCEEDED, experiment.failure_reason
    seen = {}
    for i in range(3):
        line = logs.log_text(experiment.pk, f"process:worker-{i}").strip()
        fields = dict(part.split("=", 1) for part in line.split())
        seen[fields["rank"]] = fields
    assert sorted(seen) == ["0", "1", "2"]
    assert {f["world"] for f in seen.values()} == {"3"}
    masters = {f["master"] for f in seen.values()}
    assert len(masters) == 1 and masters.pop().startswith("127.0.0.1:")


def test_cancel_while_running_removes_containers_and_starts_nothing(
    client, docker_project, git_repo, docker_client, member_user, celery_worker_thread
):
    experiment_id = push(client, docker_project, git_repo, "echo started; sleep 300")
    wait_for(
        lambda: Experiment.objects.filter(pk=experiment_id, current_step=StepName.RUNNING).exists(),
        timeout=120,
        message="Running",
    )
    wait_for(lambda: containers_of(docker_client, experiment_id), message="the container")
    cancel_experiment(Experiment.objects.get(pk=experiment_id), actor=member_user)
    experiment = Experiment.objects.get(pk=experiment_id)
    assert experiment.status == Status.CANCELLED
    wait_for(lambda: containers_of(docker_client, experiment_id) == [], timeout=30, message="containers removed")
    steps = {s.name: s.status for s in experiment.steps.all()}
    assert steps[StepName.RUNNING] == StepStatus.CANCELLED
    assert steps[StepName.COMPLETED] == StepStatus.CANCELLED


def test_cancel_while_building_stops_the_build(
    client, docker_project, git_repo, docker_client, member_user, celery_worker_thread
):
    marker = f"building-{uuid.uuid4().hex}"

    def build_containers():
        return [c for c in docker_client.api.containers(all=True) if marker in c["Command"]]

    dockerfile = f"FROM {TEST_IMAGE}\nRUN echo {marker} && sleep 120\n"
    experiment_id = push(client, docker_project, git_repo, "echo never", dockerfile=dockerfile)
    wait_for(build_containers, timeout=60, message="the build to run")
    cancel_experiment(Experiment.objects.get(pk=experiment_id), actor=member_user)
    # The build container goes away with the aborted build; nothing is submitted afterwards.
    wait_for(lambda: not build_containers(), timeout=30, message="build container removed")
    experiment = Experiment.objects.get(pk=experiment_id)
    assert experiment.status == Status.CANCELLED
    assert experiment.steps.get(name=StepName.BUILDING).status == StepStatus.CANCELLED
    assert experiment.steps.get(name=StepName.SUBMITTING).status == StepStatus.CANCELLED
    assert containers_of(docker_client, experiment_id) == []
    assert not experiment.image


def test_gitlab_push_runs_to_success(client, docker_project, git_repo, docker_client, celery_worker_thread):
    from tests.experiments.test_webhooks import gitlab_push

    message = "aichor(train.yaml): from gitlab"
    sha = git_repo.commit(
        {"aichor_manifests/train.yaml": manifest_yaml("echo gitlab-$AICHOR_EXPERIMENT_ID"), "Dockerfile": DOCKERFILE},
        message,
    )
    response = gitlab_push(client, docker_project, sha=sha, message=message)
    assert response.status_code == 201, response.content
    experiment = ended(response.json()["experiment"])
    assert experiment.status == Status.SUCCEEDED, experiment.failure_reason
    assert f"gitlab-{experiment.pk}" in logs.log_text(experiment.pk, "process:worker-0")


def test_identical_code_reuses_the_built_image(client, docker_project, git_repo, docker_client, celery_worker_thread):
    first = ended(push(client, docker_project, git_repo, "echo first"))
    assert first.status == Status.SUCCEEDED, first.failure_reason
    # A new commit with the same tree (only the message differs) needs no new build.
    message = "aichor[train.yaml]: same code again"
    sha = git_repo.commit({}, message)
    second = ended(github_push(client, docker_project, sha=sha, message=message).json()["experiment"])
    assert second.status == Status.SUCCEEDED, second.failure_reason
    assert "reusing cached image" in logs.log_text(second.pk, "step:Building")
    # It runs by the name the first run gave the image: no tag of its own, since each tag
    # rewrites the daemon's whole tag file.
    assert second.image == first.image
    assert not [t for t in docker_client.images.get(first.image).tags if t.endswith(str(second.pk))]


def test_skip_build_reuses_another_experiments_image(
    client, docker_project, git_repo, docker_client, celery_worker_thread
):
    first = ended(push(client, docker_project, git_repo, "echo built"))
    assert first.status == Status.SUCCEEDED, first.failure_reason
    skip = f"  skipBuild:\n    enabled: true\n    experimentID: {first.pk}\n    failIfNotFound: true\n"
    # A Dockerfile that cannot build proves nothing was built.
    second = ended(
        push(client, docker_project, git_repo, "echo reused", builder_extra=skip, dockerfile="FROM nowhere/none\n")
    )
    assert second.status == Status.SUCCEEDED, second.failure_reason
    assert second.image == first.image
    assert "reusing the image of experiment" in logs.log_text(second.pk, "step:Building")
    assert logs.log_text(second.pk, "process:worker-0") == "reused\n"


def test_skip_build_of_unknown_experiment_fails_clearly(
    client, docker_project, git_repo, docker_client, celery_worker_thread
):
    skip = f"  skipBuild:\n    enabled: true\n    experimentID: {uuid.uuid4()}\n    failIfNotFound: true\n"
    experiment = ended(push(client, docker_project, git_repo, "true", builder_extra=skip))
    assert experiment.status == Status.FAILED
    assert experiment.current_step == StepName.BUILDING
    assert "no image of experiment" in experiment.failure_reason


def test_pytorch_workers_reach_each_other_on_localhost(
    client, docker_project, git_repo, docker_client, celery_worker_thread
):
    # The processes of one experiment share one network namespace, as the containers of a pod:
    # rank 1 reaches rank 0's listener at MASTER_ADDR (127.0.0.1) without any host network.
    # Rank 0's stdin is a FIFO it holds open itself: on an ended stdin busybox nc would half-close
    # at once, and rank 1's nc, seeing that end before it read its own stdin, would leave unsent.
    command = (
        'if [ "$RANK" = 0 ]; then mkfifo /tmp/hold; exec 3<>/tmp/hold; nc -l -p "$MASTER_PORT" <&3; '
        'else until echo "hello from rank $RANK" | nc "$MASTER_ADDR" "$MASTER_PORT"; do sleep 0.2; done; fi'
    )
    types = "    worker:\n      count: 2\n      resources:\n        cpus: 1\n        memory: 1\n"
    experiment = ended(push(client, docker_project, git_repo, command, operator="pytorch", types=types))
    assert experiment.status == Status.SUCCEEDED, experiment.failure_reason
    assert "hello from rank 1" in logs.log_text(experiment.pk, "process:worker-0")
    wait_for(lambda: containers_of(docker_client, experiment.pk) == [], timeout=30, message="containers removed")


@pytest.mark.usefixtures("server_redis")
def test_workload_and_build_cannot_reach_the_servers_redis(
    client, docker_project, git_repo, docker_client, celery_worker_thread
):
    # Neither a Dockerfile's RUN nor the workload is on the server's network: Redis there
    # (answering PING with +PONG) is out of their reach.
    probe = "printf 'PING\\r\\n' | nc -w1 127.0.0.1 6379"
    dockerfile = f"{DOCKERFILE}RUN ({probe} || echo unreachable) > /build-probe.txt 2>&1\n"
    command = f"cat /build-probe.txt; {probe} || echo workload: unreachable"
    experiment = ended(push(client, docker_project, git_repo, command, dockerfile=dockerfile))
    assert experiment.status == Status.SUCCEEDED, experiment.failure_reason
    output = logs.log_text(experiment.pk, "process:worker-0")
    assert "+PONG" not in output
    assert "workload: unreachable" in output


def test_cancel_during_submitting_stops_creating_containers(
    client, docker_project, git_repo, docker_client, member_user, celery_worker_thread
):
    requested = 60
    types = f"    worker:\n      count: {requested}\n      resources:\n        cpus: 1\n        memory: 1\n"
    experiment_id = push(client, docker_project, git_repo, "sleep 600", operator="pytorch", types=types)
    wait_for(
        lambda: Experiment.objects.filter(pk=experiment_id, current_step=StepName.SUBMITTING).exists(),
        timeout=120,
        message="Submitting",
    )
    cancel_experiment(Experiment.objects.get(pk=experiment_id), actor=member_user)
    wait_for(lambda: containers_of(docker_client, experiment_id) == [], timeout=60, message="containers removed")
    experiment = Experiment.objects.get(pk=experiment_id)
    assert experiment.status == Status.CANCELLED
    created = logs.log_text(experiment.pk, "step:Submitting").count("created container")
    assert created < requested
    # Nothing the submit made survives it (a late creation would show up here).
    wait_for(
        lambda: experiment.steps.get(name=StepName.SUBMITTING).status == StepStatus.CANCELLED,
        message="Submitting cancelled",
    )
    assert containers_of(docker_client, experiment_id) == []


def test_engine_network_that_does_not_exist_fails_with_its_name(
    client, docker_project, docker_engine, git_repo, docker_client, celery_worker_thread
):
    docker_engine.config = {"network": "aichor-test-missing-network"}
    docker_engine.save()
    experiment = ended(push(client, docker_project, git_repo, "true"))
    assert experiment.status == Status.FAILED
    assert "the Docker network 'aichor-test-missing-network' does not exist" in experiment.failure_reason
    assert containers_of(docker_client, experiment.pk) == []


@pytest.mark.s3
def test_page_shows_the_environment_a_container_gets_on_s3_storage(
    client,
    settings,
    s3_server,  # noqa: F811
    docker_engine,
    admin_user,
    member_user,
    git_repo,
    celery_worker_thread,
):
    # The buckets are S3: the workload gets s3:// paths and the endpoint's credentials, no mounts.
    use_s3(settings, s3_server)
    project = create_project(
        name="S3 env", slug="s3env", repo_clone_url=git_repo.url, engines=[docker_engine],
        admins=[admin_user], members=[member_user], webhook_secret="s3cret-webhook",
    )  # fmt: skip
    set_project_variables(project)
    experiment = ended(push(client, project, git_repo, "env", extra_spec=VARIABLES_SPEC))
    assert experiment.status == Status.SUCCEEDED, experiment.failure_reason
    output = logs.log_text(experiment.pk, "process:worker-0")
    assert_page_shows_the_environment(client, member_user, experiment, output)
    assert f"AICHOR_INPUT_PATH=s3://{project.inputs_bucket}/\n" in output
    assert f"AWS_SECRET_ACCESS_KEY={s3_server.secret_key}\n" in output
    assert f"AWS_ENDPOINT_URL={s3_server.endpoint}\n" in output
