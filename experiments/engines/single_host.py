"""What the docker and local engines share: every process of a workload on one host. The
workload's groups become numbered processes reaching each other on 127.0.0.1 through free
ports, with the distribution variables each operator's training code expects (SPEC §5), and
the bucket volumes become folders under BUCKETS_ROOT."""

import ipaddress
import json
import shlex
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from django.conf import settings

from experiments.engines.base import Engine, EngineError, ProcessInfo, ProcessState, never
from experiments.engines.k8s_objects import object_name
from experiments.manifest.parse import TF_TYPES
from experiments.manifest.types import Resources
from experiments.workload import Group, Volume, Workload

HOST = "127.0.0.1"
RAY_SUBMITTER = Path(__file__).with_name("ray_submitter.py").read_text()
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
    # A jobset job's completions run `parallelism` at a time: the processes of one `queue`
    # (the job), in completion order, start as earlier ones end.
    queue: str = ""
    parallelism: int = 0


@dataclass
class Mount:
    source: str  # host path, or the volume's name
    target: str  # path inside the process
    read_only: bool = False
    kind: str = "bind"  # or "volume": an engine volume made for the experiment


# Where a process finds the experiment's shared volume (spec.storage.sharedVolume) whatever the
# engine: its mountPoint in a container, a scratch folder on the local engine.
SHARED_VOLUME_VAR = "AICHOR_SHARED_VOLUME_PATH"
# What the manifest may ask that no single host provides (yet), for the step log.
UNSERVED = {
    "tensorboard": "tensorboard.enabled: TensorBoard is not served for {kind} engines yet: ignored",
    "jupyter": "debug.jupyter: the {kind} engine starts no Jupyter server: ignored",
    "vscode": "debug.vscode: the {kind} engine starts no VS Code server: ignored",
}


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
    if workload.operator == "tf":
        return sum(group.replicas for group in workload.groups)  # TF_CONFIG lists one per process
    if workload.operator == "kuberay":
        # GCS, dashboard (the job server), client server, then a dashboard agent port per Ray node:
        # every node of the cluster shares one network namespace, and the agent's default port
        # (52365) can be taken only once there.
        return 3 + sum(g.replicas for g in workload.groups if g.role in ("head", "ray-worker"))
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


def shared_volume(workload: Workload) -> Volume | None:
    return next((v for v in workload.volumes if v.kind == "shared"), None)


def _first(workload: Workload, *names: str) -> Group | None:
    return next((g for name in names for g in workload.groups if g.name == name and g.role != "ray-worker"), None)


def plan_processes(
    workload: Workload, *, host: str, ports: list[int], ray_node: Callable[[int], dict] | None = None
) -> list[ProcessSpec]:
    """`host` is the address processes use to reach each other; `ports` are free ports for
    coordinators; `ray_node(n)` the engine's own `ray start` options of the n-th Ray node."""
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
        # The name the JobSet has on Kubernetes, so code that logs or keys on it sees the same.
        jobset_name = object_name(workload.experiment_id)
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
                        "JOBSET_NAME": jobset_name,
                    }
                    process = proc(f"{group.name}-{job_index}-{completion}", extra, group)
                    if group.parallelism < group.completions:
                        process.queue, process.parallelism = f"{group.name}-{job_index}", group.parallelism
                    processes.append(process)
                global_index += 1
        return processes

    if operator == "kuberay":
        return _ray_processes(workload, host, ports, proc, ray_node or (lambda node: {}))

    if operator == "tf":
        return _tf_processes(workload, host, ports, proc)

    # batch: a single process.
    only = workload.groups[0]
    return [proc(f"{only.name.lower()}-0", {}, only)]


# KubeRay's ports: GCS, dashboard and job server, client server, then the dashboard agent's.
RAY_PORTS = (6379, 8265, 10001, 52365)
# `ray start`'s default --min-worker-port and --max-worker-port.
RAY_WORKER_PORTS = (10002, 19999)


