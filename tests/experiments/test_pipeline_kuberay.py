"""KubeRay on the docker engine with real Ray from PyPI: the head, the worker pools and the
submitter form one Ray cluster, and `spec.command` runs against it as KubeRay's submitter runs
it (`ray job submit` to the head's job server)."""

import pytest

from experiments import logs
from experiments.models import Status
from tests.experiments.ray_image import ray_image
from tests.helpers import containers_of, ended, github_push, manifest_yaml, wait_for

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.docker]

# Tasks need a CPU, and the head offers none (`num-cpus: "0"`, as KubeRay demos set it): they
# can only run on the worker pool's nodes.
RAY_SCRIPT = """\
import os
import time

import ray
from ray.util.placement_group import placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

ray.init(address=os.environ["RAY_SERVER"])
deadline = time.monotonic() + 90
while len([n for n in ray.nodes() if n["Alive"]]) < 3 and time.monotonic() < deadline:
    time.sleep(0.5)


@ray.remote(num_cpus=1)
def node_of(i):
    return ray.get_runtime_context().get_node_id()


# One CPU on each of two different nodes (SPREAD alone is best effort: on a busy machine one
# worker could take every task). The head offers no CPU, so these are the two workers.
group = placement_group([{"CPU": 1}, {"CPU": 1}], strategy="STRICT_SPREAD")
ray.get(group.ready(), timeout=120)
nodes = set(
    ray.get(
        [
            node_of.options(
                scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=i)
            ).remote(i)
            for i in range(2)
        ]
    )
)
print("nodes", len([n for n in ray.nodes() if n["Alive"]]))
print("task nodes", len(nodes))
print("cwd", os.getcwd())
"""
TYPES = (
    "    Head:\n"
    "      resources:\n        cpus: 1\n        ramRatio: 2\n"
    "      rayStartParams:\n        num-cpus: '0'\n        dashboard-host: 0.0.0.0\n"
    "    Workers:\n"
    "      - name: small\n        count: 2\n"
    "        resources:\n          cpus: 1\n          ramRatio: 2\n"
)


@pytest.fixture
def ray_dockerfile(docker_client) -> str:
    return f"FROM {ray_image(docker_client)}\nWORKDIR /app\nCOPY . /app\n"


# A Ray cluster of three containers starts slowly on a loaded machine: its own deadline (ended's
# 300 s) must fire before the suite's per-test timeout, not together with it.
@pytest.mark.timeout(600)
def test_kuberay_forms_a_cluster_and_runs_the_command_on_it(
    client, docker_project, git_repo, docker_client, ray_dockerfile, celery_worker_thread
):
    message = "aichor[ray.yaml]: ray cluster"
    manifest = manifest_yaml(
        # The whole command is the job's entrypoint (SPEC §9): what follows `;` runs in the job too.
        "python3 src/cluster.py; echo after the driver",
        operator="kuberay",
        types=TYPES,
        extra_spec="  rayVersion: 2.23.0\n",
    )
    sha = git_repo.commit(
        {"aichor_manifests/ray.yaml": manifest, "Dockerfile": ray_dockerfile, "src/cluster.py": RAY_SCRIPT}, message
    )
    response = github_push(client, docker_project, sha=sha, message=message)
    assert response.status_code == 201, response.content
    try:
        experiment = ended(response.json()["experiment"], timeout=300)
    except AssertionError as exc:  # say where the cluster stuck: each container's last words
        raise AssertionError(f"{exc}\n{_tails(docker_client, response.json()['experiment'])}") from None
    output = logs.log_text(experiment.pk, "process:submitter")
    assert experiment.status == Status.SUCCEEDED, (experiment.failure_reason, output[-3000:])
    assert "nodes 3" in output, output[-3000:]
    assert "task nodes 2" in output, output[-3000:]  # both workers ran tasks; the head (no CPUs) none
    # KubeRay's job server port, in the experiment's namespace; the image's Ray ran aichor's
    # submitter (which prints the lines Ray's follower can miss: these three, printed at the end).
    assert "submitted to http://127.0.0.1:8265" in output
    assert "cwd /app" in output, output[-3000:]  # the image's working directory, as the command was written for
    # After the driver, inside the job: before the submitter says the job ended.
    assert output.index("cwd /app") < output.index("after the driver\n") < output.rindex("' succeeded\n")
    wait_for(lambda: containers_of(docker_client, experiment.pk) == [], timeout=60, message="containers removed")


def _tails(docker_client, experiment_id) -> str:
    """Each container's last words, then the containers go: a stuck cluster must not load the
    rest of the suite."""
    parts = []
    for c in containers_of(docker_client, experiment_id):
        tail = docker_client.api.logs(c["Id"], tail=40).decode("utf-8", "replace")
        parts.append(f"--- {c['Names'][0]} ({c['State']}, {c['Status']})\n{tail}")
        docker_client.api.remove_container(c["Id"], force=True)
    return "\n".join(parts)


def test_a_failing_ray_job_fails_the_experiment_with_its_output(
    client, docker_project, git_repo, docker_client, ray_dockerfile, celery_worker_thread
):
    message = "aichor[ray.yaml]: ray job fails"
    script = "import ray\nray.init()\nprint('driver on', len(ray.nodes()), 'node(s)')\nraise SystemExit(3)\n"
    types = "    Head:\n      resources:\n        cpus: 1\n        ramRatio: 2\n"
    manifest = manifest_yaml("python3 fail.py", operator="kuberay", types=types)
    sha = git_repo.commit(
        {"aichor_manifests/ray.yaml": manifest, "Dockerfile": ray_dockerfile, "fail.py": script}, message
    )
    response = github_push(client, docker_project, sha=sha, message=message)
    assert response.status_code == 201, response.content
    experiment = ended(response.json()["experiment"], timeout=300)
    output = logs.log_text(experiment.pk, "process:submitter")
    assert experiment.status == Status.FAILED, output[-3000:]
    assert "submitter exited with code" in experiment.failure_reason
    assert "driver on 1 node(s)" in output
