"""Stand-ins for the controllers of the fake cluster (a fake: no cluster can run here): the
core Job controller, JobSet v0.12.0, the Kubeflow Training Operator v1.9.4 (PyTorchJob,
XGBoostJob, JAXJob, TFJob) and KubeRay v1.7.0 (RayJob, RayCluster). They create the objects the
real ones would — names, labels, annotations, injected variables and status shapes from
shared/k8s/STATUS.md — with owner references, and the kubelet (kubelet.py) runs the pods.

Simplifications (documented, so tests do not lean on them): no JobSet failure-policy restarts,
success policies or startup ordering; no Kubeflow elastic/gang scheduling, init containers or
backoff; KubeRay runs no Ray: a head or worker container without a command sleeps (standing in
for `ray start --block`), the cluster is `ready` once its pods run, and the submitter pod runs
the RayJob's `entrypoint` with `/bin/sh -c` (instead of `ray job submit … -- entrypoint`), so
its exit code decides the RayJob (SUCCEEDED/Complete, or FAILED/Failed with reason AppFailed)."""

import copy
import hashlib
import json
import queue
import random
import threading
import time
import traceback
from datetime import UTC, datetime

from tests.k8s.fake_store import BY_KIND, NAME_CHARS, ApiError, Store, now

JOB, POD, SERVICE = BY_KIND["Job"], BY_KIND["Pod"], BY_KIND["Service"]
KUBEFLOW = {
    # kind: (replica specs field, default container, port name, port, operator name)
    "PyTorchJob": ("pytorchReplicaSpecs", "pytorch", "pytorchjob-port", 23456, "pytorchjob-controller"),
    "XGBoostJob": ("xgbReplicaSpecs", "xgboost", "xgboostjob-port", 9999, "xgboostjob-controller"),
    "JAXJob": ("jaxReplicaSpecs", "jax", "jaxjob-port", 6666, "jaxjob-controller"),
    "TFJob": ("tfReplicaSpecs", "tensorflow", "tfjob-port", 2222, "tfjob-controller"),
}
# A Ray node without a command of its own: stands for `ray start … --block`.
RAY_NODE_COMMAND = ["/bin/sh", "-c", "while :; do sleep 3600; done"]
RETRYABLE_EXIT_CODES = {130, 137, 143}  # the training operator's ExitCode restart policy


