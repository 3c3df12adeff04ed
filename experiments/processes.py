"""From a validated manifest to the set of processes an engine starts, with the distribution
variables each operator's training code expects (SPEC §5)."""

import shlex

from experiments.engines.base import ProcessSpec

DISTRIBUTION_VARS = {
    "MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "WORKER_PORT", "WORKER_ADDRS",
    "JAXOPERATOR_COORDINATOR_ADDRESS", "JAXOPERATOR_COORDINATOR_HOST", "JAXOPERATOR_NUM_PROCESSES",
    "JAXOPERATOR_PROCESS_ID", "JOB_COMPLETION_INDEX", "JOB_INDEX", "JOB_GLOBAL_INDEX", "GLOBAL_REPLICAS",
    "REPLICATED_JOB_NAME", "REPLICATED_JOB_REPLICAS", "RAY_ADDRESS",
}  # fmt: skip


def _first(types: dict, *names: str) -> tuple[str, dict] | None:
    for name in names:
        if name in types:
            return name, types[name]
    return None


def plan_processes(manifest: dict, env: dict[str, str], *, host: str, ports: list[int]) -> list[ProcessSpec]:
    """`host` is the address processes use to reach each other (one host: 127.0.0.1);
    `ports` are free ports for coordinators."""
    spec = manifest["spec"]
    operator, types, command = spec["operator"], spec["types"], spec["command"]

    def proc(name: str, extra: dict, resources: dict, decisive: bool = True, cmd: str = command) -> ProcessSpec:
        return ProcessSpec(name=name, command=cmd, env={**env, **extra}, resources=resources, decisive=decisive)

    if operator in ("pytorch", "xgboost"):
        master = _first(types, "Master")
        worker = _first(types, "worker", "Worker")
        ranks: list[tuple[str, dict]] = []
        if master:
            ranks += [(f"master-{i}", master[1]["resources"]) for i in range(master[1]["count"])]
        if worker:
            ranks += [(f"worker-{i}", worker[1]["resources"]) for i in range(worker[1]["count"])]
        common = {"MASTER_ADDR": host, "MASTER_PORT": str(ports[0]), "WORLD_SIZE": str(len(ranks))}
        if operator == "xgboost":
            common["WORKER_PORT"] = str(ports[1])
            common["WORKER_ADDRS"] = ",".join(host for _ in ranks[1:])
        return [proc(name, {**common, "RANK": str(rank)}, res) for rank, (name, res) in enumerate(ranks)]

    if operator == "jax":
        _, worker = _first(types, "worker", "Worker")
        n = worker["count"]
        common = {
            "JAXOPERATOR_COORDINATOR_ADDRESS": f"{host}:{ports[0]}",
            "JAXOPERATOR_COORDINATOR_HOST": host,
            "JAXOPERATOR_NUM_PROCESSES": str(n),
        }
        return [
            proc(f"worker-{i}", {**common, "JAXOPERATOR_PROCESS_ID": str(i)}, worker["resources"]) for i in range(n)
        ]

    if operator == "jobset":
        total = sum(group["count"] for group in types.values())
        processes, global_index = [], 0
        for group_name, group in types.items():
            for job_index in range(group["count"]):
                for completion in range(group["completions"]):
                    extra = {
                        "JOB_COMPLETION_INDEX": str(completion),
                        "JOB_INDEX": str(job_index),
                        "JOB_GLOBAL_INDEX": str(global_index),
                        "GLOBAL_REPLICAS": str(total),
                        "REPLICATED_JOB_NAME": group_name,
                        "REPLICATED_JOB_REPLICAS": str(group["count"]),
                    }
                    processes.append(proc(f"{group_name}-{job_index}-{completion}", extra, group["resources"]))
                global_index += 1
        return processes

    if operator == "kuberay":
        head = types["Head"]
        params = " ".join(f"--{k}={shlex.quote(str(v))}" for k, v in (head.get("rayStartParams") or {}).items())
        address = f"{host}:{ports[0]}"
        ray = {"RAY_ADDRESS": address}
        processes = [
            proc("head", ray, head["resources"], False, f"ray start --head --port={ports[0]} --block {params}")
        ]
        for pool in spec.get("workers") or []:
            for i in range(pool["count"]):
                start = f"ray start --address={address} --block"
                processes.append(proc(f"{pool['name']}-{i}", ray, pool["resources"], False, start))
        # The submitter waits for the head, then runs the user's command as the Ray driver.
        wait = f"until ray status --address={address} >/dev/null 2>&1; do sleep 1; done; "
        processes.append(proc("submitter", ray, head["resources"], True, wait + command))
        return processes

    # batch: a single process.
    name, only = next(iter(types.items()))
    return [proc(f"{name.lower()}-0", {}, only["resources"])]


def ports_needed(manifest: dict) -> int:
    return 2 if manifest["spec"]["operator"] == "xgboost" else 1
