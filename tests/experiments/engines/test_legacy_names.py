"""AIchor's legacy names still reach the workload: the `tf` operator with TF_CONFIG per process,
JOBSET_NAME, RAY_SERVER beside RAY_ADDRESS, AICHOR_LOGS_PATH and VCS_COMMIT_MESSAGE (issue 14,
items 6 and 7), on the single-host plan, the docker and local engines, and Kubernetes."""

import json

import pytest
from django.conf import settings

from experiments import logs
from experiments.engines.k8s_objects import object_name, render
from experiments.engines.single_host import plan_processes, ports_needed
from experiments.models import Status
from tests.experiments.engines.test_single_host import RES, workload
from tests.experiments.test_pipeline_local import push_and_wait
from tests.helpers import ended, push
from tests.k8s.schemas import validate_object

CHIEF_AND_TWO_WORKERS = f"    Chief:\n{RES}    Worker:\n      count: 2\n{RES}"
WITH_PS = f"{CHIEF_AND_TWO_WORKERS}    PS:\n      count: 1\n{RES}"
# Each process prints what TensorFlow would read, on one line the test can find.
PRINT_TF_CONFIG = 'echo "TF_CONFIG=$TF_CONFIG"; echo "LOGS=$AICHOR_LOGS_PATH"; echo "MSG=$VCS_COMMIT_MESSAGE"'


def tf_config(output: str) -> dict:
    line = next(line for line in output.splitlines() if line.startswith("TF_CONFIG="))
    return json.loads(line.removeprefix("TF_CONFIG="))


def assert_tf_cluster(configs: dict[str, dict], host: str) -> None:
    """Every process sees the same cluster, one distinct host:port per process, and its own
    type and index, as TensorFlow's TFConfigClusterResolver reads them."""
    (cluster,) = {json.dumps(c["cluster"], sort_keys=True) for c in configs.values()}
    cluster = json.loads(cluster)
    assert sorted(cluster) == ["chief", "worker"]
    assert (len(cluster["chief"]), len(cluster["worker"])) == (1, 2)
    addresses = cluster["chief"] + cluster["worker"]
    assert len(set(addresses)) == 3
    for address in addresses:
        name, port = address.rsplit(":", 1)
        assert name == host and 0 < int(port) < 65536
    assert {name: (c["task"]["type"], c["task"]["index"]) for name, c in configs.items()} == {
        "chief-0": ("chief", 0),
        "worker-0": ("worker", 0),
        "worker-1": ("worker", 1),
    }


# --- the plan -------------------------------------------------------------------------------
def test_tf_plan_gives_every_process_its_own_address_and_task():
    plan = workload("tf", WITH_PS, "0.2.2")
    assert ports_needed(plan) == 4
    processes = plan_processes(plan, host="h", ports=[11, 12, 13, 14])
    assert [(p.name, p.role, p.decisive) for p in processes] == [
        ("chief-0", "chief", True),
        ("worker-0", "worker", True),
        ("worker-1", "worker", True),
        # A parameter server serves until killed: it never decides the outcome.
        ("ps-0", "ps", False),
    ]
    configs = {p.name: json.loads(p.env["TF_CONFIG"]) for p in processes}
    assert configs["worker-1"] == {
        "cluster": {"chief": ["h:11"], "worker": ["h:12", "h:13"], "ps": ["h:14"]},
        "task": {"type": "worker", "index": 1},
        "environment": "cloud",
    }
    assert configs["ps-0"]["task"] == {"type": "ps", "index": 0}


def test_a_single_tf_process_gets_no_tf_config():
    # As the training operator does: TensorFlow then trains locally (AIchor's tf demo says so).
    (only,) = plan_processes(workload("tf", f"    Worker:\n      count: 1\n{RES}", "0.2.2"), host="h", ports=[1])
    assert only.name == "worker-0" and "TF_CONFIG" not in only.env


def test_jobset_processes_know_their_jobset_name():
    plan = workload("jobset", f"    workers:\n      count: 2\n{RES}")
    names = {p.env["JOBSET_NAME"] for p in plan_processes(plan, host="h", ports=[1])}
    # The name the JobSet has on Kubernetes, where JOBSET_NAME comes from its label.
    assert names == {object_name(plan.experiment_id)}


