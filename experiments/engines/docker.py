"""Docker engine: every process of an experiment is one container on a single Docker host,
labelled with the experiment id so it can always be found again (reconcile, cancel).

Networking is a Kubernetes pod's: one small "netns" container per experiment (from the
experiment's own image, which the host always has) holds a network namespace on the engine's
Docker network (`network`, default `bridge`; `host` only when an organisation admin sets it),
and every process container joins it (`container:<netns>`). So the processes reach each other on
127.0.0.1, one exiting early does not take the namespace away, and port-forward reaches a port
there through the Docker API (an exec in the netns container), on a remote DOCKER_HOST too.
A single-process experiment needs no holder: its one container owns the namespace."""

import concurrent.futures
import hashlib
import json
import os
import re
import select
import socket
import threading
import time
from collections import deque
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import docker
import requests
import urllib3
from docker.errors import APIError, DockerException, ImageNotFound, NotFound
from docker.types import DeviceRequest
from docker.types import Mount as DockerMount

from experiments.engines import buildah
from experiments.engines.base import Cancelled, EngineError, ExecSession, ProcessState
from experiments.engines.docker_exits import ExitFeed, exit_feed
from experiments.engines.single_host import (
    RAY_PORTS,
    RAY_WORKER_PORTS,
    Mount,
    ProcessSpec,
    SingleHostEngine,
    described,
    held_back,
    loopback_address,
    ports_needed,
    ray_node_count,
    shared_volume,
    tell_progress,
    to_start,
)
from experiments.workload import Workload

LABEL = "aichor.experiment"
BUILD_KEY_LABEL = "aichor.build-key"
# Every image built with a build key is also tagged CACHE_REPO:<key>, so the cache is one
# inspect (a few ms), not a labelled image list (the daemon reads every image: 50-100 ms).
CACHE_REPO = "aichor-build-cache"
# One client per Docker host and process: making one asks the daemon its API version (~6 ms),
# and every step makes an engine. Clients are thread-safe (a connection pool per host).
_CLIENTS: dict[str, docker.DockerClient] = {}
# `docker info` is slow (tens of ms); cores, memory and runtimes do not change between steps.
_INFO_CACHE: dict[str, tuple[float, dict]] = {}
INFO_TTL = 60.0
# When each (Docker host, network) was last found (see _check_network).
_NETWORK_SEEN: dict[tuple[str, str], float] = {}
PROCESS_LABEL = "aichor.process"
ROLE_LABEL = "aichor.role"
DECISIVE_LABEL = "aichor.decisive"  # "true" or "false": find() tells the decisive processes again
# "<queue>:<parallelism>:<index>" on a jobset completion held to its job's parallelism: find()
# tells the queues again.
QUEUE_LABEL = "aichor.queue"
VOLUME_LABEL = "aichor.volume"  # the experiment's shared volume (spec.storage.sharedVolume)
HOLD_LABEL = "aichor.hold"  # containers and images made for a debug hold
# Tagged <experiment id> on an experiment's hold images (the last one keeps it): so
# cleanup_experiment lists images (slow: the daemon reads them all) only for one ever held.
HOLD_MARKER_REPO = "aichor-held"
NETNS_LABEL = "aichor.netns"  # the container holding an experiment's network namespace
DEFAULT_NETWORK = "bridge"
# states() lists every labelled container this often, and only those not running in between.
FULL_LIST_SECONDS = 10.0
NOT_RUNNING = ("created", "exited", "dead")
# PID 1 of the netns container: it only has to exist. A shell loop, because any image that can
# run the processes (`/bin/sh -c`) can run it.
NETNS_COMMAND = "while :; do sleep 3600; done"
NO_FORWARDER = "port-forward needs nc, socat or python3 in the image"
# Runs in the netns container, so 127.0.0.1 is the experiment's loopback. $1 is the port, $2 the
# Python relay. Whichever tool the image has; a tunnel that closes ends its stdin, and the tool
# then closes the connection (busybox nc and the relay half-close, as kubectl port-forward does).
FORWARDER = f"""
if command -v nc >/dev/null 2>&1; then exec nc 127.0.0.1 "$1"; fi
if command -v busybox >/dev/null 2>&1 && busybox --list 2>/dev/null | grep -qx nc; then
  exec busybox nc 127.0.0.1 "$1"
fi
if command -v socat >/dev/null 2>&1; then exec socat - "TCP:127.0.0.1:$1"; fi
for py in python3 python; do
  if command -v "$py" >/dev/null 2>&1; then exec "$py" -c "$2" "$1"; fi
done
echo "{NO_FORWARDER}" >&2
exit 127
"""
# Python 2 and 3: an old image's `python` relays too.
RELAY = """
import os, select, socket, sys
try:
    s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), 10)
except (OSError, socket.error) as exc:
    sys.stderr.write("cannot connect to 127.0.0.1:%s: %s\\n" % (sys.argv[1], exc))
    sys.exit(1)
s.settimeout(None)
i, o = sys.stdin.fileno(), sys.stdout.fileno()
ins = [i, s]
while s in ins:
    for f in select.select(ins, [], [])[0]:
        if f is s:
            data = s.recv(65536)
            if not data:
                ins.remove(s)
            while data:
                data = data[os.write(o, data):]
        else:
            data = os.read(i, 65536)
            if data:
                s.sendall(data)
            else:
                s.shutdown(socket.SHUT_WR)
                ins.remove(i)
"""


def parse_ts_ns(stamp: str) -> int:
    """Docker's RFC 3339 nano timestamp as integer nanoseconds (floats lose the last digits)."""
    main, _, frac = stamp.rstrip("Z").partition(".")
    seconds = int(datetime.strptime(main, "%Y-%m-%dT%H:%M:%S").replace(tzinfo=UTC).timestamp())
    return seconds * 1_000_000_000 + int((frac or "0").ljust(9, "0")[:9])


