"""A workload planned on a single host (the docker and local engines): each operator's
processes and the distribution variables its training code reads (SPEC §5)."""

import uuid

import pytest

from experiments.engines.docker import DockerEngine
from experiments.engines.local import LocalEngine
from experiments.engines.single_host import described, held_back, plan_processes, progress, ray_start_flags, to_start
from experiments.manifest import parse_manifest
from experiments.workload import Workload, groups_of
from tests.helpers import TEST_IMAGE


def workload(operator: str, types: str, version: str = "0.2.3", env: dict[str, str] | None = None) -> Workload:
    """The workload of a manifest, with `env` as what every process gets."""
    spec = parse_manifest(
        f"kind: AIchorManifest\napiVersion: {version}\nbuilder:\n  image: i\n  dockerfile: Dockerfile\n"
        f"spec:\n  operator: {operator}\n  image: i\n  command: python train.py\n  types:\n{types}"
    ).spec
    return Workload("e", "p", spec.operator, "i", spec.command, groups_of(spec), env or {}, [])


RES = "      resources:\n        cpus: 1\n        ramRatio: 2\n"


def env_of(processes) -> dict[str, dict]:
    return {p.name: p.env for p in processes}


def test_legacy_pytorch_master_is_rank_zero():
    types = f"    Master:\n      count: 1\n{RES}    Worker:\n      count: 2\n{RES}"
    procs = env_of(plan_processes(workload("pytorch", types, "0.2.2", env={"X": "1"}), host="10.0.0.1", ports=[29500]))
    assert list(procs) == ["master-0", "worker-0", "worker-1"]
    assert [procs[n]["RANK"] for n in procs] == ["0", "1", "2"]
    assert {procs[n]["WORLD_SIZE"] for n in procs} == {"3"}
    assert {procs[n]["MASTER_ADDR"] + ":" + procs[n]["MASTER_PORT"] for n in procs} == {"10.0.0.1:29500"}
    assert procs["worker-1"]["X"] == "1"


def test_xgboost_lists_worker_addresses_and_port():
    procs = env_of(plan_processes(workload("xgboost", f"    worker:\n      count: 3\n{RES}"), host="h", ports=[1, 2]))
    assert procs["worker-0"]["WORKER_PORT"] == "2"
    assert procs["worker-0"]["WORKER_ADDRS"] == "h,h"


def test_jax_coordinator_and_process_ids():
    procs = env_of(plan_processes(workload("jax", f"    worker:\n      count: 2\n{RES}"), host="h", ports=[1234]))
    assert procs["worker-1"]["JAXOPERATOR_COORDINATOR_ADDRESS"] == "h:1234"
    assert procs["worker-1"]["JAXOPERATOR_COORDINATOR_HOST"] == "h"
    assert procs["worker-1"]["JAXOPERATOR_NUM_PROCESSES"] == "2"
    assert [procs[n]["JAXOPERATOR_PROCESS_ID"] for n in procs] == ["0", "1"]


def test_jobset_indices_across_groups():
    types = f"    driver:\n      count: 1\n{RES}    workers:\n      count: 2\n      completions: 2\n{RES}"
    procs = env_of(plan_processes(workload("jobset", types), host="h", ports=[1]))
    assert list(procs) == ["driver-0-0", "workers-0-0", "workers-0-1", "workers-1-0", "workers-1-1"]
    assert {
        k: procs["workers-1-1"][k]
        for k in (
            "JOB_COMPLETION_INDEX",
            "JOB_INDEX",
            "JOB_GLOBAL_INDEX",
            "GLOBAL_REPLICAS",
            "REPLICATED_JOB_NAME",
            "REPLICATED_JOB_REPLICAS",
        )
    } == {
        "JOB_COMPLETION_INDEX": "1",
        "JOB_INDEX": "1",
        "JOB_GLOBAL_INDEX": "2",
        "GLOBAL_REPLICAS": "3",
        "REPLICATED_JOB_NAME": "workers",
        "REPLICATED_JOB_REPLICAS": "2",
    }