def test_kuberay_processes_get_ray_server_beside_ray_address():
    types = f"    Head:\n{RES}    Workers:\n      - name: small\n        count: 1\n{RES.replace('      ', '        ')}"
    for process in plan_processes(workload("kuberay", types), host="h", ports=[6380]):
        assert (process.env["RAY_ADDRESS"], process.env["RAY_SERVER"]) == ("h:6380", "h:6380")


# --- Kubernetes -----------------------------------------------------------------------------
def test_tf_renders_a_valid_tfjob_with_the_manifest_replica_types():
    objects = render(workload("tf", WITH_PS, "0.2.2"), namespace="ns", image="img", experiment_id="e1", config={})
    (tfjob,) = objects
    assert validate_object(tfjob) == []
    assert (tfjob["apiVersion"], tfjob["kind"]) == ("kubeflow.org/v1", "TFJob")
    replicas = tfjob["spec"]["tfReplicaSpecs"]
    assert {name: spec["replicas"] for name, spec in replicas.items()} == {"Chief": 1, "Worker": 2, "PS": 1}
    for spec in replicas.values():
        # The operator reads exit codes from the container it names `tensorflow`, and writes TF_CONFIG.
        (container,) = spec["template"]["spec"]["containers"]
        assert container["name"] == "tensorflow"
        assert "TF_CONFIG" not in {e["name"] for e in container["env"]}


def test_kuberay_head_sets_ray_server_where_the_driver_runs():
    types = f"    Head:\n{RES}      rayStartParams: {{port: '6380'}}\n"
    (rayjob,) = render(workload("kuberay", types), namespace="ns", image="img", experiment_id="e1", config={})
    head = rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {"name": "RAY_SERVER", "value": "127.0.0.1:6380"} in head["env"]
    assert validate_object(rayjob) == []


# --- real engines ---------------------------------------------------------------------------
@pytest.mark.django_db(transaction=True)
def test_tf_config_on_the_local_engine(client, project, git_repo, celery_worker_thread):
    message = "aichor[train.yaml]: tf on local"
    experiment = push_and_wait(
        client, project, git_repo, PRINT_TF_CONFIG, message, operator="tf", types=CHIEF_AND_TWO_WORKERS
    )
    assert experiment.status == Status.SUCCEEDED, experiment.failure_reason
    outputs = {name: logs.log_text(experiment.pk, f"process:{name}") for name in ("chief-0", "worker-0", "worker-1")}
    assert_tf_cluster({name: tf_config(output) for name, output in outputs.items()}, "127.0.0.1")
    # The legacy names of the TensorBoard path and the commit message.
    tensorboard = f"{settings.BUCKETS_ROOT}/{project.outputs_bucket}/output/{experiment.pk}/tensorboard/"
    assert f"LOGS={tensorboard}\n" in outputs["chief-0"]
    assert f"MSG={message}\n" in outputs["worker-1"]


@pytest.mark.docker
@pytest.mark.django_db(transaction=True)
def test_tf_config_on_the_docker_engine(client, docker_project, git_repo, docker_client, celery_worker_thread):
    experiment_id = push(client, docker_project, git_repo, PRINT_TF_CONFIG, operator="tf", types=CHIEF_AND_TWO_WORKERS)
    experiment = ended(experiment_id)
    assert experiment.status == Status.SUCCEEDED, experiment.failure_reason
    configs = {
        name: tf_config(logs.log_text(experiment.pk, f"process:{name}")) for name in ("chief-0", "worker-0", "worker-1")
    }
    # The containers share one network namespace: 127.0.0.1 is every process's loopback.
    assert_tf_cluster(configs, "127.0.0.1")
    output = logs.log_text(experiment.pk, "process:worker-0")
    assert f"LOGS=/mnt/aichor/outputs/output/{experiment.pk}/tensorboard/\n" in output
    assert "MSG=aichor[train.yaml]: docker run\n" in output