class DockerEngine(SingleHostEngine):
    kind = "docker"
    targets_key = "containers"

    def __init__(self, config: dict | None = None) -> None:
        super().__init__(config)
        self._client: docker.DockerClient | None = None
        # states()'s view between full lists: the ids seen running, and when it last listed all.
        self._running: set[str] = set()
        self._listed_at: float | None = None

    @property
    def base_url(self) -> str:
        return self.config.get("docker_host") or os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"

    @property
    def network(self) -> str:
        """The Docker network workloads and builds use; `host` only when an admin chose it."""
        return self.config.get("network") or DEFAULT_NETWORK

    def _check_network(self, *, recent_will_do: bool = False) -> None:
        """A clear reason up front rather than Docker's "network bridge not found" mid-way (a
        dockerd started with --bridge=none has no `bridge`). `recent_will_do`: a network found
        less than INFO_TTL ago is taken as still there (a sweep's builds ask once, not each)."""
        key = (self.base_url, self.network)
        if recent_will_do and time.monotonic() - _NETWORK_SEEN.get(key, -INFO_TTL) < INFO_TTL:
            return
        try:
            self.client.api.inspect_network(self.network)
            _NETWORK_SEEN[key] = time.monotonic()
        except NotFound:
            raise EngineError(
                f"the Docker network {self.network!r} does not exist on this Docker host: set the engine's "
                '`network` (config, in the admin) to an existing network, or "none" for no network at all'
            ) from None

    @property
    def client(self) -> docker.DockerClient:
        if self._client is None:
            self._client = _CLIENTS.get(self.base_url)
        if self._client is None:
            try:
                self._client = docker.DockerClient(base_url=self.base_url, timeout=120)
            except DockerException as exc:
                raise EngineError(f"cannot reach the Docker Engine: {exc}") from None
            # Counts this thread's requests for the watcher's stats (a hook costs next to nothing).
            self._client.api.hooks["response"].append(_count_call)
            if self._client.api.base_url.startswith("http+docker://"):
                # A Unix socket has no proxy nor netrc: without this, requests scans the whole
                # environment for proxy variables on every call (a few ms each, under load).
                self._client.api.trust_env = False
            _CLIENTS[self.base_url] = self._client
        return self._client

    # --- build -------------------------------------------------------------------------
    def build(self, *, context_dir, dockerfile, tag, build_args, target, secrets, log, cancelled) -> str:
        # A network removed since is still named: start() checks again when a creation fails.
        self._check_network(recent_will_do=True)
        if secrets:
            # The classic builder has no secret mounts (and BuildKit is not packaged in Debian 12):
            # buildah builds it with the secrets mounted, then loads it into this engine.
            return buildah.build(
                docker_api=self.client.api,
                docker_host=self.base_url,
                context_dir=context_dir,
                dockerfile=dockerfile,
                tag=tag,
                build_args=build_args,
                target=target,
                secrets=secrets,
                log=log,
                cancelled=cancelled,
                network=self.network,
            )
        key = self._build_key(context_dir, dockerfile, build_args, target)
        cached, names = self._cached_build(key) if key else (None, [])
        if cached:
            # Same code, Dockerfile, build args and base images: exactly what Docker's own
            # layer cache would reuse, without sending the context again.
            repository = tag.rsplit(":", 1)[0]
            earlier = next((name for name in names if name.rsplit(":", 1)[0] == repository), None)
            if earlier is None:
                self.client.api.tag(cached, *tag.rsplit(":", 1))
            # else it runs by the name an earlier experiment of this repository gave it: a new
            # tag rewrites the daemon's whole tag file under its lock (about 11 ms here, longer
            # as tags accumulate), and a push of 500 runs of one commit made 500 of them.
            log(f"reusing cached image {cached[:19]}: same code, Dockerfile, build args and base images\n")
            return earlier or tag
        api = docker.APIClient(base_url=self.base_url, version=self.client.api.api_version, timeout=None)
        stream = api.build(
            path=context_dir,
            dockerfile=dockerfile,
            tag=tag,
            buildargs=build_args or None,
            target=target or None,
            decode=True,
            rm=True,
            forcerm=True,
            pull=False,
            # A member's `RUN` must not reach the server's own services (Redis, PostgreSQL).
            network_mode=self.network,
            labels={BUILD_KEY_LABEL: key} if key else None,
        )
        outcome: dict = {}

        def read() -> None:
            try:
                for chunk in stream:
                    if "stream" in chunk:
                        log(chunk["stream"])
                    elif "error" in chunk:
                        outcome["error"] = chunk.get("errorDetail", {}).get("message") or chunk["error"]
                        log(outcome["error"] + "\n")
                    elif "status" in chunk:
                        log(chunk["status"] + "\n")
                    if chunk.get("aux", {}).get("ID"):
                        outcome["image_id"] = chunk["aux"]["ID"]
            except Exception as exc:  # a closed socket after cancel lands here too
                outcome.setdefault("error", f"build stream failed: {exc}")

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        while reader.is_alive():
            reader.join(0.3)
            if reader.is_alive() and cancelled():
                _abort_stream(stream)
                reader.join(10)
                api.close()
                raise Cancelled()
        api.close()
        if "error" in outcome:
            raise EngineError(outcome["error"])
        if key:
            self.client.api.tag(tag, CACHE_REPO, key)
        return tag

    def _cached_build(self, key: str) -> tuple[str | None, list[str]]:
        """The id of the image built with this build key, if the host still has it, and its
        names."""
        try:
            image = self.client.api.inspect_image(f"{CACHE_REPO}:{key}")
            # The tag is only a pointer: the label says what the image was built from.
            if ((image.get("Config") or {}).get("Labels") or {}).get(BUILD_KEY_LABEL) == key:
                return image["Id"], image.get("RepoTags") or []
        except (ImageNotFound, NotFound):
            pass
        # Built before the cache tag existed: found by its label once, then tagged.
        listed = self.client.api.images(filters={"label": f"{BUILD_KEY_LABEL}={key}"}, quiet=True)
        if not listed:
            return None, []
        self.client.api.tag(listed[0], CACHE_REPO, key)
        return listed[0], []

    def _build_key(self, context_dir: str, dockerfile: str, build_args: dict, target: str | None) -> str | None:
        """A digest of everything a classic build depends on, or None when it cannot be known
        (a base image that is not local, a FROM computed from build args)."""
        root = Path(context_dir)
        digest = hashlib.sha256()
        bases = []
        for line in (root / dockerfile).read_text(errors="replace").splitlines():
            words = line.split()
            if not words or words[0].upper() != "FROM":
                continue
            image = next((w for w in words[1:] if not w.startswith("--")), "")
            if "$" in image or not image:
                return None
            if image.lower() in bases or image == "scratch":
                bases.append(image.lower())
                continue
            try:
                bases.append(self.client.api.inspect_image(image)["Id"])
            except (ImageNotFound, NotFound):
                return None
        digest.update(json.dumps([dockerfile, sorted((build_args or {}).items()), target, bases]).encode())
        for path in sorted(root.rglob("*")):
            if ".git" in path.relative_to(root).parts:
                continue
            info = path.lstat()
            digest.update(f"{path.relative_to(root)}\0{info.st_mode}\0".encode())
            if path.is_symlink():
                digest.update(os.readlink(path).encode())
            elif path.is_file():
                with path.open("rb") as fh:
                    for block in iter(lambda: fh.read(1 << 20), b""):
                        digest.update(block)
        return digest.hexdigest()

    def image_exists(self, image: str) -> bool:
        try:
            self.client.images.get(image)
            return True
        except ImageNotFound:
            return False

    # --- run -----------------------------------------------------------------------------
    def warnings_for(self, workload: Workload) -> list[str]:
        warnings = set(super().warnings_for(workload))
        shared = shared_volume(workload)
        if shared and shared.size_gb:
            warnings.add("a Docker volume has no size: sharedVolume.sizeGB ignored")
        if shared and shared.storage_class:
            warnings.add("a Docker host has no storage classes: sharedVolume.storageClass ignored")
        for group in (g for g in workload.groups if g.replicas):
            res = group.resources
            if res.tpu:
                warnings.add("a Docker host has no TPUs: accelerators.tpu ignored")
            if res.extra_selectors:
                warnings.add("a Docker host has no node selectors: extraSelectors ignored")
            if res.extra_tolerations:
                warnings.add("a Docker host has no tolerations: extraTolerations ignored")
            if res.rdma:
                warnings.add("RDMA devices are not passed through on a Docker host: rdma ignored")
            if res.gpus and not self._has_gpu_runtime():
                warnings.add("this Docker host has no NVIDIA runtime: GPUs ignored")
        return sorted(warnings)

    def _info(self) -> dict:
        cached = _INFO_CACHE.get(self.base_url)
        if cached and time.monotonic() - cached[0] < INFO_TTL:
            return cached[1]
        info = self.client.info()
        _INFO_CACHE[self.base_url] = (time.monotonic(), info)
        return info

    def _has_gpu_runtime(self) -> bool:
        try:
            return "nvidia" in (self._info().get("Runtimes") or {})
        except DockerException:
            return False

    def _host_limits(self) -> tuple[int, int]:
        info = self._info()
        return int(info.get("NCPU") or os.cpu_count() or 1), int(info.get("MemTotal") or 0)

    def ports(self, workload: Workload) -> list[int]:
        if workload.operator == "kuberay" and self.network != "host":
            # The experiment's network namespace is its own: the ports KubeRay uses, so code and
            # port-forwards that name them (the dashboard's 8265) find them; one agent port per node.
            *fixed, agent = RAY_PORTS
            return [*fixed, *range(agent, agent + ports_needed(workload) - len(fixed))]
        return super().ports(workload)

    def ray_node_options(self, workload: Workload, node: int) -> dict[str, str]:
        # The nodes share one network namespace (the experiment's, or the host's).
        options = {"node-ip-address": loopback_address(node)}
        if self.network == "host":
            return options
        # Each raylet hands its workers ports from Ray's range without knowing the other nodes':
        # two workers of two nodes could take one port, and the second dies at bind. Each node
        # gets a slice of the range of its own, as a pod has the whole range.
        low, high = RAY_WORKER_PORTS
        span = (high - low + 1) // ray_node_count(workload)
        if span < 20:
            return options  # too many nodes to slice: Ray's own range, as before
        start = low + node * span
        return options | {"min-worker-port": str(start), "max-worker-port": str(start + span - 1)}

    def mounts(self, workload: Workload) -> list[Mount]:
        mounts = super().mounts(workload)
        shared = shared_volume(workload)
        if shared:
            mounts.append(Mount(volume_name(workload.experiment_id), shared.mount_point, kind="volume"))
        return mounts

    def start(self, workload: Workload, processes: list[ProcessSpec], mounts: list[Mount], *, log, cancelled) -> dict:
        experiment_id, image = workload.experiment_id, workload.image
        # A retried submit must not start twins (hold images only exist after a run: not here).
        # A first attempt has none: a labelled list less (the daemon walks every container).
        if not self.first_attempt:
            self._remove_containers(experiment_id)
        volumes = [m.source for m in mounts if m.kind == "volume"]
        for volume in volumes:
            # A retried submit finds it again (creating an existing volume returns it).
            try:
                self.client.api.create_volume(name=volume, labels={LABEL: experiment_id, VOLUME_LABEL: experiment_id})
            except (APIError, DockerException) as exc:
                raise EngineError(f"could not create the shared volume: {_explain(exc)}") from None
            log(f"shared volume {volume} ready\n")
        ncpu, _mem = self._host_limits()
        gpu_ok = self._has_gpu_runtime()
        containers: dict[str, str] = {}
        netns = None
        netns_started: concurrent.futures.Future | None = None
        # One process is its own namespace's owner: a holder would only double the cost of a
        # start (a namespace's creation is most of it) for a namespace no one else joins.
        shared = len(processes) > 1
        try:
            if shared:
                netns = self._create_netns(experiment_id, image)
                # The processes are created while the holder starts (only their own start needs
                # it running).
                netns_started = _STARTER.submit(self.client.api.start, netns)
            for proc in processes:
                if cancelled():
                    raise Cancelled()
                res = proc.resources
                kwargs: dict = {}
                cpus = float(res.cpus or 0) * float(res.cpu_limit_ratio or 1)
                if cpus:
                    # The daemon refuses a limit above the host's cores; a laptop still runs it.
                    kwargs["nano_cpus"] = int(min(cpus, ncpu) * 1e9)
                if res.memory_gb:
                    kwargs["mem_limit"] = int(float(res.memory_gb) * 1024**3)
                if res.shm_size_gb:
                    kwargs["shm_size"] = int(float(res.shm_size_gb) * 1024**3)
                gpus = res.gpus
                if gpus and gpu_ok:
                    kwargs["device_requests"] = [DeviceRequest(count=int(gpus), capabilities=[["gpu"]])]
                # The low-level API: the high-level one inspects after every call.
                api = self.client.api
                name = f"aichor-{experiment_id[:8]}-{proc.name}-{os.urandom(2).hex()}"
                host_config = api.create_host_config(
                    network_mode=f"container:{netns}" if shared else self.network,
                    mounts=[DockerMount(m.target, m.source, type=m.kind, read_only=m.read_only) for m in mounts],
                    **kwargs,
                )
                created = api.create_container(
                    image,
                    entrypoint=["/bin/sh", "-c"],
                    command=[proc.command],
                    name=name,
                    labels={
                        LABEL: experiment_id,
                        PROCESS_LABEL: proc.name,
                        ROLE_LABEL: proc.role,
                        DECISIVE_LABEL: "true" if proc.decisive else "false",
                        **_queue_label(proc, processes),
                    },
                    environment=proc.env,
                    host_config=host_config,
                    detach=True,
                )
                containers[proc.name] = created["Id"]
                log(f"created container {name} for {proc.name}\n")
            if netns_started is not None:
                netns_started.result()
                netns_started = None
                log(f"network namespace on Docker network {self.network} ready\n")
            waiting = {p.name for p in processes if held_back(p, processes)}
            for name, cid in containers.items():
                if cancelled():
                    raise Cancelled()
                if name in waiting:
                    continue  # started by states() once an earlier completion of its job ends
                self.client.api.start(cid)
                log(f"started {name}\n")
            if waiting:
                log(f"{len(waiting)} completion(s) wait for their job's parallelisms\n")
        except Cancelled:
            _settle(netns_started)
            self._discard({"containers": containers, "netns": netns, "volumes": volumes})
            log(f"cancelled: removed the {len(containers)} container(s) created so far\n")
            raise
        except (APIError, DockerException) as exc:
            _settle(netns_started)
            self._discard({"containers": containers, "netns": netns, "volumes": volumes})
            self._check_network()  # a missing network is named, not left to Docker's words
            if cancelled():
                # The stop task removed the namespace under a creation: a cancel, not a failure.
                log(f"cancelled: removed the {len(containers)} container(s) created so far\n")
                raise Cancelled() from None
            raise EngineError(f"could not start the containers: {_explain(exc)}") from None
        netns = netns or next(iter(containers.values()), None)
        handle = {"containers": containers, "netns": netns, **described(processes)}
        if volumes:
            handle["volumes"] = volumes
        return handle

    def _discard(self, handle: dict) -> None:
        try:
            self.cancel(handle)
            self.cleanup(handle)
        except (APIError, DockerException):
            pass  # the labels let the stop task and reconcile find whatever is left

    def _create_netns(self, experiment_id: str, image: str) -> str:
        """The experiment's network namespace: a container that only sleeps, on the engine's
        network. Not a process: status, logs and exec never see it. Created, not started."""
        api = self.client.api
        created = api.create_container(
            image,
            entrypoint=["/bin/sh", "-c"],
            command=[NETNS_COMMAND],
            name=f"aichor-{experiment_id[:8]}-netns-{os.urandom(2).hex()}",
            labels={LABEL: experiment_id, NETNS_LABEL: experiment_id},
            host_config=api.create_host_config(network_mode=self.network),
            detach=True,
        )
        return created["Id"]

    def find(self, experiment_id: str) -> dict | None:
        found = self.client.api.containers(all=True, filters={"label": f"{LABEL}={experiment_id}"})
        processes = [c for c in found if NETNS_LABEL not in c["Labels"]]
        if not processes:
            return None
        handle: dict = {"containers": {c["Labels"].get(PROCESS_LABEL, c["Id"]): c["Id"] for c in processes}}
        if all(DECISIVE_LABEL in c["Labels"] for c in processes):
            handle["roles"] = {c["Labels"][PROCESS_LABEL]: c["Labels"].get(ROLE_LABEL, "") for c in processes}
            handle["decisive"] = [
                c["Labels"][PROCESS_LABEL] for c in processes if c["Labels"][DECISIVE_LABEL] == "true"
            ]
        queued = sorted(
            (label.rsplit(":", 2), c["Labels"][PROCESS_LABEL])
            for c in processes
            if (label := c["Labels"].get(QUEUE_LABEL))
        )
        for (queue, parallelism, _index), name in sorted(queued, key=lambda item: (item[0][0], int(item[0][2]))):
            entry = handle.setdefault("queues", {}).setdefault(
                queue, {"parallelism": int(parallelism), "processes": []}
            )
            entry["processes"].append(name)
        netns = [c["Id"] for c in found if NETNS_LABEL in c["Labels"]]
        if netns or len(handle["containers"]) == 1:
            # A lone process owns its namespace (see submit).
            handle["netns"] = netns[0] if netns else next(iter(handle["containers"].values()))
        return handle

    def states(self, handles: dict[str, dict]) -> dict[str, list[ProcessState]]:
        """One labelled list for every experiment on this Docker host, whatever their number. Only
        the handles' containers are processes: a namespace holder, or the original a debug hold
        replaced, is never mistaken for one. An exit code the list's text does not give costs one
        inspect, once, when that container has just exited.

        The daemon spends about a third of a millisecond of CPU on each container a list returns:
        listing every running container each interval (0.5 s) took a third of a core at 500
        running, away from the starts of the experiments submitted meanwhile. An interval lists
        the containers that are not running (the few that just exited, or wait to start), and
        containers seen running stay so until they show up there; a full list every
        FULL_LIST_SECONDS finds any removed behind aichor's back ("missing"), and containers
        never seen yet (just submitted) are looked up by id in the same request.

        A busy daemon lists a container as running for seconds after it died: the exits and
        removals its event stream announced (docker_exits) count at once."""
        wanted = {cid for handle in handles.values() for cid in handle.get("containers", {}).values()}
        announced = self._exit_feed().exits(wanted) if wanted else {}
        self._running -= announced.keys()
        try:
            listed = self._listed(wanted - announced.keys())
        except (APIError, DockerException) as exc:
            self._listed_at = None  # start again from a full list
            raise EngineError(f"cannot list the containers: {_explain(exc)}") from None
        by_id = {cid: {"Id": cid, "State": "running"} for cid in self._running & wanted}
        by_id |= {c["Id"]: c for c in listed}
        for cid, code in announced.items():
            if code is None:
                by_id.pop(cid, None)  # removed: missing
            elif by_id.get(cid, {}).get("State") not in ("exited", "dead"):
                by_id[cid] = {"Id": cid, "State": "exited", "Status": f"Exited ({code})"}
        states = {
            experiment_id: [
                self._listed_state(name, by_id.get(cid)) for name, cid in handle.get("containers", {}).items()
            ]
            for experiment_id, handle in handles.items()
        }
        for experiment_id, handle in handles.items():
            if handle.get("queues"):
                self._advance(handle, states[experiment_id])
        return states

    def _exit_feed(self) -> ExitFeed:
        return exit_feed(self.base_url, self.client.api.api_version, LABEL)

    def _listed(self, wanted: set[str]) -> list[dict]:
        """The labelled containers states() must read this interval (see there); keeps
        _running, the ids last seen running."""
        api, now = self.client.api, time.monotonic()
        if self._listed_at is None or now - self._listed_at >= FULL_LIST_SECONDS:
            listed = api.containers(all=True, filters={"label": LABEL})
            self._listed_at = now
            self._running = {c["Id"] for c in listed if c.get("State") not in NOT_RUNNING}
            return listed
        listed = api.containers(all=True, filters={"label": LABEL, "status": list(NOT_RUNNING)})
        self._running -= {c["Id"] for c in listed}
        unseen = wanted - self._running - {c["Id"] for c in listed}
        if unseen:
            found = api.containers(all=True, filters={"label": LABEL, "id": sorted(unseen)})
            self._running |= {c["Id"] for c in found if c.get("State") not in NOT_RUNNING}
            listed += [c for c in found if c.get("State") in NOT_RUNNING]
        return listed

    def _advance(self, handle: dict, states: list[ProcessState]) -> None:
        """Start the held-back completions there is room for now (the watcher asks every
        interval, so the next one starts at most an interval after one ended); the rest that
        wait say how far their jobs are."""
        phases = {s.name: s.phase for s in states}
        for name in to_start(handle, phases):
            try:
                self.client.api.start(handle["containers"][name])
            except NotFound:
                continue  # removed meanwhile (a cancel): reported missing next time
            phases[name] = "running"
        for state in states:
            state.phase = phases.get(state.name, state.phase)
        tell_progress(handle, states)

    def _listed_state(self, name: str, container: dict | None) -> ProcessState:
        if container is None:
            return ProcessState(name, "missing")
        state = container.get("State")
        if state == "created":
            return ProcessState(name, "pending")
        if state not in ("exited", "dead"):
            return ProcessState(name, "running")
        code = _EXITED.match(container.get("Status") or "")
        if code:
            return ProcessState(name, "exited", int(code.group(1)))
        try:
            attrs = self.client.api.inspect_container(container["Id"])["State"]
        except NotFound:
            return ProcessState(name, "missing")
        return ProcessState(name, "exited", int(attrs.get("ExitCode", -1)))

    def status(self, handle: dict) -> list[ProcessState]:
        states = []
        for name, cid in handle.get("containers", {}).items():
            try:
                attrs = self.client.api.inspect_container(cid)["State"]
            except NotFound:
                states.append(ProcessState(name, "missing"))
                continue
            status = attrs.get("Status")
            if status in ("exited", "dead"):
                states.append(ProcessState(name, "exited", int(attrs.get("ExitCode", -1))))
            elif status == "created":
                states.append(ProcessState(name, "pending"))
            else:
                states.append(ProcessState(name, "running"))
        return states

    def logs(
        self, handle: dict, process: str, cursor: list[int] | int | None = None
    ) -> tuple[list[str], list[int] | None]:
        """New output lines of a process after `cursor`: at most LOG_BUDGET_BYTES of them per
        call, so a burst is read in several calls and never held whole. A line still being
        written stays for a later call. The cursor is [since_ns, taken] (see _read_log)."""
        cid = handle.get("containers", {}).get(process)
        if not cid:
            return [], cursor
        return _read_log(self.client.api, cid, cursor, final=False)

    def follow(
        self, handle: dict, process: str, cursor: list[int] | int | None = None
    ) -> tuple[list[str], list[int] | None]:
        """Like logs(), through a stream kept open between calls (`docker logs --follow`): a
        quiet process costs a select on its socket, no request. Its end (the process exited)
        closes it; the final collection reads from the cursor as logs() does."""
        cid = handle.get("containers", {}).get(process)
        if not cid:
            return [], cursor
        if self.base_url.startswith(("https://", "tcp://", "ssh://", "http+docker://ssh")):
            return self.logs(handle, process, cursor)  # TLS and SSH sockets cannot be polled this way
        return _follow_log(self.client.api, cid, cursor)

    def unfollow(self, handle: dict) -> None:
        _drop_followers(set(handle.get("containers", {}).values()))

    def calls(self) -> int:
        return getattr(_CALLS, "count", 0)

    def final_logs(self, handle: dict, process: str, cursor: list[int] | int | None) -> list[str]:
        """Once the process has exited: like logs(), plus its unfinished last line when the
        log ends there. Callers first call logs() until it returns nothing."""
        cid = handle.get("containers", {}).get(process)
        if not cid:
            return []
        return _read_log(self.client.api, cid, cursor, final=True)[0]

    def exec(self, handle: dict, process: str, *, command: list[str], tty: bool = True) -> ExecSession:
        cid = handle.get("containers", {}).get(process)
        if not cid:
            raise EngineError(f"no process named {process}")
        try:
            exec_id = self.client.api.exec_create(
                cid, command, stdin=True, tty=tty, stdout=True, stderr=True, environment={"TERM": "xterm-256color"}
            )["Id"]
            sock = self.client.api.exec_start(exec_id, tty=tty, socket=True)
        except (APIError, DockerException) as exc:
            raise EngineError(f"cannot open a shell: {_explain(exc)}") from None
        return DockerExecSession(self.client.api, exec_id, sock)

    def port_forward(self, handle: dict, process: str, port: int) -> ExecSession:
        """An exec in the netns container: its 127.0.0.1 is the experiment's, whichever host
        the Docker Engine runs on, and the server's own loopback is never in reach."""
        netns = handle.get("netns")
        if process not in handle.get("containers", {}):
            raise EngineError(f"no process named {process}")
        if not netns:
            raise EngineError("this experiment was started before port-forward went through the engine")
        try:
            exec_id = self.client.api.exec_create(
                netns, ["/bin/sh", "-c", FORWARDER, "aichor-port-forward", str(port), RELAY], stdin=True, tty=False
            )["Id"]
            sock = self.client.api.exec_start(exec_id, tty=False, socket=True)
        except (APIError, DockerException) as exc:
            raise EngineError(f"cannot reach port {port}: {_explain(exc)}") from None
        return DockerStreamSession(self.client.api, exec_id, sock, f"nothing answers on port {port} in {process}")

    def cancel(self, handle: dict) -> None:
        for cid in handle.get("containers", {}).values():
            try:
                self.client.api.kill(cid)
            except (NotFound, APIError):
                pass  # already gone or already stopped

    def hold(self, handle: dict, seconds: float) -> dict:
        """An exited container cannot be exec'd into, and restarting it would rerun the workload.
        So each exited process's container is committed to a temporary image (its files as the
        process left them) and a sibling is started from it with the same environment, mounts,
        working directory and labels, running only `sleep` for the hold; the sibling takes the
        process's place in the handle, so the terminal opens "in the failed container". Processes
        still running are kept as they are. The sleep ends the sibling on its own should every
        cleanup path be lost; images and originals are listed in the handle for cleanup."""
        held = {**handle, "containers": dict(handle.get("containers", {}))}
        originals, images = list(handle.get("held_originals", [])), list(handle.get("hold_images", []))
        try:
            for name, cid in handle.get("containers", {}).items():
                try:
                    container = self.client.containers.get(cid)
                except NotFound:
                    continue
                if container.status not in ("exited", "dead"):
                    continue
                experiment_id = container.labels.get(LABEL, "")
                image = container.commit(
                    repository=f"aichor-hold/{experiment_id[:8]}-{name}",
                    tag=os.urandom(3).hex(),
                    # A commit inherits the image's labels: blank the build key, or a later
                    # build of the same code would "reuse" this snapshot of a failed run.
                    changes=[f'LABEL {HOLD_LABEL}={experiment_id} {BUILD_KEY_LABEL}=""'],
                )
                images.append(image.id)
                self.client.api.tag(image.id, HOLD_MARKER_REPO, experiment_id)
                config = container.attrs["Config"]
                # A lone process owned the namespace it took down with it: the held copy gets
                # a namespace of its own and owns it in turn.
                owned = handle.get("netns") == cid
                sibling = self.client.containers.create(
                    image.id,
                    entrypoint=["sleep"],
                    command=[str(int(seconds) + 60)],
                    name=f"aichor-{experiment_id[:8]}-{name}-held-{os.urandom(2).hex()}",
                    labels={
                        LABEL: experiment_id,
                        PROCESS_LABEL: name,
                        HOLD_LABEL: experiment_id,
                        **{k: v for k, v in container.labels.items() if k in (ROLE_LABEL, DECISIVE_LABEL)},
                    },
                    environment=config.get("Env") or [],
                    working_dir=config.get("WorkingDir") or None,
                    # The experiment's namespace, which outlives its processes: the held copy
                    # is reached on the same 127.0.0.1 ports as its siblings.
                    network_mode=f"container:{handle['netns']}" if handle.get("netns") and not owned else self.network,
                    mounts=[
                        DockerMount(
                            m["Destination"],
                            m["Name"] if m.get("Type") == "volume" else m["Source"],
                            type=m["Type"],
                            read_only=not m.get("RW", True),
                        )
                        for m in container.attrs.get("Mounts") or []
                        if m.get("Type") in ("bind", "volume")
                    ],
                    detach=True,
                )
                sibling.start()
                originals.append(cid)
                held["containers"][name] = sibling.id
                if owned:
                    held["netns"] = sibling.id
        except (APIError, DockerException) as exc:
            self.cleanup({"containers": {}, "held_originals": [], "hold_images": images})
            raise EngineError(f"could not hold the failed containers: {_explain(exc)}") from None
        held["held_originals"], held["hold_images"] = originals, images
        return held

    def cleanup(self, handle: dict) -> None:
        netns = [handle["netns"]] if handle.get("netns") else []
        failed: APIError | None = None
        # Once each: a lone process is its own namespace's holder.
        for cid in dict.fromkeys([*handle.get("containers", {}).values(), *handle.get("held_originals", []), *netns]):
            try:
                self.client.api.remove_container(cid, force=True)
            except NotFound:
                pass
            except APIError as exc:
                # A racing cleanup (the stop task and a cancelled submit) answers 409 "removal
                # already in progress": go on with the others, the namespace holder last of all.
                if exc.status_code != 409:
                    failed = failed or exc
        for image in handle.get("hold_images", []):
            try:
                self.client.api.remove_image(image, force=True)
            except (NotFound, APIError):
                pass  # gone already, or still used by a container a racing cleanup removes
        for volume in handle.get("volumes", []):
            self._remove_volume(volume)
        if failed is not None:
            raise failed

    def _remove_volume(self, name: str) -> None:
        try:
            self.client.api.remove_volume(name, force=True)
        except NotFound:
            pass
        except APIError:
            pass  # still in use by a held container: cleanup_experiment comes again after the hold

    def cleanup_experiment(self, experiment_id: str) -> None:
        self._remove_containers(experiment_id)
        for volume in (
            self.client.api.volumes(filters={"label": f"{VOLUME_LABEL}={experiment_id}"}).get("Volumes") or []
        ):
            self._remove_volume(volume["Name"])
        try:
            self.client.api.inspect_image(f"{HOLD_MARKER_REPO}:{experiment_id}")
        except (ImageNotFound, NotFound):
            return  # never held
        for image in self.client.images.list(filters={"label": f"{HOLD_LABEL}={experiment_id}"}):
            try:
                self.client.api.remove_image(image.id, force=True)
            except (NotFound, APIError):
                pass

    def _remove_containers(self, experiment_id: str) -> None:
        # Every labelled container, not find()'s one-per-process view: a held process has two.
        # The namespace holder last: the processes still joined to it go first.
        found_all = self.client.api.containers(all=True, filters={"label": f"{LABEL}={experiment_id}"})
        failed: APIError | None = None
        for found in sorted(found_all, key=lambda c: NETNS_LABEL in (c.get("Labels") or {})):
            try:
                self.client.api.remove_container(found["Id"], force=True)
            except NotFound:
                pass
            except APIError as exc:
                if exc.status_code != 409:  # 409: a racing cleanup removes it already
                    failed = failed or exc
        if failed is not None:
            raise failed