def loopback_address(node: int) -> str:
    """The n-th Ray node's own loopback address: 127.0.0.1 for the head, then 127.0.0.2... (a
    Linux loopback answers all of 127/8). Nodes sharing one network namespace must not share an
    address: a driver finds its own node by address, and one that found another node sent its
    tasks' leases to that node's raylet, whose stale view of the placement group's bundles kept a
    task pending for good (the KubeRay test's occasional hang, seen in Ray 2.23)."""
    return str(ipaddress.IPv4Address(HOST) + node)


def ray_node_count(workload: Workload) -> int:
    """The head and every worker replica: the `ray start` nodes of a KubeRay workload."""
    return 1 + sum(g.replicas for g in workload.groups if g.role == "ray-worker")


def _ray_port(params: dict[str, str], key: str, default: int) -> int:
    """A port the head's rayStartParams may set: a number, or a clear refusal in the step log."""
    value = params.get(key)
    if not value:
        return default
    try:
        port = int(value)
    except ValueError:
        port = 0
    if not 0 < port < 65536:
        raise EngineError(f"spec.types.Head.rayStartParams.{key}: {value!r} is not a port number")
    return port


def ray_start_flags(params: dict[str, str]) -> list[str]:
    """`rayStartParams` as KubeRay turns them into `ray start` flags: "true" is a bare flag,
    "false" leaves it out (but for the options that take true/false as a value)."""
    flags = []
    for key, value in params.items():
        value = str(value)
        if value.lower() in ("true", "false") and key not in ("log-color", "include-dashboard"):
            if value.lower() == "true":
                flags.append(f"--{key}")
        else:
            flags.append(f"--{key}={value}")
    # Quoted whole: a key is manifest text too, and must stay one flag of `ray start`.
    return [shlex.quote(flag) for flag in flags]


def _ray_processes(
    workload: Workload, host: str, ports: list[int], proc: Callable[..., ProcessSpec], ray_node: Callable[[int], dict]
) -> list[ProcessSpec]:
    """A Ray cluster as KubeRay makes it: the head (`ray start --head` with its rayStartParams),
    the worker pools joining it, and a submitter that runs `spec.command` as a Ray job through
    the head's job server (`ray job submit`, KubeRay's K8sJobMode). The driver thus runs on the
    head, beside a local raylet: a separate container has no Ray session of its own to attach
    the driver to."""
    head = next(g for g in workload.groups if g.role == "head")
    # Kubernetes plans only the names, with one placeholder port.
    gcs, dashboard, client, *agents = [*ports, *[0] * ports_needed(workload)]
    gcs = _ray_port(head.ray_start_params, "port", gcs or 6379)
    dashboard = _ray_port(head.ray_start_params, "dashboard-port", dashboard or 8265)
    address = f"{host}:{gcs}"
    # RAY_SERVER: the name older AIchor code passes to ray.init(address=...).
    ray = {"RAY_ADDRESS": address, "RAY_SERVER": address}
    agent = iter(agents)
    nodes = iter(range(ray_node_count(workload)))

    def start(group: Group, first: str, ours: dict[str, object]) -> str:
        port = next(agent, 0)
        if port:
            ours["dashboard-agent-listen-port"] = port
        ours |= ray_node(next(nodes))
        ours = {k: v for k, v in ours.items() if v and k not in group.ray_start_params}
        # Quoted too: the engine's own values hold host paths (the local Ray folder under $TMPDIR).
        flags = [*(shlex.quote(f"--{k}={v}") for k, v in ours.items()), *ray_start_flags(group.ray_start_params)]
        # --block keeps `ray start` in the foreground: the process lives as long as the node.
        block = [] if "block" in group.ray_start_params else ["--block"]
        return " ".join(["ray start", first, *block, *flags])

    processes = [
        proc(
            "head",
            ray,
            head,
            start(
                head,
                "--head",
                {
                    "port": gcs,
                    "node-ip-address": host,
                    # Only the experiment's own processes submit jobs (rayStartParams may widen it).
                    "dashboard-host": host,
                    "dashboard-port": dashboard,
                    "ray-client-server-port": client,
                },
            ),
        )
    ]
    for pool in (g for g in workload.groups if g.role == "ray-worker"):
        for i in range(pool.replicas):
            command = start(pool, f"--address={address}", {"node-ip-address": host})
            processes.append(proc(f"{pool.name}-{i}", ray, pool, command))
    submitter = next(g for g in workload.groups if g.role == "submitter")
    jobs = f"http://{host}:{dashboard}"
    # The job's entrypoint is `spec.command` whole (SPEC §9), run by the shell of the head's job
    # supervisor in the working directory `ray start` was given there (the image's, or the
    # code's locally): `a.py; echo done` runs both in the job. The submitter is run by the Python
    # `ray` runs on (its first line); an image whose `ray` is no Python script gets `ray job
    # submit` itself, as KubeRay's submitter runs it (its shell splits the command into words,
    # Ray joins them again), with Ray's follower, which can miss the job's last lines.
    submit = (
        f"until ray job list --address={jobs} >/dev/null 2>&1; do sleep 1; done; "
        "python=$(sed -n '1s/^#!//p' \"$(command -v ray)\"); "
        f'case "$python" in *python*) exec $python -c {shlex.quote(RAY_SUBMITTER)} {shlex.quote(workload.command)};; esac; '
        f"exec ray job submit --address={jobs} -- {workload.command}"
    )
    processes.append(proc("submitter", {**ray, "RAY_DASHBOARD_ADDRESS": jobs}, submitter, submit))
    return processes


