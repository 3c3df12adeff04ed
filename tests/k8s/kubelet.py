"""The scheduler and the kubelet of the fake cluster's one node (a fake: no cluster can run
here). Each pod runs as REAL Docker containers of its images, with its environment (downward
API, Secrets, ConfigMaps, `$(VAR)` expansion), command/args and volumes, so logs, exit codes,
exec and port-forward reach real processes.

Networking: every pod of one top object (the owner at the end of the controller chain: a
JobSet, a PyTorchJob, a RayJob…) joins one network namespace held by a sleeping "netns"
container with network mode `none`, as experiments/engines/docker.py does; the netns
container's /etc/hosts (shared by every container that joins it) maps the pods' names,
hostnames, `hostname.subdomain` and the Services' names to 127.0.0.1. No bridge network is
ever created. Two pods of one top object therefore share ports, unlike on a real cluster.

The node has no accelerators: a pod requesting `nvidia.com/gpu` (or `google.com/tpu`,
`amd.com/gpu`) stays Pending with the scheduler's Unschedulable condition, as does a pod whose
nodeSelector the node's labels (`node_labels`) do not satisfy. PVCs of the storage class
`unbound` (UNBOUND_CLASS) stay Pending forever, and so do the pods that mount them; any other
PVC is Bound at once to a Docker volume. Not modelled: resource limits, probes, subPath on
volumes, PVC protection finalizers, ephemeral containers."""

import copy
import os
import queue
import random
import re
import shutil
import tempfile
import threading
import time
import traceback
import uuid
from base64 import b64decode
from pathlib import Path

from docker.errors import APIError, ImageNotFound, NotFound
from docker.types import Mount

from tests.helpers import TEST_IMAGE
from tests.k8s.fake_store import BY_KIND, ApiError, Store, now

NODE = "fake-node"
UNBOUND_CLASS = "unbound"
EXTENDED = ("nvidia.com/gpu", "google.com/tpu", "amd.com/gpu")
SERVER_LABEL = "aichor.fake-k8s"
POD_LABEL = "aichor.fake-k8s.pod"
NETNS_LABEL = "aichor.fake-k8s.netns"
PREEMPTION_USELESS = "preemption: 0/1 nodes are available: 1 Preemption is not helpful for scheduling."
NO_VICTIMS = "preemption: 0/1 nodes are available: 1 No preemption victims found for incoming pod."
POD = BY_KIND["Pod"]


def _owned_by(uid: str):
    """A change for `Store.mutate` that applies only to the object with this uid: a pod of the
    same name from a later test must never receive an old runner's status."""

    def wrap(change):
        def apply(obj: dict) -> None:
            if obj["metadata"]["uid"] == uid:
                change(obj)

        return apply

    return wrap


class ConfigError(Exception):
    """CreateContainerConfigError: the pod names a Secret, ConfigMap or key that is not there."""