# Starts namespace holders while submit creates the processes; a few threads for all engines.
_STARTER = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="aichor-netns")


def _settle(started: concurrent.futures.Future | None) -> None:
    """Wait for a namespace start under way, so cleanup never races it; its error is moot."""
    if started is not None:
        try:
            started.result()
        except (APIError, DockerException):
            pass


class DockerExecSession(ExecSession):
    def __init__(self, api, exec_id: str, sock) -> None:
        self.api = api
        self.exec_id = exec_id
        # exec_start(socket=True) gives a SocketIO wrapper; the raw socket allows timeouts.
        self.sock = getattr(sock, "_sock", sock)
        # One fixed timeout, for writes only: reads wait in select, so a reader on another thread
        # (or an event loop) never changes how a concurrent write blocks.
        self.sock.settimeout(30)
        self._closed = False

    def write(self, data: bytes) -> None:
        self.sock.sendall(data)

    def write_nowait(self, data: bytes) -> int:
        if hasattr(self.sock, "pending"):
            return 0  # TLS: bytes must go through the SSL object
        try:
            # The descriptor is non-blocking (settimeout), and a bare write skips the readiness
            # poll a socket with a timeout makes before every send.
            return os.write(self.sock.fileno(), data)
        except BlockingIOError:
            return 0

    def read(self, timeout: float | None = None) -> bytes | None:
        pending = getattr(self.sock, "pending", None)  # TLS (tcp DOCKER_HOST) buffers decrypted bytes
        if timeout == 0 and pending is None:
            # The event loop saw the descriptor readable: one read, no select and poll first.
            try:
                return os.read(self.sock.fileno(), 65536) or None
            except BlockingIOError:
                return b""
            except (OSError, ValueError):
                return None
        try:
            if not (pending and pending()) and not select.select([self.sock], [], [], timeout)[0]:
                return b""
            data = self.sock.recv(65536)
        except (TimeoutError, BlockingIOError):
            return b""
        except (OSError, ValueError):  # ValueError: select on a socket closed meanwhile
            return None
        return data or None

    def fileno(self) -> int | None:
        # TLS sockets can hold decrypted bytes the descriptor does not show: readers poll them.
        return None if hasattr(self.sock, "pending") else self.sock.fileno()

    def resize(self, rows: int, cols: int) -> None:
        try:
            self.api.exec_resize(self.exec_id, height=rows, width=cols)
        except APIError:
            pass  # the shell may be gone; the next read reports the end

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self.sock.close()


