"""The Kubernetes objects a Workload becomes (SPEC §9): pure functions, no API calls, no
database. The Kubernetes engine submits what `render` returns; `manage.py k8s_render` prints it.

`render(...)` returns the top object first, then its children:
- batch → batch/v1 Job; jobset and jax → jobset.x-k8s.io/v1alpha2 JobSet; pytorch →
  kubeflow.org/v1 PyTorchJob; xgboost → kubeflow.org/v1 XGBoostJob; kuberay → ray.io/v1 RayJob;
  legacy tf → kubeflow.org/v1 TFJob (Chief, Worker, PS as the manifest names them);
- the run's shared volume (a PersistentVolumeClaim) when the manifest asks for one;
- a Secret with the project's sensitive runtime variables when there are any.
The operators make the Services their pods need (JobSet's headless Service, the training
operator's per-replica Services, KubeRay's head Service), so aichor renders none.

Ownership: children carry an ownerReference to the top object with `uid` = OWNER_UID, because
the uid exists only once the API server created the top object. The engine creates
`objects[0]`, then `owned_by(objects[1:], created_uid)` and creates those: deleting the top
object (foreground propagation) then removes everything. The pods wait meanwhile (an absent
claim or Secret keeps them Pending / in CreateContainerConfigError, which the kubelet retries).

The project's S3 credentials never appear here: pods read them from the project's Secret in
the namespace (`namespace_objects` renders it with the Namespace; the engine creates both on
first use).

Engine `config` keys read here: `image_pull_secret` (a Secret name in the namespace),
`storage_class` (default for the shared volume), `s3_secret` (default "aichor-s3"),
`buckets_host_root` (a folder every node has the buckets under, e.g. an NFS mount: the local
bucket backend's inputs/outputs are then mounted as hostPath; without it they are not mounted).
"""

from __future__ import annotations

import copy
import re

from experiments.workload import Group, Volume, Workload

LABEL_EXPERIMENT = "aichor.io/experiment-id"
LABEL_PROJECT = "aichor.io/project"
# Which manifest type (or KubeRay pool / submitter) a pod runs: the engine's process names.
LABEL_GROUP = "aichor.io/group"
OWNER_UID = "00000000-0000-0000-0000-00000000cafe"
S3_SECRET = "aichor-s3"
# The project Secret's keys: what the workload environment calls them.
S3_SECRET_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
SHM_VOLUME = "dshm"
SHARED_MOUNT = "/mnt/shared"
PVC_MOUNT = "/mnt/pvc"
# The port JAX's coordinator listens on (SPEC §9).
JAX_PORT = 1234
# The Ray head's GCS port when rayStartParams name none (KubeRay's default).
RAY_PORT = 6379
# The port the training operator adds to a PyTorchJob's `pytorch` container (pytorchjob-port).
PYTORCH_PORT = 23456
# KubeRay's submitter only runs `ray job submit` and tails the driver's logs; the driver itself
# runs on the head. Head-sized requests (GPUs included) would reserve a second head for nothing.
SUBMITTER_RESOURCES = {"requests": {"cpu": "500m", "memory": "512Mi"}, "limits": {"cpu": "1", "memory": "1Gi"}}

# The JobSet variables of SPEC §5, from the labels JobSet puts on every pod (STATUS.md §1);
# JOB_COMPLETION_INDEX comes from the Job controller itself.
JOBSET_LABEL_ENV = {
    "JOB_INDEX": "jobset.sigs.k8s.io/job-index",
    "JOB_GLOBAL_INDEX": "jobset.sigs.k8s.io/job-global-index",
    "GLOBAL_REPLICAS": "jobset.sigs.k8s.io/global-replicas",
    "REPLICATED_JOB_NAME": "jobset.sigs.k8s.io/replicatedjob-name",
    "REPLICATED_JOB_REPLICAS": "jobset.sigs.k8s.io/replicatedjob-replicas",
    "JOBSET_NAME": "jobset.sigs.k8s.io/jobset-name",
}
_LABEL_VALUE = re.compile(r"[^A-Za-z0-9._-]")