def owner_ref(obj: dict) -> dict:
    return {
        "apiVersion": obj["apiVersion"],
        "kind": obj["kind"],
        "name": obj["metadata"]["name"],
        "uid": obj["metadata"]["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def controlled_by(obj: dict, owner: dict) -> bool:
    return any(
        r.get("uid") == owner["metadata"]["uid"] and r.get("controller")
        for r in obj["metadata"].get("ownerReferences") or []
    )


def condition(conditions: list, type_: str) -> dict | None:
    return next((c for c in conditions or [] if c.get("type") == type_), None)


def is_true(conditions: list, type_: str) -> bool:
    found = condition(conditions, type_)
    return bool(found and found.get("status") == "True")


def _suffix() -> str:
    return "".join(random.choices(NAME_CHARS, k=5))


def _seconds_since(stamp: str | None) -> float:
    if not stamp:
        return 0.0
    return (datetime.now(UTC) - datetime.fromisoformat(stamp.replace("Z", "+00:00"))).total_seconds()


class Operators:
    """One controller thread: every change to a pod, Job or top object queues the object that
    controls it; a periodic resync catches deadlines."""

    TOP = ("Job", "JobSet", "PyTorchJob", "XGBoostJob", "JAXJob", "TFJob", "RayJob", "RayCluster")

    def __init__(self, store: Store) -> None:
        self.store = store
        self.queue: queue.Queue = queue.Queue()
        self.stopped = threading.Event()
        self.paused = threading.Event()
        self.busy = threading.Lock()
        store.listeners.append(self._on_change)
        self._thread = threading.Thread(target=self._loop, name="fake-operators", daemon=True)
        self._thread.start()

    def _on_change(self, kind: str, res, obj: dict) -> None:
        if self.paused.is_set():
            return
        meta = obj["metadata"]
        if res.kind in self.TOP and kind != "DELETED":
            self.queue.put((res.kind, meta.get("namespace"), meta["name"]))
        for ref in meta.get("ownerReferences") or []:
            if ref.get("controller") and ref.get("kind") in self.TOP:
                self.queue.put((ref["kind"], meta.get("namespace"), ref["name"]))

    def pause(self) -> None:
        self.paused.set()
        with self.busy:  # a reconcile under way finishes before the cluster is emptied
            pass
        while not self.queue.empty():
            try:
                self.queue.get_nowait()
            except queue.Empty:
                break

    def resume(self) -> None:
        self.paused.clear()

    def stop(self) -> None:
        self.stopped.set()
        if self._on_change in self.store.listeners:
            self.store.listeners.remove(self._on_change)

    def _loop(self) -> None:
        last_resync = time.monotonic()
        while not self.stopped.is_set():
            try:
                item = self.queue.get(timeout=0.5)
            except queue.Empty:
                item = None
            if time.monotonic() - last_resync > 1 and not self.paused.is_set():
                last_resync = time.monotonic()
                self._resync()
            if item is None or self.paused.is_set():
                continue
            # Coalesce: one reconcile per object however many changes queued it.
            batch = {item}
            while True:
                try:
                    batch.add(self.queue.get_nowait())
                except queue.Empty:
                    break
            with self.busy:
                self._reconcile_batch(batch)

    def _reconcile_batch(self, batch) -> None:
        for kind, ns, name in batch:
            if self.paused.is_set():
                return
            try:
                self.reconcile(kind, ns, name)
            except ApiError as exc:
                if exc.code not in (404, 409, 403):  # races with deletion are normal
                    traceback.print_exc()
            except Exception:  # a fake's bug shows in the test output, and the loop goes on
                traceback.print_exc()

    def _resync(self) -> None:
        """Deadlines pass without any change to queue the object."""
        for kind in ("Job", "PyTorchJob", "XGBoostJob", "JAXJob", "TFJob", "RayJob"):
            for obj in self.store.list(BY_KIND[kind], None)[0]:
                spec = obj.get("spec") or {}
                deadline = spec.get("activeDeadlineSeconds") or (spec.get("runPolicy") or {}).get(
                    "activeDeadlineSeconds"
                )
                if deadline:
                    self.queue.put((kind, obj["metadata"]["namespace"], obj["metadata"]["name"]))

    def reconcile(self, kind: str, ns: str, name: str) -> None:
        obj = self.store.find(BY_KIND[kind], ns, name)
        if obj is None or obj["metadata"].get("deletionTimestamp"):
            return
        if kind == "Job":
            JobController(self.store, obj).reconcile()
        elif kind == "JobSet":
            JobSetController(self.store, obj).reconcile()
        elif kind in KUBEFLOW:
            KubeflowController(self.store, obj).reconcile()
        elif kind == "RayCluster":
            RayClusterController(self.store, obj).reconcile()
        elif kind == "RayJob":
            RayJobController(self.store, obj).reconcile()

    def children(self, res, owner: dict) -> list[dict]:
        items = self.store.list(res, owner["metadata"]["namespace"])[0]
        return [i for i in items if controlled_by(i, owner)]


class _Controller:
    def __init__(self, store: Store, obj: dict) -> None:
        self.store, self.obj = store, obj
        self.meta = obj["metadata"]
        self.ns, self.name, self.uid = self.meta["namespace"], self.meta["name"], self.meta["uid"]
        self.res = BY_KIND[obj["kind"]]

    def children(self, res) -> list[dict]:
        return [i for i in self.store.list(res, self.ns)[0] if controlled_by(i, self.obj)]

    def set_status(self, change) -> dict | None:
        uid = self.uid

        def apply(obj: dict) -> None:
            if obj["metadata"]["uid"] == uid:
                obj["status"] = obj.get("status") or {}
                change(obj["status"])

        return self.store.mutate(self.res, self.ns, self.name, apply, subresource="status")

    def create(self, res, obj: dict) -> dict | None:
        obj["metadata"].setdefault("ownerReferences", []).append(owner_ref(self.obj))
        try:
            return self.store.create(res, self.ns, obj)
        except ApiError as exc:
            if exc.code == 409:
                return None
            raise

    def delete(self, res, obj: dict) -> None:
        try:
            self.store.delete(res, self.ns, obj["metadata"]["name"], propagation="Background")
        except ApiError:
            pass


def _add_env(pod_spec: dict, variables: list[dict]) -> None:
    """Appended to every container unless the container defines the name already."""
    for c in [*(pod_spec.get("initContainers") or []), *(pod_spec.get("containers") or [])]:
        env = c.setdefault("env", [])
        names = {e["name"] for e in env}
        env.extend(v for v in variables if v["name"] not in names)


def _phase(pod: dict) -> str:
    return (pod.get("status") or {}).get("phase", "Pending")


def _active(pod: dict) -> bool:
    return _phase(pod) in ("Pending", "Running") and not pod["metadata"].get("deletionTimestamp")


def _set_condition(conditions: list, type_: str, status: str, reason: str, message: str, *, kubeflow=False) -> list:
    stamp = now()
    old = condition(conditions, type_)
    if old and old["status"] == status and old.get("reason") == reason:
        return conditions
    new = {"type": type_, "status": status, "reason": reason, "message": message}
    if kubeflow:
        new["lastUpdateTime"] = stamp
    new["lastTransitionTime"] = old["lastTransitionTime"] if old and old["status"] == status else stamp
    return [c for c in conditions if c["type"] != type_] + [new]


# --- batch/v1 Job ---------------------------------------------------------------------------
class JobController(_Controller):
    def reconcile(self) -> None:
        spec, status = self.obj["spec"], self.obj.get("status") or {}
        conditions = status.get("conditions") or []
        pods = self.children(POD)
        if is_true(conditions, "Complete") or is_true(conditions, "Failed"):
            return
        if spec.get("suspend"):
            return
        indexed = spec.get("completionMode") == "Indexed"
        completions, parallelism = spec.get("completions"), spec.get("parallelism", 1)
        restart_count = sum(
            s.get("restartCount", 0) for p in pods for s in (p.get("status") or {}).get("containerStatuses") or []
        )
        failed = [p for p in pods if _phase(p) == "Failed"]
        succeeded = [p for p in pods if _phase(p) == "Succeeded"]
        active = [p for p in pods if _active(p)]
        ready = [p for p in active if is_true((p.get("status") or {}).get("conditions"), "Ready")]
        start = status.get("startTime") or now()
        failure = None
        if len(failed) + restart_count > spec.get("backoffLimit", 6):
            failure = ("BackoffLimitExceeded", "Job has reached the specified backoff limit")
        deadline = spec.get("activeDeadlineSeconds")
        if deadline and _seconds_since(start) > deadline:
            failure = ("DeadlineExceeded", "Job was active longer than specified deadline")
        done_indexes = sorted({int(_index(p)) for p in succeeded if _index(p) is not None})
        if indexed:
            complete = len(done_indexes) >= completions
        else:
            complete = len(succeeded) >= (completions or 1) or (completions is None and succeeded and not active)
        if failure:
            for p in active:
                self.delete(POD, p)
        elif not complete:
            self._create_pods(spec, indexed, completions, parallelism, active, done_indexes, len(succeeded))

        def change(st: dict) -> None:
            st["startTime"] = start
            st["active"] = 0 if failure or complete else len(active)
            st["ready"] = len(ready)
            st["succeeded"] = len(succeeded)
            st["failed"] = len(failed)
            st["terminating"] = 0
            st["uncountedTerminatedPods"] = {}
            if indexed and done_indexes:
                st["completedIndexes"] = _ranges(done_indexes)
            conds = st.get("conditions") or []
            if failure:
                conds = _set_condition(conds, "FailureTarget", "True", failure[0], failure[1])
                conds = _set_condition(conds, "Failed", "True", failure[0], failure[1])
            elif complete:
                conds = _set_condition(
                    conds,
                    "SuccessCriteriaMet",
                    "True",
                    "CompletionsReached",
                    "Reached expected number of succeeded pods",
                )
                conds = _set_condition(
                    conds, "Complete", "True", "CompletionsReached", "Reached expected number of succeeded pods"
                )
                st["completionTime"] = now()
            if conds:
                st["conditions"] = conds

        self.set_status(change)

    def _create_pods(self, spec, indexed, completions, parallelism, active, done_indexes, n_succeeded) -> None:
        if indexed:
            busy = {_index(p) for p in active}
            missing = [i for i in range(completions) if i not in done_indexes and str(i) not in busy]
            for i in missing[: max(0, parallelism - len(active))]:
                self._create_pod(spec, i)
        else:
            remaining = (completions or parallelism) - n_succeeded
            for _ in range(max(0, min(parallelism, remaining) - len(active))):
                self._create_pod(spec, None)

    def _create_pod(self, spec: dict, index: int | None) -> None:
        template = spec["template"]
        meta = template.get("metadata") or {}
        labels = dict(meta.get("labels") or {})
        annotations = dict(meta.get("annotations") or {})
        pod_spec = _copy(template["spec"])
        generate = f"{self.name}-"
        if index is not None:
            labels["batch.kubernetes.io/job-completion-index"] = str(index)
            annotations["batch.kubernetes.io/job-completion-index"] = str(index)
            generate = f"{self.name}-{index}-"
            pod_spec.setdefault("hostname", f"{self.name}-{index}")
            _add_env(
                pod_spec,
                [
                    {
                        "name": "JOB_COMPLETION_INDEX",
                        "valueFrom": {
                            "fieldRef": {"fieldPath": "metadata.labels['batch.kubernetes.io/job-completion-index']"}
                        },
                    }
                ],
            )
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "generateName": generate,
                "labels": labels,
                **({"annotations": annotations} if annotations else {}),
            },
            "spec": pod_spec,
        }
        self.create(POD, pod)


