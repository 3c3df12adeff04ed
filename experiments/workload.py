"""The Workload every engine receives: what to run, built once from the experiment, its typed
manifest, the project's storage and variables. It knows nothing of hosts, ports or host paths;
each engine translates it (a single host plans addresses and ranks, Kubernetes renders objects).

`environment()` is the one place the injected variables are made: the pipeline puts them in
the workload and the experiment page shows them, so the two cannot disagree."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from django.conf import settings

from aichor.lib.variables import AICHOR_VARS, PROTECTED_VARS
from experiments.manifest.types import ProcessGroup, Resources, Spec
from projects.models import ProjectVariable

if TYPE_CHECKING:  # engines read the Workload; the models read the engines (the terminal rule)
    from experiments.models import Experiment

INPUTS_MOUNT = "/mnt/aichor/inputs"
OUTPUTS_MOUNT = "/mnt/aichor/outputs"


@dataclass(frozen=True)
class Volume:
    kind: str  # "inputs", "outputs" (the project's buckets), "shared", "pvc"
    name: str  # bucket or claim name; "shared" for the shared volume
    mount_point: str  # where a process with its own filesystem sees it
    read_only: bool = False
    size_gb: float | None = None
    storage_class: str | None = None
    access_mode: str | None = None


@dataclass(frozen=True)
class Group:
    """Processes of one kind: a manifest type, a KubeRay pool, or the KubeRay submitter."""

    name: str
    role: str  # "master", "worker", "job", "main", "head", "ray-worker", "submitter", "chief", "ps"
    replicas: int
    resources: Resources
    completions: int = 1
    parallelism: int = 1
    # Only decisive processes' exit codes decide the outcome (a Ray head is not decisive).
    decisive: bool = True
    ray_start_params: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Variable:
    name: str
    value: str
    source: str  # "aichor", "project variable", "spec.env"
    sensitive: bool = False


@dataclass(frozen=True)
class Workload:
    experiment_id: str
    project_id: str
    operator: str
    image: str
    command: str
    groups: list[Group]
    # What every process gets; engines add the distribution variables of each process.
    env: dict[str, str]
    volumes: list[Volume]
    timeout: int | None = None
    ray_version: str | None = None
    # For the step log: what the manifest asked and aichor ignored.
    warnings: list[str] = field(default_factory=list)
    # Names in `env` whose values are sensitive: an engine that writes specs someone can read
    # (Kubernetes) passes them through a Secret, never inline.
    secret_env: frozenset[str] = frozenset()
    # The project's namespace (SPEC §1): a cluster engine runs the workload there.
    namespace: str = ""
    # builder.context: where an engine without images runs the commands from, as the image's
    # working directory would be the context's copy.
    context: str = "."
    # The manifest's optional services an engine may not provide ("tensorboard", "jupyter",
    # "vscode"): each engine names, in warnings_for, those it does not.
    features: frozenset[str] = frozenset()


def mount_point(volume: Volume) -> str:
    """Where a process that has its own filesystem (a container, a pod) finds `volume`."""
    return volume.mount_point


def bucket_volumes(experiment: Experiment) -> list[Volume]:
    """The buckets as volumes to mount; none on S3, where the workload talks S3 itself
    (boto3, the aws CLI and fsspec all read the credentials `environment` gives)."""
    from datasets.storage import is_s3

    if is_s3():
        return []
    project = experiment.project
    return [
        Volume("inputs", project.inputs_bucket, INPUTS_MOUNT),
        Volume("outputs", project.outputs_bucket, OUTPUTS_MOUNT),
    ]


def _storage(experiment: Experiment, path_of: Callable[[Volume], str]) -> tuple[str, str, list[Variable]]:
    """Where the inputs and the outputs bucket are, and the variables to reach them."""
    volumes = bucket_volumes(experiment)
    if volumes:
        inputs, outputs = volumes
        return f"{path_of(inputs)}/", f"{path_of(outputs)}/", []
    project = experiment.project
    endpoint = settings.AICHOR_S3_ENDPOINT or f"https://s3.{settings.AICHOR_S3_REGION}.amazonaws.com"
    credentials = {
        "S3_ENDPOINT": endpoint,
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": settings.AICHOR_S3_ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": settings.AICHOR_S3_SECRET_KEY,
        "AWS_DEFAULT_REGION": settings.AICHOR_S3_REGION,
    }
    variables = [
        Variable(name, value, "aichor", sensitive=name == "AWS_SECRET_ACCESS_KEY")
        for name, value in credentials.items()
    ]
    return f"s3://{project.inputs_bucket}/", f"s3://{project.outputs_bucket}/", variables


def environment(
    experiment: Experiment, *, path_of: Callable[[Volume], str] = mount_point
) -> tuple[list[Variable], list[str]]:
    """The variables every process gets (SPEC §5), aichor's first, and the warnings about
    `spec.env` names aichor sets itself. `path_of` is the engine's: where its processes find a
    bucket volume."""
    inputs, outputs, storage = _storage(experiment, path_of)
    prefix = experiment.output_prefix
    tensorboard = f"{outputs}{prefix}tensorboard/"
    aichor = dict(
        zip(
            AICHOR_VARS,
            (
                inputs,
                f"{outputs}{prefix}",
                tensorboard,
                str(experiment.pk),
                str(experiment.project_id),
                experiment.message,
                experiment.commit_sha,
                tensorboard,
                experiment.message,
            ),
            strict=True,
        )
    )
    variables = [Variable(name, value, "aichor") for name, value in aichor.items()] + storage
    taken = {v.name for v in variables}
    manifest = experiment.typed_manifest
    spec_env = manifest.spec.env if manifest else {}
    # Validation refuses these names now; a manifest stored before it did may still carry them.
    warnings = [
        f"spec.env.{name} is set by aichor and cannot be overridden: ignored"
        for name in spec_env
        if name in PROTECTED_VARS
    ]
    spec_vars = [Variable(n, v, "spec.env") for n, v in spec_env.items() if n not in PROTECTED_VARS and n not in taken]
    overridden = taken | {v.name for v in spec_vars}
    for var in experiment.project.variables.filter(kind=ProjectVariable.Kind.RUNTIME):
        # spec.env wins over a project variable; a protected name can only predate the form's check.
        if var.name not in overridden and var.name not in PROTECTED_VARS:
            variables.append(Variable(var.name, var.plain_value(), "project variable", sensitive=var.sensitive))
    return variables + spec_vars, warnings


_ROLES = {"Master": "master", "Head": "head"}


def _group(operator: str, group: ProcessGroup) -> Group:
    if group.ray_pool:
        role = "ray-worker"
    elif operator == "jobset":
        role = "job"
    elif operator in ("pytorch", "xgboost", "jax", "kuberay"):
        role = _ROLES.get(group.name, "worker")
    elif operator == "tf":
        role = group.name.lower()  # TFJob's replica types: chief, worker, ps
    else:
        role = "main"
    return Group(
        name=group.name,
        role=role,
        replicas=group.count,
        resources=group.resources,
        completions=group.completions,
        parallelism=group.parallelisms,
        # Neither a Ray head nor a TensorFlow parameter server ever ends by itself.
        decisive=operator != "kuberay" and not (operator == "tf" and group.name == "PS"),
        ray_start_params=dict(group.ray_start_params),
    )


def groups_of(spec: Spec) -> list[Group]:
    groups = [_group(spec.operator, group) for group in spec.groups]
    if spec.operator == "kuberay":
        # KubeRay's submitter runs the user's command as the Ray driver: it alone decides.
        head = spec.group("Head")
        groups.append(Group("submitter", "submitter", 1, head.resources if head else Resources()))
    return groups


def build_workload(experiment: Experiment, *, path_of: Callable[[Volume], str] = mount_point) -> Workload:
    """The experiment's workload, once Cloning read its manifest and Building made its image."""
    spec = experiment.typed_manifest.spec
    storage = spec.storage
    volumes = bucket_volumes(experiment)
    if storage.shared_volume:
        shared = storage.shared_volume
        volumes.append(
            Volume(
                "shared",
                "shared",
                shared.mount_point or "",
                size_gb=shared.size_gb,
                storage_class=shared.storage_class,
                access_mode=shared.access_mode,
            )
        )
    volumes += [Volume("pvc", pvc.name, pvc.mount_point or "") for pvc in storage.pvcs]
    variables, warnings = environment(experiment, path_of=path_of)
    return Workload(
        experiment_id=str(experiment.pk),
        project_id=str(experiment.project_id),
        operator=spec.operator,
        image=experiment.image,
        command=spec.command,
        groups=groups_of(spec),
        env={v.name: v.value for v in variables},
        volumes=volumes,
        timeout=spec.timeout,
        ray_version=spec.ray_version,
        warnings=warnings,
        secret_env=frozenset(v.name for v in variables if v.sensitive),
        namespace=experiment.project.namespace,
        context=experiment.typed_manifest.builder.context,
        features=frozenset(
            name
            for name, asked in (
                ("tensorboard", spec.tensorboard),
                ("jupyter", spec.debug.jupyter),
                ("vscode", spec.debug.vscode.enabled),
            )
            if asked
        ),
    )