class Kubelet:
    def __init__(self, store: Store, docker_client, node_labels: dict | None = None) -> None:
        self.store = store
        self.docker = docker_client
        self.server_id = uuid.uuid4().hex[:8]
        self.default_node_labels = node_labels or {
            "kubernetes.io/hostname": NODE,
            "kubernetes.io/os": "linux",
            "kubernetes.io/arch": "amd64",
        }
        # A test may add labels (a GPU product, so that only the missing GPUs keep a pod
        # Pending) or capacity; reset() restores these.
        self.node_labels = dict(self.default_node_labels)
        self.capacity = dict.fromkeys(EXTENDED, 0)
        self.stopped = threading.Event()
        self.queue: queue.Queue = queue.Queue()
        self.lock = threading.Lock()
        self.busy = threading.Lock()  # held while one change is handled
        self.runners: dict[str, PodRunner] = {}
        self.netns: dict[str, str] = {}  # top object uid -> netns container id
        self.netns_users: dict[str, set[str]] = {}
        self.hosts_lock = threading.Lock()
        self.scheduling_reported: set[tuple[str, str]] = set()
        store.listeners.append(self._on_change)
        self._thread = threading.Thread(target=self._loop, name="fake-kubelet", daemon=True)
        self._thread.start()

    # -- events from the store (called under its lock: only queue them)
    def _on_change(self, kind: str, res, obj: dict) -> None:
        if res.kind in ("Pod", "PersistentVolumeClaim"):
            self.queue.put((kind, res.kind, obj))

    def _loop(self) -> None:
        retried = time.monotonic()
        while not self.stopped.is_set():
            if time.monotonic() - retried > 1:  # the scheduler retries unschedulable pods
                retried = time.monotonic()
                for pod in self.store.list(POD, None)[0]:
                    if not pod["spec"].get("nodeName") and not pod["metadata"].get("deletionTimestamp"):
                        self.queue.put(("MODIFIED", "Pod", pod))
            try:
                kind, res_kind, obj = self.queue.get(timeout=0.2)
            except queue.Empty:
                continue
            try:
                with self.busy:
                    if res_kind == "Pod":
                        self._pod_changed(kind, obj)
                    else:
                        self._pvc_changed(kind, obj)
            except Exception:  # a fake's bug must not stop the node; the test sees the pod stuck
                traceback.print_exc()

    def _pod_changed(self, kind: str, pod: dict) -> None:
        meta = pod["metadata"]
        uid = meta["uid"]
        if kind == "DELETED":
            runner = self.runners.get(uid)
            if runner:
                threading.Thread(target=runner.stop, args=(0,), daemon=True).start()
            return
        if meta.get("deletionTimestamp"):
            runner = self.runners.get(uid)
            if runner:
                threading.Thread(
                    target=runner.stop, args=(meta.get("deletionGracePeriodSeconds", 30),), daemon=True
                ).start()
            else:
                self.store.finalize_pod(meta["namespace"], meta["name"], uid)
            return
        if not pod["spec"].get("nodeName") and uid not in self.runners:
            self._schedule(pod)

    def _pvc_changed(self, kind: str, pvc: dict) -> None:
        meta = pvc["metadata"]
        if kind == "DELETED":
            try:
                self.docker.api.remove_volume(self._pvc_volume(pvc), force=True)
            except (NotFound, APIError):
                pass
            return
        if kind == "ADDED" and pvc["spec"].get("storageClassName") != UNBOUND_CLASS:
            requested = ((pvc["spec"].get("resources") or {}).get("requests") or {}).get("storage", "1Gi")

            def bind(obj: dict) -> None:
                obj["spec"]["volumeName"] = f"pvc-{meta['uid']}"

            def bound(obj: dict) -> None:
                obj["status"] = {
                    "phase": "Bound",
                    "accessModes": obj["spec"].get("accessModes") or ["ReadWriteOnce"],
                    "capacity": {"storage": requested},
                }

            self.store.mutate(
                BY_KIND["PersistentVolumeClaim"], meta["namespace"], meta["name"], _owned_by(meta["uid"])(bind)
            )
            self.store.mutate(
                BY_KIND["PersistentVolumeClaim"],
                meta["namespace"],
                meta["name"],
                _owned_by(meta["uid"])(bound),
                subresource="status",
            )
            # Pods waiting for this claim may now fit.
            for pod in self.store.list(POD, meta["namespace"])[0]:
                if not pod["spec"].get("nodeName") and not pod["metadata"].get("deletionTimestamp"):
                    self.queue.put(("MODIFIED", "Pod", pod))

    # -- the scheduler
    def _unschedulable(self, pod: dict) -> str | None:
        spec = pod["spec"]
        selector = spec.get("nodeSelector") or {}
        if any(self.node_labels.get(k) != v for k, v in selector.items()):
            return f"0/1 nodes are available: 1 node(s) didn't match Pod's node affinity/selector. {PREEMPTION_USELESS}"
        for name in EXTENDED:
            wanted = 0
            for c in spec.get("containers") or []:
                resources = c.get("resources") or {}
                value = (resources.get("limits") or {}).get(name) or (resources.get("requests") or {}).get(name) or 0
                wanted += int(value)
            if wanted > self.capacity[name]:
                return f"0/1 nodes are available: 1 Insufficient {name}. {NO_VICTIMS}"
        for volume in spec.get("volumes") or []:
            claim = (volume.get("persistentVolumeClaim") or {}).get("claimName")
            if claim:
                pvc = self.store.find(BY_KIND["PersistentVolumeClaim"], pod["metadata"]["namespace"], claim)
                if pvc is None:
                    return f'0/1 nodes are available: persistentvolumeclaim "{claim}" not found. {PREEMPTION_USELESS}'
                if (pvc.get("status") or {}).get("phase") != "Bound":
                    return f"0/1 nodes are available: pod has unbound immediate PersistentVolumeClaims. {PREEMPTION_USELESS}"
        return None

    def _schedule(self, pod: dict) -> None:
        meta = pod["metadata"]
        ns, name, uid = meta["namespace"], meta["name"], meta["uid"]
        owned = _owned_by(uid)
        message = self._unschedulable(pod)
        if message:

            def pending(obj: dict) -> None:
                conditions = [c for c in obj["status"].get("conditions") or [] if c["type"] != "PodScheduled"]
                old = next((c for c in obj["status"].get("conditions") or [] if c["type"] == "PodScheduled"), None)
                if old and old.get("message") == message:
                    return
                conditions.append(
                    {
                        "type": "PodScheduled",
                        "status": "False",
                        "reason": "Unschedulable",
                        "message": message,
                        "lastTransitionTime": now(),
                    }
                )
                obj["status"]["conditions"] = conditions

            self.store.mutate(POD, ns, name, owned(pending), subresource="status")
            if (uid, message) not in self.scheduling_reported:
                self.scheduling_reported.add((uid, message))
                self.event(pod, "Warning", "FailedScheduling", message, source="default-scheduler")
            return

        def bind(obj: dict) -> None:
            obj["spec"]["nodeName"] = NODE

        def scheduled(obj: dict) -> None:
            conditions = [c for c in obj["status"].get("conditions") or [] if c["type"] != "PodScheduled"]
            conditions.append({"type": "PodScheduled", "status": "True", "lastTransitionTime": now()})
            obj["status"]["conditions"] = conditions

        self.store.mutate(POD, ns, name, owned(bind))
        bound = self.store.mutate(POD, ns, name, owned(scheduled), subresource="status")
        if bound is None or bound["metadata"]["uid"] != uid:
            return
        self.event(
            pod, "Normal", "Scheduled", f"Successfully assigned {ns}/{name} to {NODE}", source="default-scheduler"
        )
        runner = PodRunner(self, bound)
        with self.lock:
            self.runners[uid] = runner
        threading.Thread(target=runner.run, name=f"fake-pod-{name}", daemon=True).start()

    def event(self, obj: dict, type_: str, reason: str, message: str, *, source: str = "kubelet") -> None:
        meta = obj["metadata"]
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": f"{meta['name']}.{uuid.uuid4().hex[:16]}", "namespace": meta["namespace"]},
            "involvedObject": {
                "apiVersion": obj["apiVersion"],
                "kind": obj["kind"],
                "name": meta["name"],
                "namespace": meta["namespace"],
                "uid": meta["uid"],
            },
            "type": type_,
            "reason": reason,
            "message": message,
            "source": {"component": source, **({"host": NODE} if source == "kubelet" else {})},
            "firstTimestamp": now(),
            "lastTimestamp": now(),
            "count": 1,
            "reportingComponent": source,
            "reportingInstance": NODE if source == "kubelet" else "",
        }
        try:
            self.store.create(BY_KIND["Event"], meta["namespace"], event)
        except ApiError:
            pass  # the namespace is going away

    # -- networking
    def root_of(self, obj: dict) -> dict:
        seen = set()
        while True:
            refs = obj["metadata"].get("ownerReferences") or []
            ref = next((r for r in refs if r.get("controller")), refs[0] if refs else None)
            if not ref or ref["uid"] in seen:
                return obj
            seen.add(ref["uid"])
            found = self.store.by_uid(ref["uid"])
            if not found:
                return obj
            obj = found[1]

    def netns_of(self, pod: dict) -> str | None:
        runner = self.runners.get(pod["metadata"]["uid"])
        return runner.netns if runner else None

    def acquire_netns(self, root_uid: str, pod_uid: str) -> str:
        with self.lock:
            self.netns_users.setdefault(root_uid, set()).add(pod_uid)
            if root_uid in self.netns:
                return self.netns[root_uid]
            api = self.docker.api
            created = api.create_container(
                TEST_IMAGE,
                entrypoint=["/bin/sh", "-c"],
                command=["while :; do sleep 3600; done"],
                name=f"fk8s-{self.server_id}-netns-{root_uid[:8]}-{random.randrange(16**4):04x}",
                labels={SERVER_LABEL: self.server_id, NETNS_LABEL: root_uid},
                host_config=api.create_host_config(network_mode="none"),
            )
            api.start(created["Id"])
            self.netns[root_uid] = created["Id"]
            return created["Id"]

    def release_netns(self, root_uid: str, pod_uid: str) -> None:
        with self.lock:
            users = self.netns_users.get(root_uid, set())
            users.discard(pod_uid)
            if users or root_uid not in self.netns:
                return
            cid = self.netns.pop(root_uid)
            self.netns_users.pop(root_uid, None)
        try:
            self.docker.api.remove_container(cid, force=True)
        except (NotFound, APIError):
            pass

    def write_hosts(self, root_uid: str, ns: str, netns: str) -> None:
        """Every pod and Service under the same top object, by every name a cluster's DNS gives
        them, on the shared loopback."""
        names: list[str] = []
        with self.store.lock:
            for res_kind in ("Pod", "Service"):
                for obj in self.store.list(BY_KIND[res_kind], ns)[0]:
                    if self.root_of(obj)["metadata"]["uid"] != root_uid and res_kind == "Pod":
                        continue
                    name = obj["metadata"]["name"]
                    if res_kind == "Service":
                        names += [name, f"{name}.{ns}", f"{name}.{ns}.svc", f"{name}.{ns}.svc.cluster.local"]
                        continue
                    names.append(name)
                    hostname, subdomain = obj["spec"].get("hostname"), obj["spec"].get("subdomain")
                    if hostname:
                        names.append(hostname)
                        if subdomain:
                            names += [
                                f"{hostname}.{subdomain}",
                                f"{hostname}.{subdomain}.{ns}.svc",
                                f"{hostname}.{subdomain}.{ns}.svc.cluster.local",
                            ]
        lines = ["127.0.0.1\tlocalhost", *(f"127.0.0.1\t{n}" for n in dict.fromkeys(names))]
        with self.hosts_lock:
            self.docker.api.exec_start(
                self.docker.api.exec_create(netns, ["sh", "-c", 'printf "%s\\n" "$@" > /etc/hosts', "sh", *lines])["Id"]
            )

    # -- volumes
    def _pvc_volume(self, pvc: dict) -> str:
        return f"fk8s-{self.server_id}-pvc-{pvc['metadata']['uid']}"

    # -- lifecycle
    def remove_everything(self) -> None:
        with self.busy:  # no pod is being scheduled meanwhile
            self._remove_everything()

    def _remove_everything(self) -> None:
        while not self.queue.empty():  # changes to objects that are about to vanish
            try:
                self.queue.get_nowait()
            except queue.Empty:
                break
        with self.lock:
            runners = list(self.runners.values())
            self.runners.clear()
        for runner in runners:
            runner.stopping.set()
        api = self.docker.api
        for c in api.containers(all=True, filters={"label": f"{SERVER_LABEL}={self.server_id}"}):
            try:
                api.remove_container(c["Id"], force=True, v=True)
            except (NotFound, APIError):
                pass
        for v in api.volumes(filters={"label": f"{SERVER_LABEL}={self.server_id}"}).get("Volumes") or []:
            try:
                api.remove_volume(v["Name"], force=True)
            except (NotFound, APIError):
                pass
        for runner in runners:
            runner.remove_files()
        with self.lock:
            self.netns.clear()
            self.netns_users.clear()
        self.scheduling_reported.clear()
        self.node_labels = dict(self.default_node_labels)
        self.capacity = dict.fromkeys(EXTENDED, 0)

    def stop(self) -> None:
        self.stopped.set()
        self.remove_everything()
        if self._on_change in self.store.listeners:
            self.store.listeners.remove(self._on_change)