class DockerStreamSession(DockerExecSession):
    """A non-TTY exec: the daemon frames its output (8-byte headers: stream type, 3 zero bytes,
    big-endian size), so stdout is the byte stream and stderr the command's complaint. Input
    is not framed."""

    STDOUT, STDERR = 1, 2

    def __init__(self, api, exec_id: str, sock, refused: str) -> None:
        super().__init__(api, exec_id, sock)
        self.refused = refused
        self._pending = bytearray()  # received, not yet demultiplexed
        self._stderr = bytearray()
        self._got_output = False

    def read(self, timeout: float | None = None) -> bytes | None:
        while True:
            raw = super().read(timeout)
            if raw is None:
                return None
            self._pending += raw
            out = self._demux()
            # Only stderr or half a header arrived: a caller waiting (timeout None) waits on.
            if out or timeout is not None:
                return out

    def _demux(self) -> bytes:
        out = bytearray()
        while len(self._pending) >= 8:
            kind, size = self._pending[0], int.from_bytes(self._pending[4:8], "big")
            if len(self._pending) < 8 + size:
                break
            payload = self._pending[8 : 8 + size]
            del self._pending[: 8 + size]
            if kind == self.STDERR:
                self._stderr += payload[: 4096 - len(self._stderr)]
            else:
                out += payload
        if out:
            self._got_output = True
        return bytes(out)

    def resize(self, rows: int, cols: int) -> None:
        pass  # no TTY

    def failure(self) -> str | None:
        if self._got_output or not self._stderr:
            return None
        text = self._stderr.decode("utf-8", "replace").strip()
        return NO_FORWARDER if NO_FORWARDER in text else self.refused


