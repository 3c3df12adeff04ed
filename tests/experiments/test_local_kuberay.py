"""KubeRay on the local engine with real Ray from PyPI (issue 14): the same plan as on docker, as
processes of the server's own host. The engine's `path` puts a virtualenv with Ray first on the
processes' PATH; the head starts with its rayStartParams, a worker joins it, `spec.command` runs
against the cluster through the head's job server, and nothing of Ray outlives the experiment."""

import os
import signal

import pytest

from experiments import logs
from experiments.engines.local import ray_dir
from experiments.models import Experiment, Status
from tests.experiments.ray_image import RAY_VERSION, ray_venv
from tests.helpers import ended, github_push, manifest_yaml, wait_for

pytestmark = pytest.mark.django_db(transaction=True)

# The head offers no CPU (`num-cpus: "0"`, as KubeRay demos set it): a task can only run on the
# worker that joined. The driver runs from the code's folder, as a container would run it from
# the image's working directory.
RAY_SCRIPT = """\
import os
import time

import ray

ray.init(address=os.environ["RAY_SERVER"])
deadline = time.monotonic() + 120
while len([n for n in ray.nodes() if n["Alive"]]) < 2 and time.monotonic() < deadline:
    time.sleep(0.5)
# Every node has this host's address, so the head is told by Ray's own mark, not by address.
head = next(n["NodeID"] for n in ray.nodes() if n["Alive"] and "node:__internal_head__" in n["Resources"])


@ray.remote(num_cpus=1)
def node_of(i):
    return ray.get_runtime_context().get_node_id()


nodes = ray.get([node_of.remote(i) for i in range(4)])
print("nodes", len([n for n in ray.nodes() if n["Alive"]]))
print("tasks on the head", sum(node == head for node in nodes), "on workers", sum(node != head for node in nodes))
print("ray", ray.__version__, "server", os.environ["RAY_SERVER"])
print("code folder", os.path.isfile("src/cluster.py"))
"""
TYPES = (
    "    Head:\n"
    "      resources:\n        cpus: 1\n        ramRatio: 2\n"
    "      rayStartParams:\n        num-cpus: '0'\n        disable-usage-stats: 'true'\n"
    "    Workers:\n"
    "      - name: small\n        count: 1\n"
    "        resources:\n          cpus: 1\n          ramRatio: 2\n"
)


def groups_alive(pids: list[int]) -> list[str]:
    """The processes of the experiment's process groups still on the host (each local process
    leads its own group; Ray's gcs_server, raylet and workers are in their node's)."""
    alive = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as fh:
                name, fields = fh.read().rsplit(")", 1)
        except OSError:
            continue
        state, _parent, group = fields.split()[:3]
        if int(group) in pids and state != "Z":
            alive.append(f"{entry.name} {name.split('(', 1)[1]}")
    return alive


@pytest.fixture
def ray_on_path(local_engine):
    local_engine.config = {**(local_engine.config or {}), "path": [str(ray_venv() / "bin")]}
    local_engine.save(update_fields=["config"])
    return local_engine


# The first run on a machine builds the Ray virtualenv (minutes on a loaded host) in setup.
@pytest.mark.timeout(900)
def test_kuberay_forms_a_cluster_on_the_local_engine_and_leaves_no_ray_process(
    client, project, git_repo, ray_on_path, celery_worker_thread
):
    message = "aichor[ray.yaml]: ray cluster on the local engine"
    manifest = manifest_yaml(
        "python3 src/cluster.py", operator="kuberay", types=TYPES, extra_spec=f"  rayVersion: {RAY_VERSION}\n"
    )
    sha = git_repo.commit(
        {"aichor_manifests/ray.yaml": manifest, "Dockerfile": "FROM scratch\n", "src/cluster.py": RAY_SCRIPT}, message
    )
    response = github_push(client, project, sha=sha, message=message)
    assert response.status_code == 201, response.content
    experiment_id = response.json()["experiment"]
    pids: list[int] = []
    try:
        handle = wait_for(
            lambda: Experiment.objects.filter(pk=experiment_id).values_list("handle", flat=True).first(),
            timeout=180,
            message="the workload submitted",
        )
        pids = [pid for pid in handle["pids"].values() if pid]
        assert len(pids) == 3, handle  # head, small-0 and the submitter
        experiment = ended(experiment_id, timeout=300)
        output = logs.log_text(experiment.pk, "process:submitter")
        head = logs.log_text(experiment.pk, "process:head")
        assert experiment.status == Status.SUCCEEDED, (experiment.failure_reason, output[-3000:], head[-3000:])
        assert "Ray runtime started" in head
        assert "nodes 2" in output  # the worker joined the head
        assert "tasks on the head 0 on workers 4" in output  # the head started with num-cpus 0
        assert f"ray {RAY_VERSION} server 127.0.0.1:" in output
        assert "code folder True" in output
        assert "succeeded\n" in output  # the submitter saw the job end, after its last lines
        wait_for(lambda: not groups_alive(pids), timeout=60, message="every Ray process of the experiment gone")
        # Ray's session folder (its logs, sockets and address file) goes with the experiment.
        wait_for(lambda: not ray_dir(experiment_id).exists(), timeout=30, message="the Ray folder removed")
    finally:
        for pid in pids:  # a failed test leaves no Ray node running on the host either
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