class RenderError(ValueError):
    """The workload cannot become valid objects (a message for the step log)."""


def object_name(experiment_id: str) -> str:
    """The top object's name: a DNS-1035 label short enough to prefix JobSet's pod hostnames
    (`<name>-<job>-<i>-<j>` ≤ 63) and KubeRay's cluster name (RayJob names ≤ 47)."""
    return "exp-" + (re.sub(r"[^a-z0-9]", "", experiment_id.lower())[:12] or "0")


def label_value(text: str) -> str:
    value = _LABEL_VALUE.sub("-", str(text))[:63]
    return value.strip("-_.")


def owned_by(objects: list[dict], uid: str) -> list[dict]:
    """Copies of `objects` whose ownerReferences point at the created top object's `uid`."""
    out = copy.deepcopy(objects)
    for obj in out:
        for ref in obj.get("metadata", {}).get("ownerReferences", []):
            if ref.get("uid") == OWNER_UID:
                ref["uid"] = uid
    return out


def namespace_objects(
    namespace: str, project_id: str, s3_credentials: dict[str, str] | None, config: dict
) -> list[dict]:
    """The project's Namespace and, on S3 storage, the Secret its pods read the keys from."""
    labels = {LABEL_PROJECT: label_value(project_id), "app.kubernetes.io/managed-by": "aichor"}
    objects = [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace, "labels": labels}}]
    if s3_credentials:
        objects.append(
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {"name": config.get("s3_secret") or S3_SECRET, "namespace": namespace, "labels": labels},
                "type": "Opaque",
                "stringData": {key: s3_credentials[key] for key in S3_SECRET_KEYS if key in s3_credentials},
            }
        )
    return objects


# ---------------------------------------------------------------------------- quantities


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def cpu_quantity(cpus: float) -> str:
    return _number(cpus) if float(cpus).is_integer() else f"{round(cpus * 1000)}m"


def gb_quantity(gb: float) -> str:
    """AIchor's GB are GiB, as on the clusters it ran on."""
    return f"{int(gb)}Gi" if float(gb).is_integer() else f"{round(gb * 1024)}Mi"


# ---------------------------------------------------------------------------- the renderer