def _index(pod: dict) -> str | None:
    return (pod["metadata"].get("annotations") or {}).get("batch.kubernetes.io/job-completion-index")


def _ranges(indexes: list[int]) -> str:
    out, start, prev = [], None, None
    for i in indexes:
        if start is None:
            start = prev = i
        elif i == prev + 1:
            prev = i
        else:
            out.append(f"{start}-{prev}" if prev > start else str(start))
            start = prev = i
    if start is not None:
        out.append(f"{start}-{prev}" if prev > start else str(start))
    return ",".join(out)


def _copy(value):
    return copy.deepcopy(value)


# --- JobSet ---------------------------------------------------------------------------------
class JobSetController(_Controller):
    def reconcile(self) -> None:
        spec, status = self.obj["spec"], self.obj.get("status") or {}
        if status.get("terminalState") or spec.get("suspend"):
            return
        network = spec.get("network") or {}
        dns = network.get("enableDNSHostnames", True)
        subdomain = network.get("subdomain") or self.name
        if dns and not self.store.find(SERVICE, self.ns, subdomain):
            self.create(
                SERVICE,
                {
                    "apiVersion": "v1",
                    "kind": "Service",
                    "metadata": {"name": subdomain, "labels": {"jobset.sigs.k8s.io/jobset-name": self.name}},
                    "spec": {
                        "clusterIP": "None",
                        "selector": {"jobset.sigs.k8s.io/jobset-name": self.name},
                        "publishNotReadyAddresses": network.get("publishNotReadyAddresses", True),
                    },
                },
            )
        jobs = {j["metadata"]["name"]: j for j in self.children(JOB)}
        rjobs = spec.get("replicatedJobs") or []
        global_replicas = sum(rj.get("replicas", 1) for rj in rjobs)
        groups: dict[str, int] = {}
        for rj in rjobs:
            groups[rj.get("groupName", "default")] = groups.get(rj.get("groupName", "default"), 0) + rj.get(
                "replicas", 1
            )
        global_index, group_index = 0, dict.fromkeys(groups, 0)
        coordinator = None
        if spec.get("coordinator"):
            c = spec["coordinator"]
            coordinator = f"{self.name}-{c['replicatedJob']}-{c.get('jobIndex', 0)}-{c.get('podIndex', 0)}.{subdomain}"
        per_rjob: list[dict] = []
        failed_job = None
        for rj in rjobs:
            counts = {"name": rj["name"], "ready": 0, "succeeded": 0, "failed": 0, "active": 0, "suspended": 0}
            group = rj.get("groupName", "default")
            for job_index in range(rj.get("replicas", 1)):
                job_name = f"{self.name}-{rj['name']}-{job_index}"
                job = jobs.get(job_name)
                if job is None:
                    keys = {
                        "jobset.sigs.k8s.io/jobset-name": self.name,
                        "jobset.sigs.k8s.io/jobset-uid": self.uid,
                        "jobset.sigs.k8s.io/replicatedjob-name": rj["name"],
                        "jobset.sigs.k8s.io/replicatedjob-replicas": str(rj.get("replicas", 1)),
                        "jobset.sigs.k8s.io/global-replicas": str(global_replicas),
                        "jobset.sigs.k8s.io/job-index": str(job_index),
                        "jobset.sigs.k8s.io/job-global-index": str(global_index),
                        "jobset.sigs.k8s.io/job-key": hashlib.sha1(f"{self.ns}/{job_name}".encode()).hexdigest(),
                        "jobset.sigs.k8s.io/restart-attempt": str(status.get("restarts", 0)),
                        "jobset.sigs.k8s.io/group-name": group,
                        "jobset.sigs.k8s.io/group-replicas": str(groups[group]),
                        "jobset.sigs.k8s.io/job-group-index": str(group_index[group]),
                        **({"jobset.sigs.k8s.io/coordinator": coordinator} if coordinator else {}),
                    }
                    template = _copy(rj["template"])
                    job_spec = template.setdefault("spec", {})
                    job_spec.setdefault("completionMode", "Indexed")
                    pod_template = job_spec.setdefault("template", {})
                    pod_meta = pod_template.setdefault("metadata", {})
                    pod_meta["labels"] = {**(pod_meta.get("labels") or {}), **keys}
                    pod_meta["annotations"] = {**(pod_meta.get("annotations") or {}), **keys}
                    pod_spec = pod_template.setdefault("spec", {})
                    pod_spec.setdefault("restartPolicy", "OnFailure")
                    if dns:
                        pod_spec.setdefault("subdomain", subdomain)
                    job_meta = template.get("metadata") or {}
                    job = self.create(
                        JOB,
                        {
                            "apiVersion": "batch/v1",
                            "kind": "Job",
                            "metadata": {
                                "name": job_name,
                                "labels": {**(job_meta.get("labels") or {}), **keys},
                                "annotations": {**(job_meta.get("annotations") or {}), **keys},
                            },
                            "spec": job_spec,
                        },
                    )
                global_index += 1
                group_index[group] += 1
                if job is None:
                    continue
                conds = (job.get("status") or {}).get("conditions")
                if is_true(conds, "Complete"):
                    counts["succeeded"] += 1
                elif is_true(conds, "Failed"):
                    counts["failed"] += 1
                    failed_job = failed_job or job_name
                else:
                    counts["active"] += 1
                    job_status = job.get("status") or {}
                    if job_status.get("ready", 0) + job_status.get("succeeded", 0) >= job["spec"].get("parallelism", 1):
                        counts["ready"] += 1
            per_rjob.append(counts)
        total_jobs = global_replicas
        policy = spec.get("successPolicy") or {}
        targets = policy.get("targetReplicatedJobs") or [rj["name"] for rj in rjobs]
        target_counts = [c for c in per_rjob if c["name"] in targets]
        target_total = sum(rj.get("replicas", 1) for rj in rjobs if rj["name"] in targets)
        if policy.get("operator") == "Any":
            completed = any(c["succeeded"] for c in target_counts)
        else:
            completed = sum(c["succeeded"] for c in target_counts) >= target_total and total_jobs > 0
        terminal = None
        if failed_job:
            terminal = (
                "Failed",
                "FailedJobs",
                f"jobset failed due to one or more job failures (first failed job: {failed_job})",
            )
        elif completed:
            terminal = ("Completed", "AllJobsCompleted", "jobset completed successfully")
        if terminal:
            for job in self.children(JOB):
                if not (
                    is_true((job.get("status") or {}).get("conditions"), "Complete")
                    or is_true((job.get("status") or {}).get("conditions"), "Failed")
                ):
                    self.delete(JOB, job)

        def change(st: dict) -> None:
            st["replicatedJobsStatus"] = per_rjob
            st.setdefault("restarts", 0)
            st.setdefault("restartsCountTowardsMax", 0)
            if terminal:
                st["terminalState"] = terminal[0]
                st["conditions"] = _set_condition(
                    st.get("conditions") or [], terminal[0], "True", terminal[1], terminal[2]
                )

        self.set_status(change)