_VAR = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' `$(VAR)` expansion: defined variables only, `$$` escapes."""
    return _VAR.sub(lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)), text)


_FIELD = re.compile(r"^metadata\.(labels|annotations)\['(.+)'\]$")


class PodRunner:
    """One pod on the node: its containers, their restarts, and its status."""

    def __init__(self, kubelet: Kubelet, pod: dict) -> None:
        self.kubelet = kubelet
        self.store = kubelet.store
        self.api = kubelet.docker.api
        self.pod = pod
        meta = pod["metadata"]
        self.ns, self.name, self.uid = meta["namespace"], meta["name"], meta["uid"]
        self.owned = _owned_by(self.uid)
        self.stopping = threading.Event()
        self.containers: dict[str, str] = {}
        self.volumes: list[str] = []
        self.dirs: list[str] = []
        self.netns: str | None = None
        self.root_uid = kubelet.root_of(pod)["metadata"]["uid"]
        self.started_at = now()
        self.stopped = threading.Event()

    # -- status
    def _status(self, change) -> None:
        self.store.mutate(POD, self.ns, self.name, self.owned(change), subresource="status")

    def _set_container(self, name: str, image: str, *, init: bool = False, **fields) -> None:
        key = "initContainerStatuses" if init else "containerStatuses"

        def change(obj: dict) -> None:
            statuses = obj["status"].setdefault(key, [])
            entry = next((s for s in statuses if s["name"] == name), None)
            if entry is None:
                entry = {
                    "name": name,
                    "image": image,
                    "imageID": "",
                    "ready": False,
                    "restartCount": 0,
                    "started": False,
                }
                statuses.append(entry)
            entry.update(copy.deepcopy(fields))
            _phase(obj)

        self._status(change)

    # -- running
    def run(self) -> None:
        spec = self.pod["spec"]
        try:
            self.netns = self.kubelet.acquire_netns(self.root_uid, self.uid)
            self.kubelet.write_hosts(self.root_uid, self.ns, self.netns)
            mounts = self._volumes()
        except Exception as exc:
            self.kubelet.event(self.pod, "Warning", "FailedMount", str(exc))
            return

        def started(obj: dict) -> None:
            obj["status"].update(
                {"hostIP": "127.0.0.1", "hostIPs": [{"ip": "127.0.0.1"}], "startTime": self.started_at}
            )
            obj["status"]["podIP"] = "127.0.0.1"
            obj["status"]["podIPs"] = [{"ip": "127.0.0.1"}]
            for c in spec["containers"]:
                statuses = obj["status"].setdefault("containerStatuses", [])
                if not any(s["name"] == c["name"] for s in statuses):
                    statuses.append(_waiting(c, "ContainerCreating"))
            _phase(obj)

        self._status(started)
        for c in spec.get("initContainers") or []:
            if not self._run_container(c, mounts, init=True) or self.stopping.is_set():
                return
        threads = [
            threading.Thread(target=self._run_container, args=(c, mounts), daemon=True) for c in spec["containers"]
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    def _run_container(self, c: dict, mounts: dict, *, init: bool = False) -> bool:
        """Runs `c` until it ends for good; True when it succeeded."""
        name, image = c["name"], c["image"]
        if not self._pull(c, init):
            return False
        try:
            env = self._env(c)
        except ConfigError as exc:
            self._set_container(
                name, image, init=init, state={"waiting": {"reason": "CreateContainerConfigError", "message": str(exc)}}
            )
            self.kubelet.event(self.pod, "Warning", "Failed", f"Error: {exc}")
            return False
        values = dict(env)
        command = [expand(a, values) for a in c.get("command") or []]
        args = [expand(a, values) for a in c.get("args") or []]
        docker_mounts, shm = [], None
        for vm in c.get("volumeMounts") or []:
            target = mounts.get(vm["name"])
            if target is None:
                continue
            kind, source = target
            if kind == "shm":
                if vm["mountPath"] == "/dev/shm":
                    shm = source
                    continue
                kind, source = "tmpfs", None
            if kind == "tmpfs":
                docker_mounts.append(Mount(vm["mountPath"], None, type="tmpfs"))
            elif kind == "bind":
                path = os.path.join(source, vm["subPath"]) if vm.get("subPath") else source
                docker_mounts.append(Mount(vm["mountPath"], path, type="bind", read_only=bool(vm.get("readOnly"))))
            else:
                docker_mounts.append(Mount(vm["mountPath"], source, type="volume", read_only=bool(vm.get("readOnly"))))
        try:
            created = self.api.create_container(
                image,
                entrypoint=command or None,
                command=args or None,
                environment=[f"{k}={v}" for k, v in env],
                working_dir=c.get("workingDir"),
                tty=bool(c.get("tty")),
                stdin_open=bool(c.get("stdin")),
                name=f"fk8s-{self.kubelet.server_id}-{self.name[:40]}-{name[:20]}-{self.uid[:6]}",
                labels={
                    SERVER_LABEL: self.kubelet.server_id,
                    POD_LABEL: f"{self.ns}/{self.name}",
                    "aichor.fake-k8s.uid": self.uid,
                },
                host_config=self.api.create_host_config(
                    network_mode=f"container:{self.netns}", mounts=docker_mounts, shm_size=shm
                ),
            )
        except APIError as exc:
            message = exc.explanation or str(exc)
            self._set_container(
                name, image, init=init, state={"waiting": {"reason": "CreateContainerError", "message": message}}
            )
            self.kubelet.event(self.pod, "Warning", "Failed", f"Error: {message}")
            return False
        cid = created["Id"]
        self.containers[name] = cid
        if self.stopping.is_set():  # deleted while the container was being made
            self.api.remove_container(cid, force=True)
            return False
        restarts = 0
        policy = self.pod["spec"].get("restartPolicy", "Always")
        if init and policy == "Always":
            policy = "OnFailure"  # init containers never restart after success
        last_state: dict = {}
        while True:
            if self.stopping.is_set():
                return False
            started_at = now()
            try:
                self.api.start(cid)
            except (APIError, NotFound) as exc:
                self._set_container(
                    name, image, init=init, state={"waiting": {"reason": "RunContainerError", "message": str(exc)}}
                )
                return False
            self._set_container(
                name,
                image,
                init=init,
                containerID=f"docker://{cid}",
                imageID=f"docker-pullable://{image}",
                state={"running": {"startedAt": started_at}},
                lastState=last_state,
                ready=not init,
                started=True,
                restartCount=restarts,
            )
            if restarts == 0:
                self.kubelet.event(self.pod, "Normal", "Started", f"Started container {name}")
            try:
                result = self.api.wait(cid)
                code = result.get("StatusCode", 1)
                oom = self.api.inspect_container(cid)["State"].get("OOMKilled")
            except (APIError, NotFound):
                return False  # removed under us: the pod is being deleted
            if self.stopping.is_set():
                return False
            terminated = {
                "exitCode": code,
                "reason": "OOMKilled" if oom else ("Completed" if code == 0 else "Error"),
                "startedAt": started_at,
                "finishedAt": now(),
                "containerID": f"docker://{cid}",
            }
            if policy == "Always" or (policy == "OnFailure" and code != 0):
                restarts += 1
                last_state = {"terminated": terminated}
                self._set_container(
                    name,
                    image,
                    init=init,
                    state={
                        "waiting": {
                            "reason": "CrashLoopBackOff",
                            "message": f"back-off restarting failed container {name}",
                        }
                    },
                    lastState=last_state,
                    ready=False,
                    restartCount=restarts,
                )
                if self.stopping.wait(min(0.5 * 2 ** (restarts - 1), 5)):
                    return False
                continue
            self._set_container(name, image, init=init, state={"terminated": terminated}, ready=False, started=False)
            return code == 0

    def _pull(self, c: dict, init: bool) -> bool:
        image, policy = c["image"], c.get("imagePullPolicy", "IfNotPresent")
        attempts = 0
        while not self.stopping.is_set():
            try:
                if policy != "Always":
                    try:
                        self.kubelet.docker.images.get(image)
                        return True
                    except ImageNotFound:
                        if policy == "Never":
                            message = f'Container image "{image}" is not present with pull policy of Never'
                            self._set_container(
                                c["name"],
                                image,
                                init=init,
                                state={"waiting": {"reason": "ErrImageNeverPull", "message": message}},
                            )
                            return False
                repository, _, tag = (
                    image.rpartition(":") if "@" not in image and ":" in image.rsplit("/", 1)[-1] else (image, "", None)
                )
                self.api.pull(repository, tag=tag or None)
                return True
            except (APIError, NotFound) as exc:
                attempts += 1
                reason = "ErrImagePull" if attempts == 1 else "ImagePullBackOff"
                message = (
                    f'Failed to pull image "{image}": {exc.explanation or exc}'
                    if attempts == 1
                    else f'Back-off pulling image "{image}"'
                )
                self._set_container(
                    c["name"], image, init=init, state={"waiting": {"reason": reason, "message": message}}
                )
                if attempts == 1:
                    self.kubelet.event(self.pod, "Warning", "Failed", message)
                self.stopping.wait(2)
        return False

    def _env(self, c: dict) -> list[tuple[str, str]]:
        meta = self.store.find(POD, self.ns, self.name) or self.pod
        meta = meta["metadata"]
        env: dict[str, str] = {}
        for source in c.get("envFrom") or []:
            prefix = source.get("prefix", "")
            for key, value in self._data(
                source.get("secretRef") or source.get("configMapRef"), "secretRef" in source
            ).items():
                env[prefix + key] = value
        for item in c.get("env") or []:
            if "value" in item or "valueFrom" not in item:
                env[item["name"]] = expand(item.get("value", ""), env)
                continue
            ref = item["valueFrom"]
            if "fieldRef" in ref:
                path = ref["fieldRef"]["fieldPath"]
                m = _FIELD.match(path)
                if m:
                    value = (meta.get(m.group(1)) or {}).get(m.group(2), "")
                else:
                    value = {
                        "metadata.name": meta["name"],
                        "metadata.namespace": meta["namespace"],
                        "metadata.uid": meta["uid"],
                        "spec.nodeName": NODE,
                        "spec.serviceAccountName": self.pod["spec"].get("serviceAccountName", "default"),
                        "status.podIP": "127.0.0.1",
                        "status.hostIP": "127.0.0.1",
                        "status.podIPs": "127.0.0.1",
                    }.get(path, "")
                env[item["name"]] = value
            elif "secretKeyRef" in ref or "configMapKeyRef" in ref:
                secret = "secretKeyRef" in ref
                key_ref = ref["secretKeyRef" if secret else "configMapKeyRef"]
                try:
                    data = self._data(key_ref, secret)
                except ConfigError:
                    if key_ref.get("optional"):
                        continue
                    raise
                if key_ref["key"] not in data:
                    if key_ref.get("optional"):
                        continue
                    raise ConfigError(
                        f"couldn't find key {key_ref['key']} in {'Secret' if secret else 'ConfigMap'} {self.ns}/{key_ref['name']}"
                    )
                env[item["name"]] = data[key_ref["key"]]
            elif "resourceFieldRef" in ref:
                env[item["name"]] = "0"
        return list(env.items())

    def _data(self, ref: dict | None, secret: bool) -> dict[str, str]:
        if not ref:
            return {}
        kind = "Secret" if secret else "ConfigMap"
        obj = self.store.find(BY_KIND[kind], self.ns, ref["name"])
        if obj is None:
            if ref.get("optional"):
                return {}
            raise ConfigError(f'{kind.lower()} "{ref["name"]}" not found')
        if secret:
            return {k: b64decode(v).decode(errors="replace") for k, v in (obj.get("data") or {}).items()}
        return dict(obj.get("data") or {})

    def _volumes(self) -> dict[str, tuple[str, str | None]]:
        """volume name -> (docker mount type, source)."""
        out: dict[str, tuple[str, str | None]] = {}
        labels = {SERVER_LABEL: self.kubelet.server_id}
        for v in self.pod["spec"].get("volumes") or []:
            name = v["name"]
            if "emptyDir" in v:
                empty = v["emptyDir"] or {}
                if empty.get("medium") == "Memory":
                    out[name] = ("shm", _bytes(empty.get("sizeLimit") or "1Gi"))
                    continue
                volume = f"fk8s-{self.kubelet.server_id}-{self.uid[:8]}-{name}"
                self.api.create_volume(volume, labels=labels)
                self.volumes.append(volume)
                out[name] = ("volume", volume)
            elif "persistentVolumeClaim" in v:
                pvc = self.store.get(BY_KIND["PersistentVolumeClaim"], self.ns, v["persistentVolumeClaim"]["claimName"])
                volume = self.kubelet._pvc_volume(pvc)
                self.api.create_volume(volume, labels=labels)  # idempotent for one name
                out[name] = ("volume", volume)
            elif "secret" in v or "configMap" in v:
                secret = "secret" in v
                ref = v["secret"] if secret else v["configMap"]
                data = self._data(
                    {"name": ref.get("secretName" if secret else "name"), "optional": ref.get("optional")}, secret
                )
                folder = tempfile.mkdtemp(prefix="fk8s-vol-")
                os.chmod(folder, 0o755)
                self.dirs.append(folder)
                items = ref.get("items")
                for key, value in data.items():
                    paths = [i["path"] for i in items if i["key"] == key] if items else [key]
                    for path in paths:
                        Path(folder, path).parent.mkdir(parents=True, exist_ok=True)
                        Path(folder, path).write_text(value)
                out[name] = ("bind", folder)
            elif "hostPath" in v:
                out[name] = ("bind", v["hostPath"]["path"])
            else:  # downwardAPI, projected…: an empty folder
                folder = tempfile.mkdtemp(prefix="fk8s-vol-")
                self.dirs.append(folder)
                out[name] = ("bind", folder)
        return out

    # -- stopping
    def stop(self, grace: int) -> None:
        """The pod is being deleted: stop its containers (SIGTERM, then SIGKILL after a grace
        cut to at most a second to keep tests quick), remove them, then let the object go."""
        if self.stopped.is_set():
            return
        self.stopping.set()
        for cid in list(self.containers.values()):
            try:
                if grace:
                    self.api.stop(cid, timeout=min(int(grace), 1))
                self.api.remove_container(cid, force=True)
            except (NotFound, APIError):
                pass
        for volume in self.volumes:
            try:
                self.api.remove_volume(volume, force=True)
            except (NotFound, APIError):
                pass
        self.remove_files()
        with self.kubelet.lock:
            self.kubelet.runners.pop(self.uid, None)
        self.kubelet.release_netns(self.root_uid, self.uid)
        self.stopped.set()
        self.store.finalize_pod(self.ns, self.name, self.uid)

    def remove_files(self) -> None:
        for folder in self.dirs:
            shutil.rmtree(folder, ignore_errors=True)


def _waiting(c: dict, reason: str) -> dict:
    return {
        "name": c["name"],
        "image": c["image"],
        "imageID": "",
        "ready": False,
        "restartCount": 0,
        "started": False,
        "state": {"waiting": {"reason": reason}},
    }


def _phase(pod: dict) -> None:
    """Phase and conditions from the container statuses, as the kubelet computes them."""
    status = pod["status"]
    statuses = status.get("containerStatuses") or []
    names = [c["name"] for c in pod["spec"]["containers"]]
    states = {s["name"]: s.get("state") or {} for s in statuses}
    terminated = [states[n]["terminated"] for n in names if "terminated" in states.get(n, {})]
    running = [n for n in names if "running" in states.get(n, {})]
    init_failed = (
        any(
            "terminated" in (s.get("state") or {}) and s["state"]["terminated"]["exitCode"] != 0
            for s in status.get("initContainerStatuses") or []
        )
        and pod["spec"].get("restartPolicy") == "Never"
    )
    if init_failed:
        status["phase"] = "Failed"
    elif len(terminated) == len(names):
        status["phase"] = "Succeeded" if all(t["exitCode"] == 0 for t in terminated) else "Failed"
    elif running or status.get("phase") == "Running":
        status["phase"] = "Running"
    ready = bool(running) and len(running) == len(names)
    stamp = now()
    conditions = {c["type"]: c for c in status.get("conditions") or []}
    initialized = not pod["spec"].get("initContainers") or all(
        "terminated" in (s.get("state") or {}) for s in status.get("initContainerStatuses") or []
    )
    wanted = {
        "PodReadyToStartContainers": "True",
        "Initialized": "True" if initialized else "False",
        "Ready": "True" if ready else "False",
        "ContainersReady": "True" if ready else "False",
    }
    for type_, value in wanted.items():
        old = conditions.get(type_)
        if old and old["status"] == value:
            continue
        conditions[type_] = {"type": type_, "status": value, "lastTransitionTime": stamp}
        if value == "False" and type_ in ("Ready", "ContainersReady"):
            reason = "PodCompleted" if status.get("phase") in ("Succeeded", "Failed") else "ContainersNotReady"
            conditions[type_]["reason"] = reason
    status["conditions"] = list(conditions.values())


def _bytes(quantity: str) -> int:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
    m = re.match(r"^([0-9.]+)([A-Za-z]*)$", str(quantity))
    if not m:
        return 2**30
    return int(float(m.group(1)) * units.get(m.group(2), 1))