def _abort_stream(stream) -> None:
    """Cut the build's HTTP connection: the daemon cancels a classic build whose client left."""
    frame = getattr(stream, "gi_frame", None)
    response = frame.f_locals.get("response") if frame else None
    conn = getattr(getattr(response, "raw", None), "_connection", None) or getattr(
        getattr(response, "raw", None), "_fp", None
    )
    sock = getattr(conn, "sock", None)
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
    if response is not None:
        response.close()


def _explain(exc: Exception) -> str:
    return getattr(exc, "explanation", None) or str(exc)


# --- workload logs -------------------------------------------------------------------------
# The most new output one logs() call reads: a workload printing gigabytes is collected in
# pieces, and the worker's memory stays flat whatever the size of the log.
LOG_BUDGET_BYTES = 4 * 1024 * 1024
# Docker stamps a message when its copier reads it, and the stdout and stderr copiers race for
# the log file: a message can land just after one stamped a little later. So a cursor restarts
# this much before the newest message it took, and skips by count what it took since then.
_LOG_OVERLAP_NS = 50_000_000
_LOG_BUCKET_NS = 1_000_000
# The json-file driver has no index: every logs request makes the daemon decode the container's
# whole log file to find `since`. A read stopped by the budget keeps its stream open, so the
# next call from where it stopped (the same task, a moment later) goes on without a new scan.
_OPEN_READERS: dict[tuple[str, int, int], "_LogReader"] = {}
_OPEN_READERS_LOCK = threading.Lock()
_OPEN_READER_SECONDS = 10.0
_OPEN_READERS_MAX = 16
# How long a one-shot stream that reached the end of the log is kept for the final read.
_LOG_END_FRESH_SECONDS = 1.0