# --- Kubeflow Training Operator v1 -----------------------------------------------------------
class KubeflowController(_Controller):
    def reconcile(self) -> None:
        kind = self.obj["kind"]
        field, default_container, port_name, default_port, operator = KUBEFLOW[kind]
        spec, status = self.obj["spec"], self.obj.get("status") or {}
        conditions = status.get("conditions") or []
        if is_true(conditions, "Failed") or is_true(conditions, "Succeeded"):
            return
        replica_specs = spec.get(field) or {}
        if not is_true(conditions, "Created"):
            self.set_status(
                lambda st: st.update(
                    conditions=_set_condition(
                        st.get("conditions") or [],
                        "Created",
                        "True",
                        f"{kind}Created",
                        f"{kind} {self.name} is created.",
                        kubeflow=True,
                    ),
                    replicaStatuses=st.get("replicaStatuses") or {},
                )
            )
        pods = {p["metadata"]["name"]: p for p in self.children(POD)}
        services = {s["metadata"]["name"] for s in self.children(SERVICE)}
        total = sum(r.get("replicas", 1) for r in replica_specs.values())
        for rtype, rspec in replica_specs.items():
            for i in range(rspec.get("replicas", 1)):
                name = f"{self.name}-{rtype.lower()}-{i}"
                labels = {
                    "training.kubeflow.org/operator-name": operator,
                    "training.kubeflow.org/job-name": self.name.replace("/", "-"),
                    "training.kubeflow.org/replica-type": rtype.lower(),
                    "training.kubeflow.org/replica-index": str(i),
                }
                if name not in services:
                    self.create(
                        SERVICE,
                        {
                            "apiVersion": "v1",
                            "kind": "Service",
                            "metadata": {"name": name, "labels": dict(labels)},
                            "spec": {
                                "clusterIP": "None",
                                "selector": dict(labels),
                                "ports": [
                                    {
                                        "name": port_name,
                                        "port": self._port(rspec, default_container, port_name, default_port),
                                    }
                                ],
                            },
                        },
                    )
                if name in pods:
                    continue
                if self._is_master_role(replica_specs, rtype, i):
                    labels["training.kubeflow.org/job-role"] = "master"
                template = _copy(rspec.get("template") or {})
                meta = template.get("metadata") or {}
                pod_spec = template.get("spec") or {}
                pod_spec["restartPolicy"] = (
                    "Never" if rspec.get("restartPolicy", "Never") in ("Never", "ExitCode") else rspec["restartPolicy"]
                )
                for c in pod_spec.get("containers") or []:
                    if c.get("name") == default_container:
                        ports = c.setdefault("ports", [])
                        if not any(p.get("name") == port_name for p in ports):
                            ports.append({"name": port_name, "containerPort": default_port})
                _add_env(
                    pod_spec,
                    self._env(kind, replica_specs, rtype, i, total, default_container, port_name, default_port),
                )
                self.create(
                    POD,
                    {
                        "apiVersion": "v1",
                        "kind": "Pod",
                        "metadata": {
                            "name": name,
                            "labels": {**(meta.get("labels") or {}), **labels},
                            **({"annotations": meta["annotations"]} if meta.get("annotations") else {}),
                        },
                        "spec": pod_spec,
                    },
                )
        pods = self.children(POD)
        counts: dict[str, dict] = {}
        failed_pod = None
        for rtype, rspec in replica_specs.items():
            mine = [
                p for p in pods if p["metadata"]["labels"].get("training.kubeflow.org/replica-type") == rtype.lower()
            ]
            selector = (
                f"training.kubeflow.org/job-name={self.name},training.kubeflow.org/operator-name={operator},"
                f"training.kubeflow.org/replica-type={rtype.lower()}"
            )
            counts[rtype] = {
                "active": sum(_phase(p) == "Running" and not p["metadata"].get("deletionTimestamp") for p in mine),
                "succeeded": sum(_phase(p) == "Succeeded" for p in mine),
                "failed": sum(_phase(p) == "Failed" for p in mine),
                "labelSelector": {"matchLabels": dict(x.split("=", 1) for x in selector.split(","))},
                "selector": selector,
            }
            for p in mine:
                if _phase(p) == "Failed":
                    code = _exit_code(p, default_container)
                    policy = rspec.get("restartPolicy", "Never")
                    if policy == "Never" or (policy == "ExitCode" and code not in RETRYABLE_EXIT_CODES):
                        failed_pod = failed_pod or (rtype, p)
        decisive = "Master" if "Master" in replica_specs else ("Chief" if "Chief" in replica_specs else "Worker")
        if kind == "JAXJob":
            decisive = "Worker"
        decisive_replicas = (replica_specs.get(decisive) or {}).get("replicas", 1)
        running = counts.get(decisive, {}).get("active", 0) > 0
        succeeded = counts.get(decisive, {}).get("succeeded", 0) >= decisive_replicas
        deadline = (spec.get("runPolicy") or {}).get("activeDeadlineSeconds")
        deadline_passed = bool(deadline and status.get("startTime") and _seconds_since(status["startTime"]) > deadline)
        if deadline_passed:  # the operator then deletes the job's pods and services
            for p in pods:
                self.delete(POD, p)
            for svc in self.children(SERVICE):
                self.delete(SERVICE, svc)

        def change(st: dict) -> None:
            st["replicaStatuses"] = counts
            st.setdefault("startTime", now())
            st.setdefault("lastReconcileTime", now())  # refreshed every time, it would requeue forever
            conds = st.get("conditions") or []
            if deadline_passed:
                conds = _flip_running(conds)
                message = f"Job {self.name} has failed because it was active longer than specified deadline"
                conds = _set_condition(conds, "Failed", "True", f"{kind}Failed", message, kubeflow=True)
                st["completionTime"] = now()
            elif failed_pod:
                rtype, _ = failed_pod
                message = f"{kind} {self.name} is failed because {counts[rtype]['failed']} {rtype} replica(s) failed."
                conds = _flip_running(conds)
                conds = _set_condition(conds, "Failed", "True", f"{kind}Failed", message, kubeflow=True)
                st["completionTime"] = now()
            elif succeeded:
                # As the training operator does on success: replicas still active count as done.
                for counted in counts.values():
                    counted["succeeded"] += counted["active"]
                    counted["active"] = 0
                conds = _flip_running(conds)
                conds = _set_condition(
                    conds,
                    "Succeeded",
                    "True",
                    f"{kind}Succeeded",
                    f"{kind} {self.name} is successfully completed.",
                    kubeflow=True,
                )
                st["completionTime"] = now()
            elif running:
                conds = _set_condition(
                    conds, "Running", "True", f"{kind}Running", f"{kind} {self.name} is running.", kubeflow=True
                )
            st["conditions"] = conds

        self.set_status(change)

    @staticmethod
    def _is_master_role(replica_specs: dict, rtype: str, i: int) -> bool:
        if "Master" in replica_specs:
            return rtype == "Master" and i == 0
        return rtype == "Worker" and i == 0

    @staticmethod
    def _port(rspec: dict, container: str, port_name: str, default: int) -> int:
        for c in ((rspec.get("template") or {}).get("spec") or {}).get("containers") or []:
            if c.get("name") == container:
                for p in c.get("ports") or []:
                    if p.get("name") == port_name:
                        return p["containerPort"]
        return default

    def _env(self, kind, specs, rtype, i, total, container, port_name, default_port) -> list[dict]:
        def var(name, value):
            return {"name": name, "value": str(value)}

        env = [var("PYTHONUNBUFFERED", "1")]
        if kind == "PyTorchJob":
            nproc = self.obj["spec"].get("nprocPerNode")
            if "Master" in specs:
                port = self._port(specs["Master"], container, port_name, default_port)
                rank = i if rtype == "Master" else i + specs["Master"].get("replicas", 1)
                world = total * (int(nproc) if str(nproc or "").isdigit() else 1)
                env += [
                    var("MASTER_PORT", port),
                    var("PET_MASTER_PORT", port),
                    var("MASTER_ADDR", f"{self.name}-master-0"),
                    var("PET_MASTER_ADDR", f"{self.name}-master-0"),
                    var("WORLD_SIZE", world),
                    var("RANK", rank),
                    var("PET_NODE_RANK", rank),
                ]
            if nproc:
                env.append(var("PET_NPROC_PER_NODE", nproc))
            env.append(var("PET_NNODES", total))
        elif kind == "XGBoostJob":
            masters = (specs.get("Master") or {}).get("replicas", 1)
            port = self._port(specs.get("Master") or {}, container, port_name, default_port)
            env += [
                var("MASTER_PORT", port),
                var("MASTER_ADDR", f"{self.name}-master-0"),
                var("WORLD_SIZE", total),
                var("RANK", i if rtype == "Master" else i + masters),
            ]
            if total > 1:
                env += [
                    var("WORKER_PORT", port),
                    var("WORKER_ADDRS", ",".join(f"{self.name}-worker-{n}" for n in range(total - 1))),
                ]
        elif kind == "JAXJob":
            port = self._port(specs.get("Worker") or {}, container, port_name, default_port)
            env += [
                var("COORDINATOR_ADDRESS", f"{self.name}-worker-0"),
                var("COORDINATOR_PORT", port),
                var("NUM_PROCESSES", total),
                var("PROCESS_ID", i),
            ]
        elif kind == "TFJob" and total > 1:
            cluster = {
                t.lower(): [
                    f"{self.name}-{t.lower()}-{n}.{self.ns}.svc:{self._port(s, container, port_name, default_port)}"
                    for n in range(s.get("replicas", 1))
                ]
                for t, s in specs.items()
            }
            env.append(
                var(
                    "TF_CONFIG",
                    json.dumps(
                        {"cluster": cluster, "task": {"type": rtype.lower(), "index": i}, "environment": "cloud"}
                    ),
                )
            )
        return env