def test_kuberay_submitter_decides_and_sees_the_head():
    types = f"    Head:\n{RES}    Workers:\n      - name: small\n        count: 2\n{RES.replace('      ', '        ')}"
    processes = plan_processes(workload("kuberay", types), host="h", ports=[6379])
    by_name = {p.name: p for p in processes}
    assert sorted(by_name) == ["head", "small-0", "small-1", "submitter"]
    assert [p.name for p in processes if p.decisive] == ["submitter"]
    assert by_name["submitter"].env["RAY_ADDRESS"] == "h:6379"
    assert "'python train.py';" in by_name["submitter"].command  # the entrypoint, whole


def test_batch_is_one_process():
    processes = plan_processes(
        workload("batch", f"    main:\n      count: 1\n{RES}", env={"A": "b"}), host="h", ports=[1]
    )
    assert [(p.name, p.env) for p in processes] == [("main-0", {"A": "b"})]


KUBERAY = f"    Head:\n{RES}    Workers:\n      - name: small\n        count: 1\n{RES.replace('      ', '        ')}"


def submitted(engine, experiment_id: str):
    """A kuberay workload started on `engine` (the ray commands fail at once without Ray: only
    what the engine says of its processes matters here)."""
    plan = workload("kuberay", KUBERAY)
    ray = Workload(experiment_id, "p", plan.operator, TEST_IMAGE, "true", plan.groups, {}, [])
    return engine.submit(ray, log=lambda text: None)


def roles(engine, handle) -> list[tuple[str, str, bool]]:
    return [(p.name, p.role, p.decisive) for p in engine.processes(handle)]


EXPECTED_ROLES = [("head", "head", False), ("small-0", "ray-worker", False), ("submitter", "submitter", True)]


def test_local_engine_names_roles_and_the_decisive_process_also_when_found_again(tmp_path):
    engine = LocalEngine({"root": str(tmp_path)})
    handle = submitted(engine, "roles-local")
    try:
        assert roles(engine, handle) == EXPECTED_ROLES
        # A restarted worker finds the processes again with what they are.
        assert roles(engine, engine.find("roles-local")) == EXPECTED_ROLES
        assert {p.target for p in engine.processes(handle)} == {str(pid) for pid in handle["pids"].values()}
    finally:
        engine.cancel(handle)
        engine.cleanup(handle)


@pytest.mark.docker
def test_docker_engine_names_roles_and_the_decisive_process_also_when_found_again(docker_client):
    engine = DockerEngine({"network": "none"})
    experiment_id = f"roles-{uuid.uuid4().hex[:8]}"
    handle = submitted(engine, experiment_id)
    try:
        assert roles(engine, handle) == EXPECTED_ROLES
        assert sorted(roles(engine, engine.find(experiment_id))) == EXPECTED_ROLES
        for process in engine.processes(handle):
            container = docker_client.containers.get(process.target)
            assert container.labels["aichor.process"] == process.name
    finally:
        engine.cleanup_experiment(experiment_id)


def test_ray_start_params_become_flags_as_kuberay_writes_them():
    assert ray_start_flags({"num-cpus": "0", "block": "true", "include-dashboard": "false", "x": "False"}) == [
        "--num-cpus=0",
        "--block",
        "--include-dashboard=false",
    ]


def test_kuberay_head_and_workers_join_one_cluster_and_the_submitter_submits_a_job():
    types = (
        f"    Head:\n{RES}      rayStartParams:\n        num-cpus: '0'\n"
        f"    Workers:\n      - name: small\n        count: 2\n{RES.replace('      ', '        ')}"
    )
    plan = workload("kuberay", types)
    ports = [6379, 8265, 10001, 52365, 52366, 52367]
    by_name = {p.name: p.command for p in plan_processes(plan, host="h", ports=ports)}
    assert by_name["head"].startswith("ray start --head --block --port=6379 ")
    assert "--num-cpus=0" in by_name["head"] and "--dashboard-port=8265" in by_name["head"]
    # Every node of the shared network namespace has a dashboard agent port of its own.
    agents = {
        name: command.split("--dashboard-agent-listen-port=")[1].split()[0]
        for name, command in by_name.items()
        if name != "submitter"
    }
    assert agents == {"head": "52365", "small-0": "52366", "small-1": "52367"}
    assert by_name["small-0"].startswith("ray start --address=h:6379 --block")
    submitter = by_name["submitter"]
    assert " -c " in submitter and submitter.count("'python train.py'") == 1
    assert submitter.endswith(
        "ray job submit --address=http://h:8265 -- python train.py"
    )  # an image without Python's `ray`