def _read_log(
    api: docker.APIClient, cid: str, cursor: list[int] | int | None, *, final: bool
) -> tuple[list[str], list[int] | None]:
    since_ns, taken = _log_position(cursor)
    reader = _take_reader(cid, since_ns, taken)
    # A stream kept at its end serves only the final read that follows the logs() call that
    # found nothing more, a moment after the process exited: its unfinished last line, with no
    # request of its own. A logs() call always looks again.
    if reader is not None and (final or not reader.ended):
        lines, (since_ns, taken) = _read_piece(cid, reader, final)
        if lines or not reader.ended or (final and reader.end_is_fresh()):
            return lines, [since_ns, taken]
        # A kept stream ends where the log ended when it was opened: look at the log as it is now.
    try:
        reader = _LogReader(api, cid, since_ns, taken)
    except NotFound:
        return [], cursor
    lines, position = _read_piece(cid, reader, final)
    return lines, (None if position == (0, 0) else list(position))


def _read_piece(cid: str, reader: "_LogReader", final: bool, keep=None) -> tuple[list[str], tuple[int, int]]:
    """Read from `reader`; close its stream at its end. `keep` it (by default for the next
    one-shot read at this position) unless it ended, except a one-shot read that ended just
    now: it holds the unfinished last line for a final read (see _read_log)."""
    try:
        lines, position = reader.read(final=final)
    except BaseException:
        reader.close()
        raise
    if reader.ended:
        reader.close()
    if not reader.ended or (keep is None and reader.end_is_fresh()):
        (keep or _keep_reader)(cid, position, reader)
    return lines, position


