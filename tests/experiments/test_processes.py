"""Each operator's processes and the distribution variables its training code reads (SPEC §5)."""

from experiments.manifest import parse_manifest
from experiments.processes import plan_processes


def manifest(operator: str, types: str, version: str = "0.2.3") -> dict:
    return parse_manifest(
        f"kind: AIchorManifest\napiVersion: {version}\nbuilder:\n  image: i\n  dockerfile: Dockerfile\n"
        f"spec:\n  operator: {operator}\n  image: i\n  command: python train.py\n  types:\n{types}"
    )


RES = "      resources:\n        cpus: 1\n        ramRatio: 2\n"


def env_of(processes) -> dict[str, dict]:
    return {p.name: p.env for p in processes}


def test_legacy_pytorch_master_is_rank_zero():
    types = f"    Master:\n      count: 1\n{RES}    Worker:\n      count: 2\n{RES}"
    procs = env_of(plan_processes(manifest("pytorch", types, "0.2.2"), {"X": "1"}, host="10.0.0.1", ports=[29500]))
    assert list(procs) == ["master-0", "worker-0", "worker-1"]
    assert [procs[n]["RANK"] for n in procs] == ["0", "1", "2"]
    assert {procs[n]["WORLD_SIZE"] for n in procs} == {"3"}
    assert {procs[n]["MASTER_ADDR"] + ":" + procs[n]["MASTER_PORT"] for n in procs} == {"10.0.0.1:29500"}
    assert procs["worker-1"]["X"] == "1"


def test_xgboost_lists_worker_addresses_and_port():
    procs = env_of(
        plan_processes(manifest("xgboost", f"    worker:\n      count: 3\n{RES}"), {}, host="h", ports=[1, 2])
    )
    assert procs["worker-0"]["WORKER_PORT"] == "2"
    assert procs["worker-0"]["WORKER_ADDRS"] == "h,h"


def test_jax_coordinator_and_process_ids():
    procs = env_of(plan_processes(manifest("jax", f"    worker:\n      count: 2\n{RES}"), {}, host="h", ports=[1234]))
    assert procs["worker-1"]["JAXOPERATOR_COORDINATOR_ADDRESS"] == "h:1234"
    assert procs["worker-1"]["JAXOPERATOR_COORDINATOR_HOST"] == "h"
    assert procs["worker-1"]["JAXOPERATOR_NUM_PROCESSES"] == "2"
    assert [procs[n]["JAXOPERATOR_PROCESS_ID"] for n in procs] == ["0", "1"]


def test_jobset_indices_across_groups():
    types = f"    driver:\n      count: 1\n{RES}    workers:\n      count: 2\n      completions: 2\n{RES}"
    procs = env_of(plan_processes(manifest("jobset", types), {}, host="h", ports=[1]))
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
    processes = plan_processes(manifest("kuberay", types), {}, host="h", ports=[6379])
    by_name = {p.name: p for p in processes}
    assert sorted(by_name) == ["head", "small-0", "small-1", "submitter"]
    assert [p.name for p in processes if p.decisive] == ["submitter"]
    assert by_name["submitter"].env["RAY_ADDRESS"] == "h:6379"
    assert by_name["submitter"].command.endswith("python train.py")


def test_batch_is_one_process():
    processes = plan_processes(manifest("batch", f"    main:\n      count: 1\n{RES}"), {"A": "b"}, host="h", ports=[1])
    assert [(p.name, p.env) for p in processes] == [("main-0", {"A": "b"})]