def test_docker_ray_nodes_of_one_namespace_get_worker_ports_and_addresses_of_their_own():
    # The nodes share the experiment's network namespace: two raylets handing out the same
    # worker port would kill one worker at bind, and a driver finds its own node by address.
    # The head's rayStartParams still win.
    types = (
        f"    Head:\n{RES}      rayStartParams:\n        num-cpus: '0'\n        max-worker-port: '13000'\n"
        f"    Workers:\n      - name: small\n        count: 2\n{RES.replace('      ', '        ')}"
    )
    plan = workload("kuberay", types)
    engine = DockerEngine({"network": "none"})
    commands = {
        p.name: p.command
        for p in plan_processes(
            plan, host="h", ports=engine.ports(plan), ray_node=lambda n: engine.ray_node_options(plan, n)
        )
    }

    def flag(name: str, key: str) -> int:
        return int(commands[name].split(f"--{key}=")[1].split()[0].strip("'"))

    ranges = [(flag(n, "min-worker-port"), flag(n, "max-worker-port")) for n in ("small-0", "small-1")]
    assert ranges == [(13334, 16665), (16666, 19997)]  # 3 332 ports a node, none shared
    assert flag("head", "min-worker-port") == 10002
    assert commands["head"].count("--max-worker-port=") == 1 and flag("head", "max-worker-port") == 13000
    nodes = ("head", "small-0", "small-1")
    addresses = [commands[name].split("--node-ip-address=")[1].split()[0].strip("'") for name in nodes]
    assert addresses == ["127.0.0.1", "127.0.0.2", "127.0.0.3"]
    assert all(commands[name].count("--node-ip-address=") == 1 for name in nodes)
    on_host = DockerEngine({"network": "host"})
    host_commands = [
        p.command
        for p in plan_processes(
            plan, host="h", ports=[6379, 8265, 10001], ray_node=lambda n: on_host.ray_node_options(plan, n)
        )
    ]
    assert [c.split("--node-ip-address=")[1].split()[0] for c in host_commands[:3]] == [
        "127.0.0.1",
        "127.0.0.2",
        "127.0.0.3",
    ], "the host's network is one namespace too"
    assert "min-worker-port" not in " ".join(
        p.command for p in plan_processes(plan, host="h", ports=[6379, 8265, 10001, 52365, 52366, 52367])
    ), "no slicing where nodes do not share a namespace (the default hook)"


def test_parallelisms_hold_completions_in_queues_per_job():
    types = f"    workers:\n      count: 2\n      completions: 5\n      parallelisms: 2\n{RES}"
    processes = plan_processes(workload("jobset", types), host="h", ports=[1])
    handle = described(processes)
    assert handle["queues"]["workers-1"] == {
        "parallelism": 2,
        "processes": [f"workers-1-{i}" for i in range(5)],
    }
    assert [p.name for p in processes if held_back(p, processes)] == [
        f"workers-{job}-{i}" for job in range(2) for i in range(2, 5)
    ]
    phases = {p.name: "pending" for p in processes}
    phases |= {"workers-0-0": "exited", "workers-0-1": "running", "workers-1-0": "running", "workers-1-1": "running"}
    assert to_start(handle, phases) == ["workers-0-2"]
    assert progress(handle, phases) == "completed 1/10"


def test_completions_run_all_at_once_when_parallelisms_allows():
    types = f"    workers:\n      count: 1\n      completions: 3\n      parallelisms: 3\n{RES}"
    assert "queues" not in described(plan_processes(workload("jobset", types), host="h", ports=[1]))
