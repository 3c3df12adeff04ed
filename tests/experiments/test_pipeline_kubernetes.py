"""The pipeline on the Kubernetes engine, end to end: a signed push → clone → a real image build
pushed to a real registry (Debian's docker-registry on 127.0.0.1) → objects created through the
official `kubernetes` client → pods run. No cluster can run here: the API server is the fake of
tests/k8s/ (it validates every object against the real schemas and runs pods as real Docker
containers), which this module's engine cannot tell from a cluster."""

import shutil
import socket
import subprocess
import time

import pytest

from experiments import logs
from experiments.models import Status
from tests.helpers import containers_of, ended, push, unavailable, wait_for
from tests.k8s.conftest import fake_k8s, fake_k8s_server, kube_api, kubeconfig  # noqa: F401 (fixtures)

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.docker]


@pytest.fixture(scope="session")
def registry(tmp_path_factory):
    """A real image registry on 127.0.0.1 (Docker pushes to loopback registries over HTTP)."""
    binary = shutil.which("docker-registry")
    if not binary:
        unavailable("docker-registry is not installed (apt-get install docker-registry)")
    root = tmp_path_factory.mktemp("registry")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = root / "config.yml"
    config.write_text(
        "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n"
        f"    rootdirectory: {root / 'data'}\nhttp:\n  addr: 127.0.0.1:{port}\n"
    )
    process = subprocess.Popen([binary, "serve", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def answers() -> bool:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return True
        except OSError:
            return False

    wait_for(answers, timeout=20, message="the registry to listen")
    yield f"127.0.0.1:{port}"
    process.terminate()
    process.wait(10)


@pytest.fixture
def k8s_project(db, admin_user, member_user, git_repo, kubeconfig, registry):  # noqa: F811
    from projects.models import Engine
    from projects.services import create_project

    engine = Engine.objects.create(
        name="cluster",
        kind=Engine.Kind.KUBERNETES,
        config={"kubeconfig": str(kubeconfig), "registry": registry, "build_network": "none"},
    )
    return create_project(
        name="Cluster",
        slug="cluster",
        repo_clone_url=git_repo.url,
        engines=[engine],
        default_engine=engine,
        admins=[admin_user],
        members=[member_user],
        webhook_secret="s3cret-webhook",
    )


def run(client, project, git_repo, command: str, **manifest):
    experiment = ended(push(client, project, git_repo, command, **manifest), timeout=180)
    return experiment


def namespace_pods(api, namespace: str) -> dict[str, str]:
    """The pods of the namespace, by name, with their phase."""
    from kubernetes import client as k8s

    return {pod.metadata.name: pod.status.phase for pod in k8s.CoreV1Api(api).list_namespaced_pod(namespace).items}


def test_a_batch_push_runs_as_a_job_from_the_pushed_image(
    client,
    k8s_project,
    git_repo,
    docker_client,
    celery_worker_thread,
    kube_api,  # noqa: F811
    registry,  # noqa: F811
):
    experiment = run(client, k8s_project, git_repo, 'echo "hello from $AICHOR_EXPERIMENT_ID"')
    assert experiment.status == Status.SUCCEEDED, experiment.failure_reason
    # The image was pushed and runs by digest.
    assert experiment.image.startswith(f"{registry}/") and "@sha256:" in experiment.image
    assert f"hello from {experiment.pk}" in logs.log_text(experiment.pk, "process:worker-0")
    assert "created Job" in logs.log_text(experiment.pk, "step:Submitting")
    # A terminal state leaves nothing in the project's namespace.
    wait_for(lambda: namespace_pods(kube_api, k8s_project.namespace) == {}, timeout=60, message="pods gone")
    wait_for(lambda: containers_of(docker_client, experiment.pk) == [], timeout=30, message="containers gone")


def test_a_failing_workload_ends_failed_with_its_exit_code(
    client,
    k8s_project,
    git_repo,
    docker_client,
    celery_worker_thread,
    fake_k8s,  # noqa: F811
):
    experiment = run(client, k8s_project, git_repo, "echo dying; exit 3")
    assert experiment.status == Status.FAILED
    assert experiment.exit_code == 3, experiment.failure_reason
    assert "dying" in logs.log_text(experiment.pk, "process:worker-0")


def test_pytorch_replicas_get_their_ranks_from_the_operator(
    client,
    k8s_project,
    git_repo,
    docker_client,
    celery_worker_thread,
    fake_k8s,  # noqa: F811
):
    types = (
        "    Master:\n      count: 1\n      resources:\n        cpus: 1\n        ramRatio: 1\n"
        "    Worker:\n      count: 2\n      resources:\n        cpus: 1\n        ramRatio: 1\n"
    )
    experiment = run(
        client, k8s_project, git_repo, 'echo "rank=$RANK world=$WORLD_SIZE"', operator="pytorch", types=types
    )
    assert experiment.status == Status.SUCCEEDED, experiment.failure_reason
    printed = {
        name: logs.log_text(experiment.pk, f"process:{name}").strip() for name in ("master-0", "worker-0", "worker-1")
    }
    assert printed == {"master-0": "rank=0 world=3", "worker-0": "rank=1 world=3", "worker-1": "rank=2 world=3"}


def test_a_jobset_runs_every_completion_of_every_group(
    client,
    k8s_project,
    git_repo,
    docker_client,
    celery_worker_thread,
    fake_k8s,  # noqa: F811
):
    types = (
        "    trainer:\n      count: 1\n      completions: 2\n      parallelisms: 2\n"
        "      resources:\n        cpus: 1\n        ramRatio: 1\n"
        "    evaluator:\n      count: 1\n      resources:\n        cpus: 1\n        ramRatio: 1\n"
    )
    experiment = run(
        client,
        k8s_project,
        git_repo,
        'echo "$REPLICATED_JOB_NAME $JOB_INDEX $JOB_COMPLETION_INDEX of $JOBSET_NAME"',
        operator="jobset",
        types=types,
    )
    assert experiment.status == Status.SUCCEEDED, experiment.failure_reason
    for process, index in (("trainer-0-0", 0), ("trainer-0-1", 1)):
        assert logs.log_text(experiment.pk, f"process:{process}").startswith(f"trainer 0 {index} of "), process
    assert logs.log_text(experiment.pk, "process:evaluator-0-0").startswith("evaluator 0 0 of ")


def test_cancel_empties_the_namespace(
    client,
    k8s_project,
    git_repo,
    docker_client,
    celery_worker_thread,
    kube_api,  # noqa: F811
):
    from experiments.models import Experiment, StepName
    from experiments.services import cancel_experiment

    experiment_id = push(client, k8s_project, git_repo, "sleep 300")
    wait_for(
        lambda: (
            Experiment.objects.filter(pk=experiment_id, current_step=StepName.RUNNING).exists()
            and "Running" in namespace_pods(kube_api, k8s_project.namespace).values()
        ),
        timeout=180,
        message="the pod to run",
    )
    started = time.monotonic()
    cancel_experiment(Experiment.objects.get(pk=experiment_id), actor=None)
    experiment = ended(experiment_id, timeout=60)
    assert experiment.status == Status.CANCELLED
    wait_for(lambda: namespace_pods(kube_api, k8s_project.namespace) == {}, timeout=60, message="pods gone")
    assert time.monotonic() - started < 60


def test_a_pod_waiting_for_gpus_says_why(
    client,
    k8s_project,
    git_repo,
    docker_client,
    celery_worker_thread,
    fake_k8s,  # noqa: F811
):
    from experiments.models import Experiment

    types = (
        "    worker:\n      count: 1\n      resources:\n        cpus: 1\n        ramRatio: 1\n"
        "        accelerators:\n          gpu:\n            count: 1\n            type: gpu\n"
        "            product: NVIDIA-A100-SXM4-80GB\n"
    )
    fake_k8s.kubelet.node_labels["nvidia.com/gpu.product"] = "NVIDIA-A100-SXM4-80GB"
    experiment_id = push(client, k8s_project, git_repo, "nvidia-smi", types=types)
    wait_for(
        lambda: "Insufficient nvidia.com/gpu" in logs.log_text(experiment_id, "step:Running"),
        timeout=180,
        message="the Running step to say why the pod waits",
    )
    assert Experiment.objects.get(pk=experiment_id).status == Status.PROCESSING