def _tf_processes(
    workload: Workload, host: str, ports: list[int], proc: Callable[[str, dict, Group], ProcessSpec]
) -> list[ProcessSpec]:
    """TFJob's processes (`chief-0`, `worker-<i>`, `ps-<i>`), each with the TF_CONFIG the
    training operator gives it: every process's address by type, and its own type and index.
    Like the operator, a single process gets none (TensorFlow then trains locally)."""
    groups = [
        (name.lower(), group) for name in TF_TYPES for group in workload.groups if group.name == name and group.replicas
    ]
    # Kubernetes plans only the names, with fewer placeholder ports than processes.
    port = iter([*ports, *[0] * sum(group.replicas for _, group in groups)])
    cluster = {kind: [f"{host}:{next(port)}" for _ in range(group.replicas)] for kind, group in groups}
    distributed = sum(len(addresses) for addresses in cluster.values()) > 1
    processes = []
    for kind, group in groups:
        for i in range(group.replicas):
            task = {"cluster": cluster, "task": {"type": kind, "index": i}, "environment": "cloud"}
            processes.append(proc(f"{kind}-{i}", {"TF_CONFIG": json.dumps(task)} if distributed else {}, group))
    return processes


def described(processes: list[ProcessSpec]) -> dict:
    """What a handle keeps of the plan, for `processes()` to tell roles and decisive ones, and
    the queues of completions held back to their job's parallelism."""
    handle = {"roles": {p.name: p.role for p in processes}, "decisive": [p.name for p in processes if p.decisive]}
    queues: dict[str, dict] = {}
    for p in processes:
        if p.queue:
            queues.setdefault(p.queue, {"parallelism": p.parallelism, "processes": []})["processes"].append(p.name)
    if queues:
        handle["queues"] = queues
    return handle


def held_back(process: ProcessSpec, processes: list[ProcessSpec]) -> bool:
    """Whether `process` waits for earlier completions of its job when the workload starts."""
    if not process.queue:
        return False
    queue = [p.name for p in processes if p.queue == process.queue]
    return queue.index(process.name) >= process.parallelism


def to_start(handle: dict, phases: dict[str, str]) -> list[str]:
    """The held-back completions that may start now: in each queue, the first pending ones,
    as many as the parallelism leaves room for beside the running ones."""
    names = []
    for queue in (handle.get("queues") or {}).values():
        running = sum(phases.get(name) == "running" for name in queue["processes"])
        pending = [name for name in queue["processes"] if phases.get(name) == "pending"]
        names += pending[: max(0, queue["parallelism"] - running)]
    return names