class _Renderer:
    def __init__(self, workload: Workload, *, namespace: str, image: str, experiment_id: str, config: dict):
        self.w = workload
        self.namespace = namespace
        self.image = image
        self.config = config or {}
        self.name = object_name(experiment_id)
        self.labels = {LABEL_EXPERIMENT: label_value(experiment_id), LABEL_PROJECT: label_value(workload.project_id)}
        self.shared = next((v for v in workload.volumes if v.kind == "shared"), None)
        self.env_secret = f"{self.name}-env"
        self.secret_values = {
            k: v for k, v in workload.env.items() if k in workload.secret_env and k not in S3_SECRET_KEYS
        }

    # -- metadata

    def meta(self, name: str, **extra) -> dict:
        return {"name": name, "namespace": self.namespace, "labels": dict(self.labels), **extra}

    def owner_ref(self, top: dict) -> list[dict]:
        return [
            {
                "apiVersion": top["apiVersion"],
                "kind": top["kind"],
                "name": top["metadata"]["name"],
                "uid": OWNER_UID,
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ]

    # -- pods

    def env(self) -> list[dict]:
        s3_secret = self.config.get("s3_secret") or S3_SECRET
        out = []
        for name, value in self.w.env.items():
            if name in S3_SECRET_KEYS:
                out.append({"name": name, "valueFrom": {"secretKeyRef": {"name": s3_secret, "key": name}}})
            elif name in self.secret_values:
                out.append({"name": name, "valueFrom": {"secretKeyRef": {"name": self.env_secret, "key": name}}})
            else:
                out.append({"name": name, "value": str(value)})
        return out

    def resources(self, group: Group) -> dict:
        res = group.resources
        requests = {"cpu": cpu_quantity(res.cpus)}
        limits = {"cpu": cpu_quantity(res.cpus * (res.cpu_limit_ratio or 1))}
        if res.memory_gb:
            # Memory is not compressible: a limit above the request only defers the OOM kill.
            requests["memory"] = limits["memory"] = gb_quantity(res.memory_gb)
        if res.gpu and res.gpu.count:
            requests["nvidia.com/gpu"] = limits["nvidia.com/gpu"] = str(res.gpu.count)
        if res.tpu:
            chips = res.tpu.chips or _topology_chips(res.tpu.topology)
            requests["google.com/tpu"] = limits["google.com/tpu"] = str(chips)
        return {"requests": requests, "limits": limits}

    def node_selector(self, group: Group) -> dict:
        res = group.resources
        selector = {}
        if res.gpu and res.gpu.count and res.gpu.product:
            # The product label NVIDIA's GPU feature discovery puts on every GPU node.
            selector["nvidia.com/gpu.product"] = res.gpu.product
        if res.tpu:
            if res.tpu.type:
                selector["cloud.google.com/gke-tpu-accelerator"] = res.tpu.type
            if res.tpu.topology:
                selector["cloud.google.com/gke-tpu-topology"] = res.tpu.topology
        selector.update({str(k): str(v) for k, v in res.extra_selectors.items()})
        return selector

    def volumes(self, group: Group) -> tuple[list[dict], list[dict]]:
        volumes, mounts = [], []
        if group.resources.shm_size_gb:
            size = gb_quantity(group.resources.shm_size_gb)
            volumes.append({"name": SHM_VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": size}})
            mounts.append({"name": SHM_VOLUME, "mountPath": "/dev/shm"})
        root = self.config.get("buckets_host_root")
        for i, volume in enumerate(self.w.volumes):
            name, source, path = self.volume_source(volume, i, root)
            if source is None:
                continue
            volumes.append({"name": name, **source})
            mounts.append({"name": name, "mountPath": path, **({"readOnly": True} if volume.read_only else {})})
        return volumes, mounts

    def volume_source(self, volume: Volume, i: int, root: str | None) -> tuple[str, dict | None, str]:
        if volume.kind == "shared":
            claim = {"persistentVolumeClaim": {"claimName": f"{self.name}-shared"}}
            return "shared", claim, volume.mount_point or SHARED_MOUNT
        if volume.kind == "pvc":
            claim = {"persistentVolumeClaim": {"claimName": volume.name}}
            return f"pvc-{i}", claim, volume.mount_point or f"{PVC_MOUNT}/{volume.name}"
        if volume.kind in ("inputs", "outputs") and root:
            host = {"hostPath": {"path": f"{root.rstrip('/')}/{volume.name}", "type": "DirectoryOrCreate"}}
            return volume.kind, host, volume.mount_point
        return "", None, ""

    def pod_template(
        self,
        group: Group,
        *,
        container: str,
        command: bool = True,
        extra_env: list[dict] | None = None,
        restart_policy: str | None = "Never",
    ) -> dict:
        volumes, mounts = self.volumes(group)
        main = {
            "name": container,
            "image": self.image,
            "imagePullPolicy": "IfNotPresent",
            "env": self.env() + (extra_env or []),
            "resources": self.resources(group),
        }
        if command:
            main["command"] = ["/bin/sh", "-c", self.w.command]
        if mounts:
            main["volumeMounts"] = mounts
        spec: dict = {"containers": [main], "enableServiceLinks": False}
        if restart_policy:
            spec["restartPolicy"] = restart_policy
        if volumes:
            spec["volumes"] = volumes
        selector = self.node_selector(group)
        if selector:
            spec["nodeSelector"] = selector
        if group.resources.extra_tolerations:
            spec["tolerations"] = copy.deepcopy(group.resources.extra_tolerations)
        if self.config.get("image_pull_secret"):
            spec["imagePullSecrets"] = [{"name": self.config["image_pull_secret"]}]
        labels = {**self.labels, LABEL_GROUP: label_value(group.name)}
        return {"metadata": {"labels": labels}, "spec": spec}

    # -- children

    def children(self, top: dict) -> list[dict]:
        out = []
        if self.shared:
            access = self.shared.access_mode or ("ReadWriteMany" if self.pod_count() > 1 else "ReadWriteOnce")
            spec = {
                "accessModes": [access],
                "resources": {"requests": {"storage": gb_quantity(self.shared.size_gb or 1)}},
            }
            storage_class = self.shared.storage_class or self.config.get("storage_class")
            if storage_class:
                spec["storageClassName"] = storage_class
            meta = self.meta(f"{self.name}-shared", ownerReferences=self.owner_ref(top))
            out.append({"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": meta, "spec": spec})
        if self.secret_values:
            meta = self.meta(self.env_secret, ownerReferences=self.owner_ref(top))
            secret = {"apiVersion": "v1", "kind": "Secret", "metadata": meta, "type": "Opaque"}
            out.append({**secret, "stringData": dict(self.secret_values)})
        return out

    def pod_count(self) -> int:
        return sum(g.replicas * max(g.completions, 1) for g in self.w.groups)

    # -- top objects

    def job(self) -> dict:
        group = self.w.groups[0]
        spec = {"backoffLimit": 0, "template": self.pod_template(group, container="main")}
        if self.w.timeout:
            spec["activeDeadlineSeconds"] = self.w.timeout
        return {"apiVersion": "batch/v1", "kind": "Job", "metadata": self.meta(self.name), "spec": spec}

    def jobset(self, replicated: list[tuple[str, Group, int, int, int, list[dict]]]) -> dict:
        jobs = []
        for name, group, replicas, completions, parallelism, env in replicated:
            job_spec = {
                "completions": completions,
                "parallelism": parallelism,
                "completionMode": "Indexed",
                "backoffLimit": 0,
                "template": self.pod_template(group, container="main", extra_env=env),
            }
            if self.w.timeout:
                # JobSet has no deadline of its own; its Jobs all start together.
                job_spec["activeDeadlineSeconds"] = self.w.timeout
            template = {"metadata": {"labels": dict(self.labels)}, "spec": job_spec}
            jobs.append({"name": name, "replicas": replicas, "template": template})
        spec = {
            # Pods reach each other as <pod-hostname>.<jobset> (the coordinator of jax).
            "network": {"enableDNSHostnames": True, "publishNotReadyAddresses": True},
            # The first failed Job fails the run: its exit code is the experiment's.
            "failurePolicy": {"maxRestarts": 0},
            "replicatedJobs": jobs,
        }
        return {
            "apiVersion": "jobset.x-k8s.io/v1alpha2",
            "kind": "JobSet",
            "metadata": self.meta(self.name),
            "spec": spec,
        }

    def jobset_groups(self) -> dict:
        names = _replicated_job_names(self.name, self.w.groups)
        replicated = []
        for group in self.w.groups:
            env = [
                {"name": var, "valueFrom": {"fieldRef": {"fieldPath": f"metadata.labels['{label}']"}}}
                for var, label in JOBSET_LABEL_ENV.items()
            ]
            replicated.append((names[group.name], group, group.replicas, group.completions, group.parallelism, env))
        return self.jobset(replicated)

    def jax(self) -> dict:
        group = self.w.groups[0]
        host = f"{self.name}-worker-0-0.{self.name}"
        env = [
            {"name": "JAXOPERATOR_COORDINATOR_ADDRESS", "value": f"{host}:{JAX_PORT}"},
            {"name": "JAXOPERATOR_COORDINATOR_HOST", "value": host},
            {"name": "JAXOPERATOR_NUM_PROCESSES", "value": str(group.replicas)},
            {
                "name": "JAXOPERATOR_PROCESS_ID",
                "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['jobset.sigs.k8s.io/job-index']"}},
            },
        ]
        return self.jobset([("worker", group, group.replicas, 1, 1, env)])

    def training_job(self, kind: str, field: str, container: str) -> dict:
        replicas = {}
        trained = self.training_replicas()
        for replica_type, group, count in trained:
            env = None
            if kind == "PyTorchJob" and [t for t, _g, _c in trained] == ["Worker"]:
                env = self.masterless_pytorch_env(count)
            replicas[replica_type] = {
                "replicas": count,
                # The operator re-creates failed pods unless Never: a failure must end the run.
                "restartPolicy": "Never",
                "template": self.pod_template(group, container=container, restart_policy=None, extra_env=env),
            }
        # cleanPodPolicy None: finished pods stay for their logs and the debug hold; the engine
        # deletes the top object when it is done with them.
        run_policy: dict = {"backoffLimit": 0, "cleanPodPolicy": "None"}
        if self.w.timeout:
            run_policy["activeDeadlineSeconds"] = self.w.timeout
        spec = {field: replicas, "runPolicy": run_policy}
        return {"apiVersion": "kubeflow.org/v1", "kind": kind, "metadata": self.meta(self.name), "spec": spec}

    def masterless_pytorch_env(self, workers: int) -> list[dict]:
        """The training operator (v1.9.4, STATUS.md §2) injects MASTER_ADDR, MASTER_PORT,
        WORLD_SIZE and RANK only when the PyTorchJob has a Master replica spec; a Worker-only
        job (the 0.2.3 `worker` form) gets PET_NNODES alone. Its worker 0 has the master role, so
        SPEC §5's variables point there: the Service the operator makes for every replica, the
        port it adds to the `pytorch` container, and the rank from the replica index label."""
        return [
            {"name": "MASTER_ADDR", "value": f"{self.name}-worker-0"},
            {"name": "MASTER_PORT", "value": str(PYTORCH_PORT)},
            {"name": "WORLD_SIZE", "value": str(workers)},
            {
                "name": "RANK",
                "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['training.kubeflow.org/replica-index']"}},
            },
        ]

    def training_replicas(self) -> list[tuple[str, Group, int]]:
        if self.w.operator == "tf":
            # The manifest's types are TFJob's replica types; the operator writes TF_CONFIG.
            out = [(group.name, group, group.replicas) for group in self.w.groups if group.replicas]
            if not any(replica_type != "PS" for replica_type, _group, _count in out):
                raise RenderError("tf: no Chief or Worker type to run")
            return out
        master = next((g for g in self.w.groups if g.name == "Master"), None)
        worker = next((g for g in self.w.groups if g.name in ("Worker", "worker")), None)
        out = []
        if master:
            out.append(("Master", master, master.replicas))
        if worker:
            if not master and self.w.operator == "xgboost" and worker.name == "worker":
                # The 0.2.3 form: XGBoostJob needs a Master (it alone decides success), so
                # worker 0 is it, as the single-host engines make rank 0 of the first worker.
                out.append(("Master", worker, 1))
                if worker.replicas > 1:
                    out.append(("Worker", worker, worker.replicas - 1))
            else:
                out.append(("Worker", worker, worker.replicas))
        if not out:
            raise RenderError(f"{self.w.operator}: no Master or Worker type to run")
        return out

    def rayjob(self) -> dict:
        head = next(g for g in self.w.groups if g.role == "head")
        submitter = next(g for g in self.w.groups if g.role == "submitter")
        # The driver runs on the head, where KubeRay sets RAY_ADDRESS to this; RAY_SERVER is the
        # name older AIchor code reads (the single-host engines set both).
        ray_server = [{"name": "RAY_SERVER", "value": f"127.0.0.1:{head.ray_start_params.get('port', RAY_PORT)}"}]
        head_spec = {
            "rayStartParams": {str(k): str(v) for k, v in head.ray_start_params.items()},
            # KubeRay writes the `ray start` command; the image's own entrypoint must not run.
            "template": self.pod_template(
                head, container="ray-head", command=False, restart_policy=None, extra_env=ray_server
            ),
        }
        workers = []
        for pool in (g for g in self.w.groups if g.role == "ray-worker"):
            workers.append(
                {
                    "groupName": label_value(pool.name).lower() or "workers",
                    "replicas": pool.replicas,
                    "minReplicas": pool.replicas,
                    "maxReplicas": pool.replicas,
                    "rayStartParams": {},
                    "template": self.pod_template(pool, container="ray-worker", command=False, restart_policy=None),
                }
            )
        cluster: dict = {"headGroupSpec": head_spec}
        if workers:
            cluster["workerGroupSpecs"] = workers
        if self.w.ray_version:
            cluster["rayVersion"] = self.w.ray_version
        submitter_pod = self.pod_template(submitter, container="ray-job-submitter", command=False)
        # KubeRay fills the submitter's command (`ray job submit … -- <entrypoint>`) and its
        # dashboard address; it needs the image, not the run's data or accelerators.
        container = submitter_pod["spec"]["containers"][0]
        container["resources"] = copy.deepcopy(SUBMITTER_RESOURCES)
        container.pop("volumeMounts", None)
        container["env"] = []
        for key in ("volumes", "nodeSelector", "tolerations"):
            submitter_pod["spec"].pop(key, None)
        spec = {
            "entrypoint": self.w.command,
            "submissionMode": "K8sJobMode",
            "backoffLimit": 0,
            # The engine deletes the RayJob once it has the logs (and after a debug hold).
            "shutdownAfterJobFinishes": False,
            "rayClusterSpec": cluster,
            "submitterPodTemplate": submitter_pod,
        }
        if self.w.timeout:
            spec["activeDeadlineSeconds"] = self.w.timeout
        return {"apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": self.meta(self.name), "spec": spec}

    def top(self) -> dict:
        operator = self.w.operator
        if operator == "jobset":
            return self.jobset_groups()
        if operator == "jax":
            return self.jax()
        if operator == "pytorch":
            return self.training_job("PyTorchJob", "pytorchReplicaSpecs", "pytorch")
        if operator == "xgboost":
            return self.training_job("XGBoostJob", "xgbReplicaSpecs", "xgboost")
        if operator == "kuberay":
            return self.rayjob()
        if operator == "tf":
            return self.training_job("TFJob", "tfReplicaSpecs", "tensorflow")
        if operator == "batch":
            return self.job()
        raise RenderError(f"operator {operator!r} has no Kubernetes form")