def _log_position(cursor: list[int] | int | None) -> tuple[int, int]:
    if cursor is None:
        return 0, 0
    if isinstance(cursor, int):  # a handle from before bounded reads: the stamp of the last line
        return cursor + 1, 0
    return int(cursor[0]), int(cursor[1])


def _take_reader(cid: str, since_ns: int, taken: int) -> "_LogReader | None":
    with _OPEN_READERS_LOCK:
        reader = _OPEN_READERS.pop((cid, since_ns, taken), None)
        stale = _stale_readers()
    for old in stale:
        old.close()
    return reader


def _keep_reader(cid: str, position: tuple[int, int], reader: "_LogReader") -> None:
    reader.kept_at = time.monotonic()
    with _OPEN_READERS_LOCK:
        # Only one continuation of a container's log is ever right: the newest.
        replaced = [_OPEN_READERS.pop(key) for key in list(_OPEN_READERS) if key[0] == cid]
        _OPEN_READERS[(cid, *position)] = reader
        stale = replaced + _stale_readers()
    for old in stale:
        old.close()


def _stale_readers() -> list["_LogReader"]:
    """Readers nobody came back for (the task moved to another worker, the experiment ended)."""
    now = time.monotonic()
    stale = [key for key, r in _OPEN_READERS.items() if now - r.kept_at > _OPEN_READER_SECONDS]
    while len(_OPEN_READERS) - len(stale) > _OPEN_READERS_MAX:
        stale.append(min((k for k in _OPEN_READERS if k not in stale), key=lambda k: _OPEN_READERS[k].kept_at))
    return [_OPEN_READERS.pop(key) for key in stale]