def tell_progress(handle: dict, states: list[ProcessState]) -> None:
    """The next waiting completion of each job says why it waits and how far the jobs are: the
    watcher writes a pending process's reason to the Running step log when it changes."""
    phases = {s.name: s.phase for s in states}
    done = progress(handle, phases)
    nexts = {next((n for n in q["processes"] if phases.get(n) == "pending"), None) for q in handle["queues"].values()}
    for state in states:
        if state.name in nexts:
            state.reason = f"next of its job once a running completion ends ({done})"


def progress(handle: dict, phases: dict[str, str]) -> str:
    """`completed 37/100` over the held-back queues, or "" without any."""
    queued = [name for queue in (handle.get("queues") or {}).values() for name in queue["processes"]]
    if not queued:
        return ""
    return f"completed {sum(phases.get(name) == 'exited' for name in queued)}/{len(queued)}"


class SingleHostEngine(Engine):
    """Plans a workload on this host and hands the processes to the subclass's `start`. Its
    handles name each process's role, and which processes are decisive, for `processes()`."""

    # The handle's key of {process name: what runs it} (container ids, pids).
    targets_key = ""
    # Set by the caller of submit when no earlier attempt of it can have started anything (its
    # step just began): start() may then skip looking for the twins a retried submit removes.
    first_attempt = False
    # Completions held back to `parallelisms` are planned up front (a created container, a
    # written plan) but run only as earlier ones end: only the running ones count against the
    # process limit; holds_back_completions stays False for check_started's bound on the plans.

    def warnings_for(self, workload: Workload) -> list[str]:
        warnings = [UNSERVED[name].format(kind=self.kind) for name in sorted(workload.features) if name in UNSERVED]
        for volume in workload.volumes:
            if volume.kind == "pvc":
                warnings.append(
                    f"attachExistingPVCs: {volume.name} is a Kubernetes claim, not mounted on {self.kind} engines"
                )
        return warnings

    def submit(self, workload: Workload, *, log: Callable[[str], None], cancelled: Callable[[], bool] = never) -> dict:
        bucket_dirs(workload)
        processes = plan_processes(
            workload, host=HOST, ports=self.ports(workload), ray_node=lambda node: self.ray_node_options(workload, node)
        )
        shared = shared_volume(workload)
        if shared:
            for process in processes:
                process.env[SHARED_VOLUME_VAR] = self.shared_path(workload, shared)
        log(f"{len(processes)} process(es) on this host\n")
        return self.start(workload, processes, self.mounts(workload), log=log, cancelled=cancelled)

    def ports(self, workload: Workload) -> list[int]:
        """The coordinators' ports (see plan_processes): free ones of this host by default."""
        return free_ports(ports_needed(workload))

    def ray_node_options(self, workload: Workload, node: int) -> dict[str, str]:
        """`ray start` options this engine gives the n-th Ray node (0: the head), unless its
        rayStartParams set them."""
        return {}

    def shared_path(self, workload: Workload, volume: Volume) -> str:
        """Where the processes of `workload` find its shared volume."""
        return volume.mount_point

    def mounts(self, workload: Workload) -> list[Mount]:
        # A single host has no claims to mount: PVCs are Kubernetes'.
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

    def progress(self, handle: dict, states: list[ProcessState]) -> str:
        return progress(handle, {s.name: s.phase for s in states})

    def processes(self, handle: dict) -> list[ProcessInfo]:
        roles = handle.get("roles") or {}
        # Handles older than roles knew no decisive list: every process decided then.
        decisive = handle.get("decisive")
        return [
            ProcessInfo(name, roles.get(name, ""), decisive is None or name in decisive, str(target))
            for name, target in (handle.get(self.targets_key) or {}).items()
        ]
