"""What the docker and local engines share: every process of a workload on one host. The
workload's groups become numbered processes reaching each other on 127.0.0.1 through free
ports, with the distribution variables each operator's training code expects (SPEC §5), and
the bucket volumes become folders under BUCKETS_ROOT."""

import shlex
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from django.conf import settings

from experiments.engines.base import Engine, EngineError, ProcessInfo, never
from experiments.manifest.types import Resources
from experiments.workload import Group, Volume, Workload

HOST = "127.0.0.1"
BUCKET_KINDS = ("inputs", "outputs")


@dataclass
class ProcessSpec:
    name: str  # unique within the experiment: "worker-0", "master-0", "head", "submitter"
    command: str
    env: dict[str, str]
    resources: Resources = field(default_factory=Resources)
    # Only decisive processes' exit codes decide the outcome (a Ray head is not decisive).
    decisive: bool = True
    role: str = ""


@dataclass
class Mount:
    source: str  # host path
    target: str  # path inside the process
    read_only: bool = False


def free_ports(count: int) -> list[int]:
    sockets = []
    for _ in range(count):
        s = socket.socket()
        s.bind((HOST, 0))
        sockets.append(s)
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def ports_needed(workload: Workload) -> int:
    return 2 if workload.operator == "xgboost" else 1


def bucket_dir(volume: Volume) -> Path:
    return Path(settings.BUCKETS_ROOT) / volume.name


def bucket_dirs(workload: Workload) -> None:
    """The bucket folders exist before a process reads or writes them."""
    from datasets.services import InvalidKey, StorageError, create_folder

    for volume in workload.volumes:
        if volume.kind == "outputs":
            try:
                # Not mkdir -p: an earlier workload may have left `output` as a link to anywhere on the host.
                create_folder(volume.name, "output/", workload.experiment_id)
            except (InvalidKey, StorageError) as exc:
                raise EngineError(
                    f"cannot create output/{workload.experiment_id}/ in the outputs bucket: {exc}"
                ) from None
        elif volume.kind == "inputs":
            bucket_dir(volume).mkdir(parents=True, exist_ok=True)


def _first(workload: Workload, *names: str) -> Group | None:
    return next((g for name in names for g in workload.groups if g.name == name and g.role != "ray-worker"), None)