class _LogReader:
    """One streamed read of a container's log from a cursor, in pieces of LOG_BUDGET_BYTES.

    A cursor (since_ns, taken) means: of the messages stamped since_ns or later, in the log's
    own order, the first `taken` are stored. Several messages can share a stamp (the 16 KiB
    pieces Docker cuts a long line into do), so a stamp alone would lose or repeat some. Pieces
    of one line are stored as one line; a line still being written, or cut by the budget, is
    left for the next piece, except a line longer than the budget (stored in pieces) and, when
    `final`, the unfinished last line of an exited process."""

    def __init__(self, api: docker.APIClient, cid: str, since_ns: int, taken: int, follow: bool = False) -> None:
        params: dict = {"stdout": 1, "stderr": 1, "timestamps": 1, "follow": int(follow), "tail": "all"}
        if since_ns > _LOG_BUCKET_NS:
            # A float cannot carry nanoseconds: ask from a millisecond early, filter exactly below.
            params["since"] = (since_ns - _LOG_BUCKET_NS) / 1e9
        # The endpoint itself, not APIClient.logs(): that inspects the container first (to tell
        # a TTY's raw stream), a second request per read; aichor never starts a process with a
        # TTY, so the log is always multiplexed. The frames are parsed here from large reads:
        # docker-py's own iterator makes two urllib3 reads per message, too slow for millions
        # of lines.
        self._response = api._get(api._url("/containers/{0}/logs", cid), params=params, stream=True)
        try:
            api._raise_for_status(self._response)
        except BaseException:
            self._response.close()
            raise
        self._source = _FollowSource(self._response) if follow else None
        self._frames = self._source or _frames(self._response)
        self.since_ns, self.taken = since_ns, taken
        self.seen = 0  # messages stamped since_ns or later read so far
        self.stored = taken  # of those, how many are stored (by earlier calls or returned)
        self.newest = 0  # the newest stamp among the stored
        self.per_ms: dict[int, int] = {}  # stored messages per millisecond near the newest
        self.pending: list[bytes] = []  # pieces of a line not ended yet
        self.pending_stamps: list[int] = []
        self.ended = False
        self.kept_at = 0.0
        self.opened_at = time.monotonic()
        self._second, self._second_ns, self._last_ns = b"", 0, 0

    def read(self, *, final: bool) -> tuple[list[str], tuple[int, int]]:
        lines: list[str] = []
        size = 0
        pending_size = sum(len(p) for p in self.pending)
        for frame in self._frames:
            ns, text = self._split(frame)
            if ns < self.since_ns:
                continue
            self.seen += 1
            if self.seen <= self.taken:  # stored by an earlier call
                self._count(ns)
                continue
            self.pending.append(text)
            self.pending_stamps.append(ns)
            pending_size += len(text)
            if text.endswith(b"\n"):
                size += self._commit(lines)
                pending_size = 0
                if size >= LOG_BUDGET_BYTES:
                    break
            elif size + pending_size >= LOG_BUDGET_BYTES:
                if not lines:  # a single line longer than the budget
                    self._commit(lines)
                break  # else the line starts the next piece, whole
        else:
            # A followed stream ran dry for now: it ends only with the process (and then not
            # always with its last output: the daemon may close it before the final flush).
            if self._source is None or self._source.eof:
                self.ended = True
                if self.pending and final:
                    self._commit(lines)
        return lines, self.position()

    def end_is_fresh(self) -> bool:
        """A one-shot stream that ended, opened a moment ago: where the log of an exited
        process ends."""
        return self.ended and self._source is None and time.monotonic() - self.opened_at < _LOG_END_FRESH_SECONDS

    def position(self) -> tuple[int, int]:
        start = (self.newest - _LOG_OVERLAP_NS) // _LOG_BUCKET_NS * _LOG_BUCKET_NS
        # Moving on needs every message taken before seen again: a stream cut short tells
        # nothing of the ones it did not reach.
        if start > self.since_ns and self.seen >= self.taken:
            return start, sum(n for ms, n in self.per_ms.items() if ms >= start // _LOG_BUCKET_NS)
        return self.since_ns, self.stored

    def _commit(self, lines: list[str]) -> int:
        text = b"".join(self.pending)
        size = len(text)
        line = text.decode("utf-8", "replace")
        lines.append(line if line.endswith("\n") else line + "\n")
        self.stored = self.seen
        for ns in self.pending_stamps:
            self._count(ns)
        self.pending.clear()
        self.pending_stamps.clear()
        return size

    def _count(self, ns: int) -> None:
        ms = ns // _LOG_BUCKET_NS
        self.per_ms[ms] = self.per_ms.get(ms, 0) + 1
        if ns > self.newest:
            self.newest = ns
            if len(self.per_ms) > 4 * _LOG_OVERLAP_NS // _LOG_BUCKET_NS:
                oldest = (ns - _LOG_OVERLAP_NS) // _LOG_BUCKET_NS
                for old in [old for old in self.per_ms if old < oldest]:
                    del self.per_ms[old]

    def _split(self, frame: bytes) -> tuple[int, bytes]:
        """`2024-05-01T12:00:00.123456789Z text` as (ns, text); each second is parsed once."""
        stamp, _, text = frame.partition(b" ")
        try:
            if len(stamp) == 30 and stamp[19:20] == b"." and stamp[29:] == b"Z":
                if stamp[:19] != self._second:
                    self._second_ns = parse_ts_ns(stamp[:19].decode() + "Z")
                    self._second = stamp[:19]
                self._last_ns = self._second_ns + int(stamp[20:29])
            else:
                self._last_ns = parse_ts_ns(stamp.decode())
        except ValueError:
            return self._last_ns, frame  # not stamped (cannot happen with timestamps=True): kept whole
        return self._last_ns, text

    def close(self) -> None:
        """Stop the daemon sending the rest of a log nobody reads."""
        self.ended = True
        try:
            self._response.close()
        except OSError:
            pass


def _frames(response: requests.Response) -> Iterator[bytes]:
    """The payloads of Docker's multiplexed stream: an 8-byte header (stream, size) each."""
    buf = bytearray()
    while True:
        try:
            block = response.raw.read(1 << 16)
        except (OSError, urllib3.exceptions.HTTPError):
            return  # the container was removed meanwhile: what was read stands
        if not block:
            return
        buf += block
        pos = 0
        while len(buf) - pos >= 8:
            end = pos + 8 + int.from_bytes(buf[pos + 4 : pos + 8], "big")
            if end > len(buf):
                break
            if end > pos + 8:
                yield bytes(buf[pos + 8 : end])
            pos = end
        del buf[:pos]


class _FollowSource:
    """The frames of a followed log as they arrive, never waiting for more: the socket is read
    only when select says it holds bytes, so a quiet process costs one select, no request. The
    HTTP chunked encoding is undone here, as the body is read past http.client."""

    READ_BYTES = 1 << 20  # at most this much per fill: the reader's budget stops a burst anyway

    def __init__(self, response: requests.Response) -> None:
        self._fp = response.raw._fp.fp  # http.client's buffered reader: it may hold the first bytes
        self._sock = self._fp.raw._sock
        self._sock.setblocking(False)
        self._chunked = bool(response.raw.chunked)
        self._chunk_left = 0
        self._body = bytearray()  # received, chunk framing not yet removed
        self._data = bytearray()  # the log stream, not yet cut into frames
        self._frames: deque[bytes] = deque()
        self._started = False
        self.eof = False

    def __iter__(self) -> Iterator[bytes]:
        while True:
            if not self._frames:
                self._fill()
                if not self._frames:
                    return
            yield self._frames.popleft()

    def _fill(self) -> None:
        got = 0
        while got < self.READ_BYTES and not self.eof:
            # The first read takes what http.client buffered with the headers, if anything.
            if self._started and not select.select([self._sock], [], [], 0)[0]:
                return
            try:
                block = self._fp.read1(1 << 16)
            except BlockingIOError:
                return
            except (OSError, ValueError):
                self.eof = True
                return
            if not block:
                # Readable and empty is the end; before the first select it only meant "nothing yet".
                self.eof = self._started
                self._started = True
                return
            self._started = True
            got += len(block)
            self._decode(block)

    def _decode(self, block: bytes) -> None:
        if not self._chunked:
            self._data += block
        else:
            self._body += block
            self._unchunk()
        pos = 0
        while len(self._data) - pos >= 8:
            end = pos + 8 + int.from_bytes(self._data[pos + 4 : pos + 8], "big")
            if end > len(self._data):
                break
            if end > pos + 8:
                self._frames.append(bytes(self._data[pos + 8 : end]))
            pos = end
        del self._data[:pos]

    def _unchunk(self) -> None:
        while self._body:
            if self._chunk_left:
                take = min(self._chunk_left, len(self._body))
                self._data += self._body[:take]
                del self._body[:take]
                self._chunk_left -= take
                continue
            end = self._body.find(b"\r\n")
            if end < 0:
                return
            size = self._body[:end].split(b";")[0].strip()
            del self._body[: end + 2]
            if not size:
                continue  # the line break closing a chunk's data
            self._chunk_left = int(size, 16)
            if not self._chunk_left:
                self.eof = True  # the last chunk: the daemon ended the stream
                self._body.clear()
                return


# Followed logs by container: the reader and the position it last returned. Kept between the
# watcher's intervals (and its slices, in this process); closed when the experiment leaves the
# watch, or when nobody asked for a while (the next slice went to another worker).
_FOLLOWERS: dict[str, tuple["_LogReader", tuple[int, int]]] = {}
_FOLLOWERS_LOCK = threading.Lock()
_FOLLOWER_IDLE_SECONDS = 120.0


def _follow_log(api: docker.APIClient, cid: str, cursor: list[int] | int | None) -> tuple[list[str], list[int] | None]:
    position = _log_position(cursor)
    with _FOLLOWERS_LOCK:
        reader, at = _FOLLOWERS.pop(cid, (None, None))
        idle = [key for key, (r, _) in _FOLLOWERS.items() if time.monotonic() - r.kept_at > _FOLLOWER_IDLE_SECONDS]
        stale = [_FOLLOWERS.pop(key)[0] for key in idle]
    for old in stale:
        old.close()
    if reader is not None and at != position:
        reader.close()  # someone else moved the cursor (a final collection): start from it
        reader = None
    if reader is None:
        try:
            reader = _LogReader(api, cid, *position, follow=True)
        except NotFound:
            return [], cursor
    lines, position = _read_piece(cid, reader, False, keep=_keep_follower)
    return lines, (None if position == (0, 0) else list(position))


def _keep_follower(cid: str, position: tuple[int, int], reader: "_LogReader") -> None:
    reader.kept_at = time.monotonic()
    with _FOLLOWERS_LOCK:
        _FOLLOWERS[cid] = (reader, position)


def _drop_followers(cids: set[str]) -> None:
    with _FOLLOWERS_LOCK:
        dropped = [_FOLLOWERS.pop(cid)[0] for cid in cids if cid in _FOLLOWERS]
    for reader in dropped:
        reader.close()


def volume_name(experiment_id: str) -> str:
    return f"aichor-{experiment_id}-shared"


def _queue_label(proc: ProcessSpec, processes: list[ProcessSpec]) -> dict[str, str]:
    if not proc.queue:
        return {}
    index = [p.name for p in processes if p.queue == proc.queue].index(proc.name)
    return {QUEUE_LABEL: f"{proc.queue}:{proc.parallelism}:{index}"}


# "Exited (3) 2 seconds ago": the exit code as the container list shows it.
_EXITED = re.compile(r"^Exited \((-?\d+)\)")
_CALLS = threading.local()


def _count_call(response: requests.Response, *args, **kwargs) -> None:
    _CALLS.count = getattr(_CALLS, "count", 0) + 1