def _flip_running(conditions: list) -> list:
    running = condition(conditions, "Running")
    if running and running["status"] == "True":
        conditions = [c for c in conditions if c["type"] != "Running"] + [
            {**running, "status": "False", "lastTransitionTime": now()}
        ]
    return conditions


def _exit_code(pod: dict, container: str) -> int | None:
    for s in (pod.get("status") or {}).get("containerStatuses") or []:
        terminated = (s.get("state") or {}).get("terminated")
        if terminated and (s["name"] == container or len(pod["spec"]["containers"]) == 1):
            return terminated.get("exitCode")
    return None


# --- KubeRay --------------------------------------------------------------------------------
RAY_CLUSTER = BY_KIND["RayCluster"]


def _ray_env(pod_spec: dict, cluster: str, ns: str, group: str, head: bool) -> None:
    containers = pod_spec.get("containers") or []
    if not containers:
        return
    c = containers[0]  # KubeRay treats the first container as the Ray container
    head_fqdn = f"{cluster}-head-svc.{ns}.svc.cluster.local"
    variables = [
        {"name": "RAY_CLUSTER_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['ray.io/cluster']"}}},
        {"name": "RAY_CLUSTER_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        {"name": "RAY_CLOUD_INSTANCE_ID", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "RAY_NODE_TYPE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['ray.io/group']"}}},
        {"name": "RAY_PORT", "value": "6379"},
        {"name": "RAY_ADDRESS", "value": "127.0.0.1:6379" if head else f"{head_fqdn}:6379"},
        {"name": "RAY_USAGE_STATS_KUBERAY_IN_USE", "value": "1"},
        {"name": "RAY_DASHBOARD_ENABLE_K8S_DISK_USAGE", "value": "1"},
    ]
    if not head:
        variables += [{"name": "FQ_RAY_IP", "value": head_fqdn}, {"name": "RAY_IP", "value": f"{cluster}-head-svc"}]
    env = c.setdefault("env", [])
    names = {e["name"] for e in env}
    env.extend(v for v in variables if v["name"] not in names)
    if not c.get("command") and not c.get("args"):
        c["command"] = list(RAY_NODE_COMMAND)