def _topology_chips(topology: str | None) -> int:
    chips = 1
    for part in (topology or "1").lower().split("x"):
        chips *= int(part) if part.isdigit() else 1
    return chips


def _replicated_job_names(top: str, groups: list[Group]) -> dict[str, str]:
    """Each jobset group's replicated job name, cut so that JobSet's pod names
    (`<top>-<name>-<job index>-<completion index>-<5 random>`) stay DNS labels of ≤ 63
    characters, as JobSet's webhook requires."""
    names: dict[str, str] = {}
    for group in groups:
        digits = len(str(max(group.replicas - 1, 0))) + len(str(max(group.completions - 1, 0)))
        room = 63 - len(top) - 3 - digits - 6
        base = re.sub(r"[^a-z0-9-]", "-", group.name.lower())[:room].strip("-") or "job"
        if not base[0].isalpha():
            base = ("j" + base)[:room]
        name, n = base, 1
        while name in names.values():
            suffix = f"-{n}"
            name, n = base[: room - len(suffix)].rstrip("-") + suffix, n + 1
        names[group.name] = name
    return names


def render_warnings(workload: Workload, config: dict) -> list[str]:
    """What the objects leave out of the workload, for the step log."""
    warnings = []
    if not (config or {}).get("buckets_host_root"):
        for volume in workload.volumes:
            if volume.kind in ("inputs", "outputs"):
                warnings.append(
                    f"the {volume.kind} bucket is on the server's filesystem, which the cluster's nodes do not see: "
                    f"not mounted at {volume.mount_point} (use S3 storage, or set buckets_host_root on the engine)"
                )
    if any(group.resources.rdma for group in workload.groups):
        warnings.append("resources.rdma: not supported on Kubernetes yet: ignored")
    return warnings


def render(workload: Workload, *, namespace: str, image: str, experiment_id: str, config: dict) -> list[dict]:
    """The objects to create for `workload` in `namespace`, the top object first (see the
    module docstring for the order and the owner uids)."""
    renderer = _Renderer(workload, namespace=namespace, image=image, experiment_id=experiment_id, config=config)
    top = renderer.top()
    return [top, *renderer.children(top)]