def plan_processes(workload: Workload, *, host: str, ports: list[int]) -> list[ProcessSpec]:
    """`host` is the address processes use to reach each other; `ports` are free ports for
    coordinators."""
    operator, command, env = workload.operator, workload.command, workload.env

    def proc(name: str, extra: dict, group: Group, cmd: str = command) -> ProcessSpec:
        return ProcessSpec(name, cmd, {**env, **extra}, group.resources, group.decisive, group.role)

    if operator in ("pytorch", "xgboost"):
        ranks: list[tuple[str, Group]] = []
        for prefix, group in (("master", _first(workload, "Master")), ("worker", _first(workload, "worker", "Worker"))):
            if group:
                ranks += [(f"{prefix}-{i}", group) for i in range(group.replicas)]
        common = {"MASTER_ADDR": host, "MASTER_PORT": str(ports[0]), "WORLD_SIZE": str(len(ranks))}
        if operator == "xgboost":
            common["WORKER_PORT"] = str(ports[1])
            common["WORKER_ADDRS"] = ",".join(host for _ in ranks[1:])
        return [proc(name, {**common, "RANK": str(rank)}, group) for rank, (name, group) in enumerate(ranks)]

    if operator == "jax":
        worker = _first(workload, "worker", "Worker")
        common = {
            "JAXOPERATOR_COORDINATOR_ADDRESS": f"{host}:{ports[0]}",
            "JAXOPERATOR_COORDINATOR_HOST": host,
            "JAXOPERATOR_NUM_PROCESSES": str(worker.replicas),
        }
        return [
            proc(f"worker-{i}", {**common, "JAXOPERATOR_PROCESS_ID": str(i)}, worker) for i in range(worker.replicas)
        ]

    if operator == "jobset":
        total = sum(group.replicas for group in workload.groups)
        processes, global_index = [], 0
        for group in workload.groups:
            for job_index in range(group.replicas):
                for completion in range(group.completions):
                    extra = {
                        "JOB_COMPLETION_INDEX": str(completion),
                        "JOB_INDEX": str(job_index),
                        "JOB_GLOBAL_INDEX": str(global_index),
                        "GLOBAL_REPLICAS": str(total),
                        "REPLICATED_JOB_NAME": group.name,
                        "REPLICATED_JOB_REPLICAS": str(group.replicas),
                    }
                    processes.append(proc(f"{group.name}-{job_index}-{completion}", extra, group))
                global_index += 1
        return processes

    if operator == "kuberay":
        head = next(g for g in workload.groups if g.role == "head")
        # Quoted whole: a key is manifest text too, and must stay one flag of `ray start`.
        params = " ".join(shlex.quote(f"--{k}={v}") for k, v in head.ray_start_params.items())
        address = f"{host}:{ports[0]}"
        ray = {"RAY_ADDRESS": address}
        processes = [proc("head", ray, head, f"ray start --head --port={ports[0]} --block {params}")]
        for pool in (g for g in workload.groups if g.role == "ray-worker"):
            for i in range(pool.replicas):
                processes.append(proc(f"{pool.name}-{i}", ray, pool, f"ray start --address={address} --block"))
        # The submitter waits for the head, then runs the user's command as the Ray driver.
        submitter = next(g for g in workload.groups if g.role == "submitter")
        wait = f"until ray status --address={address} >/dev/null 2>&1; do sleep 1; done; "
        processes.append(proc("submitter", ray, submitter, wait + command))
        return processes

    # batch (and legacy tf): a single process.
    only = workload.groups[0]
    return [proc(f"{only.name.lower()}-0", {}, only)]


def described(processes: list[ProcessSpec]) -> dict:
    """What a handle keeps of the plan, for `processes()` to tell roles and decisive ones."""
    return {"roles": {p.name: p.role for p in processes}, "decisive": [p.name for p in processes if p.decisive]}


class SingleHostEngine(Engine):
    """Plans a workload on this host and hands the processes to the subclass's `start`. Its
    handles name each process's role, and which processes are decisive, for `processes()`."""

    # The handle's key of {process name: what runs it} (container ids, pids).
    targets_key = ""

    def submit(self, workload: Workload, *, log: Callable[[str], None], cancelled: Callable[[], bool] = never) -> dict:
        bucket_dirs(workload)
        processes = plan_processes(workload, host=HOST, ports=free_ports(ports_needed(workload)))
        log(f"{len(processes)} process(es) on this host\n")
        return self.start(workload, processes, self.mounts(workload), log=log, cancelled=cancelled)

    def mounts(self, workload: Workload) -> list[Mount]:
        # A single host has no claims to mount: the shared volume and PVCs are Kubernetes'.
        return [
            Mount(str(bucket_dir(v)), v.mount_point, v.read_only) for v in workload.volumes if v.kind in BUCKET_KINDS
        ]

    def start(
        self,
        workload: Workload,
        processes: list[ProcessSpec],
        mounts: list[Mount],
        *,
        log: Callable[[str], None],
        cancelled: Callable[[], bool],
    ) -> dict:
        """Start `processes`; the handle includes `described(processes)`."""
        raise NotImplementedError

    def processes(self, handle: dict) -> list[ProcessInfo]:
        roles = handle.get("roles") or {}
        # Handles older than roles knew no decisive list: every process decided then.
        decisive = handle.get("decisive")
        return [
            ProcessInfo(name, roles.get(name, ""), decisive is None or name in decisive, str(target))
            for name, target in (handle.get(self.targets_key) or {}).items()
        ]