class RayClusterController(_Controller):
    def reconcile(self) -> None:
        spec = self.obj["spec"]
        head_spec = spec.get("headGroupSpec") or {}
        service = f"{self.name}-head-svc"
        base = {
            "ray.io/cluster": self.name,
            "ray.io/is-ray-node": "yes",
            "app.kubernetes.io/name": "kuberay",
            "app.kubernetes.io/created-by": "kuberay-operator",
        }
        if not self.store.find(SERVICE, self.ns, service):
            self.create(
                SERVICE,
                {
                    "apiVersion": "v1",
                    "kind": "Service",
                    "metadata": {"name": service, "labels": {"ray.io/cluster": self.name, "ray.io/node-type": "head"}},
                    "spec": {
                        "selector": {"ray.io/cluster": self.name, "ray.io/node-type": "head"},
                        "ports": [
                            {"name": "gcs-server", "port": 6379},
                            {"name": "dashboard", "port": 8265},
                            {"name": "client", "port": 10001},
                        ],
                    },
                },
            )
        pods = [p for p in self.children(POD) if not p["metadata"].get("deletionTimestamp")]
        heads = [p for p in pods if p["metadata"]["labels"].get("ray.io/node-type") == "head"]
        if not heads:
            labels = {
                **base,
                "ray.io/node-type": "head",
                "ray.io/group": "headgroup",
                "ray.io/identifier": f"{self.name}-head",
            }
            self._create_node(head_spec, f"{self.name}-head-", labels, "headgroup", head=True)
        desired = 0
        for group in spec.get("workerGroupSpecs") or []:
            gname = group["groupName"]
            replicas = (
                0
                if group.get("suspend")
                else group.get("replicas", group.get("minReplicas", 0)) * group.get("numOfHosts", 1)
            )
            desired += replicas
            have = [p for p in pods if p["metadata"]["labels"].get("ray.io/group") == gname]
            labels = {
                **base,
                "ray.io/node-type": "worker",
                "ray.io/group": gname,
                "ray.io/identifier": f"{self.name}-worker",
            }
            for _ in range(max(0, replicas - len(have))):
                self._create_node(group, f"{self.name}-{gname}-worker-", labels, gname, head=False)
        pods = [p for p in self.children(POD) if not p["metadata"].get("deletionTimestamp")]
        head = next((p for p in pods if p["metadata"]["labels"].get("ray.io/node-type") == "head"), None)
        running_workers = [
            p for p in pods if p["metadata"]["labels"].get("ray.io/node-type") == "worker" and _phase(p) == "Running"
        ]
        head_running = head is not None and _phase(head) == "Running"
        ready = head_running and len(running_workers) >= desired
        svc = self.store.find(SERVICE, self.ns, service)

        def change(st: dict) -> None:
            st["desiredWorkerReplicas"] = desired
            st["readyWorkerReplicas"] = len(running_workers)
            st["availableWorkerReplicas"] = len(running_workers)
            st["minWorkerReplicas"] = sum(g.get("minReplicas", 0) for g in spec.get("workerGroupSpecs") or [])
            st["maxWorkerReplicas"] = sum(g.get("maxReplicas", 0) for g in spec.get("workerGroupSpecs") or [])
            st["endpoints"] = {"gcs-server": "6379", "dashboard": "8265", "client": "10001"}
            st["head"] = {
                "serviceName": service,
                **({"serviceIP": svc["spec"]["clusterIP"]} if svc else {}),
                **({"podName": head["metadata"]["name"], "podIP": "127.0.0.1"} if head else {}),
            }
            conds = st.get("conditions") or []
            conds = _set_condition(
                conds,
                "HeadPodReady",
                "True" if head_running else "False",
                "HeadPodRunningAndReady" if head_running else "HeadPodNotFound",
                "",
            )
            if ready:
                conds = _set_condition(conds, "RayClusterProvisioned", "True", "AllPodRunningAndReadyFirstTime", "")
                if st.get("state") != "ready":
                    st["state"] = "ready"
                    st.setdefault("stateTransitionTimes", {})["ready"] = now()
            elif not is_true(conds, "RayClusterProvisioned"):
                conds = _set_condition(conds, "RayClusterProvisioned", "False", "RayClusterPodsProvisioning", "")
            st["conditions"] = conds
            st.setdefault("lastUpdateTime", now())
            st["observedGeneration"] = self.meta.get("generation", 1)

        self.set_status(change)

    def _create_node(self, group: dict, generate: str, labels: dict, gname: str, *, head: bool) -> None:
        template = _copy(group.get("template") or {})
        meta = template.get("metadata") or {}
        pod_spec = template.get("spec") or {}
        _ray_env(pod_spec, self.name, self.ns, gname, head)
        self.create(
            POD,
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {
                    "generateName": generate,
                    "labels": {**(meta.get("labels") or {}), **labels},
                    **({"annotations": meta["annotations"]} if meta.get("annotations") else {}),
                },
                "spec": pod_spec,
            },
        )


class RayJobController(_Controller):
    def reconcile(self) -> None:
        spec, status = self.obj["spec"], self.obj.get("status") or {}
        state = status.get("jobDeploymentStatus") or ""
        if state in ("Complete", "Failed"):
            self._cleanup(spec, status)
            return
        if not state:
            cluster = (spec.get("clusterSelector") or {}).get("ray.io/cluster") or f"{self.name}-{_suffix()}"
            job_id = spec.get("jobId") or f"{self.name}-{_suffix()}"
            self.set_status(
                lambda st: st.update(
                    jobDeploymentStatus="Initializing",
                    jobId=job_id,
                    rayClusterName=cluster,
                    jobStatus="",
                    startTime=now(),
                    succeeded=0,
                    failed=0,
                )
            )
            return
        deadline = spec.get("activeDeadlineSeconds")
        if deadline and _seconds_since(status.get("startTime")) > deadline:
            return self._finish(
                "Failed", "STOPPED", "DeadlineExceeded", "The RayJob has passed the activeDeadlineSeconds."
            )
        cluster_name = status["rayClusterName"]
        cluster = self.store.find(RAY_CLUSTER, self.ns, cluster_name)
        if cluster is None:
            cluster_spec = _copy(spec.get("rayClusterSpec") or {})
            self.create(
                RAY_CLUSTER,
                {
                    "apiVersion": "ray.io/v1",
                    "kind": "RayCluster",
                    "metadata": {
                        "name": cluster_name,
                        "labels": {
                            **(self.meta.get("labels") or {}),
                            "ray.io/originated-from-cr-name": self.name,
                            "ray.io/originated-from-crd": "RayJob",
                            "ray.io/job-submission-mode": spec.get("submissionMode", "K8sJobMode"),
                        },
                    },
                    "spec": cluster_spec,
                },
            )
            return
        cluster_status = cluster.get("status") or {}
        if state == "Initializing":
            if cluster_status.get("state") != "ready":
                return
            dashboard = f"{cluster_name}-head-svc.{self.ns}.svc.cluster.local:8265"
            if spec.get("submissionMode", "K8sJobMode") == "K8sJobMode" and not self.store.find(
                JOB, self.ns, self.name
            ):
                self._create_submitter(spec, status, dashboard)
            self.set_status(
                lambda st: st.update(
                    jobDeploymentStatus="Running",
                    dashboardURL=dashboard,
                    jobStatus="RUNNING",
                    rayClusterStatus=_copy(cluster_status),
                )
            )
            return
        submitter = self.store.find(JOB, self.ns, self.name)
        if submitter is None:
            return
        conds = (submitter.get("status") or {}).get("conditions")
        if is_true(conds, "Complete"):
            self._finish("Complete", "SUCCEEDED", None, "Job finished successfully.")
        elif is_true(conds, "Failed"):
            code = None
            for pod in self.store.list(
                POD, self.ns, f"batch.kubernetes.io/controller-uid={submitter['metadata']['uid']}"
            )[0]:
                code = _exit_code(pod, "ray-job-submitter") or code
            self._finish("Failed", "FAILED", "AppFailed", f"Job entrypoint command failed with exit code {code}")

    def _create_submitter(self, spec: dict, status: dict, dashboard: str) -> None:
        template = _copy(spec.get("submitterPodTemplate") or {})
        if not template:
            head = ((spec.get("rayClusterSpec") or {}).get("headGroupSpec") or {}).get("template") or {}
            head_container = (((head.get("spec") or {}).get("containers")) or [{}])[0]
            container = {
                "name": "ray-job-submitter",
                "image": head_container.get("image", ""),
                "command": ["/bin/sh", "-c", spec.get("entrypoint", "")],
            }
            if head_container.get("imagePullPolicy"):
                container["imagePullPolicy"] = head_container["imagePullPolicy"]
            template = {"spec": {"containers": [container], "restartPolicy": "Never"}}
        pod_spec = template.setdefault("spec", {})
        pod_spec.setdefault("restartPolicy", "Never")
        # KubeRay fills a submitter template's command when it has none (configureSubmitterContainer:
        # `ray job submit … -- <entrypoint>`); this fake runs the entrypoint itself.
        first = (pod_spec.get("containers") or [{}])[0]
        if first and not first.get("command"):
            first["command"] = ["/bin/sh", "-c", spec.get("entrypoint", "")]
        for c in pod_spec.get("containers") or []:
            env = c.setdefault("env", [])
            env += [
                {"name": "RAY_DASHBOARD_ADDRESS", "value": dashboard},
                {"name": "RAY_JOB_SUBMISSION_ID", "value": status["jobId"]},
            ]
        meta = template.setdefault("metadata", {})
        meta["labels"] = {
            **(meta.get("labels") or {}),
            "ray.io/originated-from-cr-name": self.name,
            "ray.io/originated-from-crd": "RayJob",
            "app.kubernetes.io/created-by": "kuberay-operator",
        }
        backoff = (spec.get("submitterConfig") or {}).get("backoffLimit", 2)
        self.create(
            JOB,
            {
                "apiVersion": "batch/v1",
                "kind": "Job",
                "metadata": {"name": self.name, "labels": dict(meta["labels"])},
                "spec": {"backoffLimit": backoff, "template": template},
            },
        )

    def _finish(self, state: str, job_status: str, reason: str | None, message: str) -> None:
        def change(st: dict) -> None:
            st["jobDeploymentStatus"] = state
            st["jobStatus"] = job_status
            st["message"] = message
            st["endTime"] = now()
            st["succeeded" if state == "Complete" else "failed"] = 1
            if reason:
                st["reason"] = reason

        self.set_status(change)

    def _cleanup(self, spec: dict, status: dict) -> None:
        if spec.get("shutdownAfterJobFinishes") and not (spec.get("clusterSelector") or {}):
            cluster = self.store.find(RAY_CLUSTER, self.ns, status.get("rayClusterName", ""))
            if cluster and not cluster["metadata"].get("deletionTimestamp"):
                self.delete(RAY_CLUSTER, cluster)
