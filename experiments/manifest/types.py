"""The typed manifest: what `parse_manifest` returns and what an experiment keeps.

Frozen dataclasses, every default already filled in by validation. The stored form (the
experiment's `manifest` JSON) is the normalised dict of AIchor's own key names: `to_dict()`
writes it and `from_dict()` reads it back, so rows written before these types existed load
unchanged. No Django imports: the CLI validates with the same code before uploading."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# A GPU type this long or shorter ("A100", "H100-80GB") fits a table column beside its count.
SHORT_GPU_TYPE = 10


def _number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else round(value, 1)


@dataclass(frozen=True)
class Gpu:
    count: int = 1
    type: str | None = None
    product: str | None = None

    @property
    def kind(self) -> str:
        """What to call these GPUs: the product when named, else the type unless it is the
        generic `gpu` AIchor's own examples write; "" when nothing tells."""
        if self.product:
            return self.product
        return "" if (self.type or "").lower() == "gpu" else self.type or ""


@dataclass(frozen=True)
class Tpu:
    type: str | None = None
    topology: str | None = None
    chips: int | None = None


@dataclass(frozen=True)
class Resources:
    """One process's request."""

    cpus: float = 1
    # memory in GB, from `memory` or `ramRatio × cpus`
    memory_gb: float | None = None
    ram_ratio: float | None = None
    memory: float | None = None
    cpu_limit_ratio: float = 2
    shm_size_gb: float | None = None
    gpu: Gpu | None = None
    tpu: Tpu | None = None
    rdma: dict | None = None
    extra_selectors: dict[str, str] = field(default_factory=dict)
    extra_tolerations: list[dict] = field(default_factory=list)

    @property
    def gpus(self) -> int:
        return self.gpu.count if self.gpu else 0

    @classmethod
    def from_dict(cls, data: dict | None) -> Resources:
        data = data or {}
        gpu, tpu = data.get("gpu"), data.get("tpu")
        return cls(
            cpus=data.get("cpus") if data.get("cpus") is not None else 1,
            memory_gb=data.get("memoryGB"),
            ram_ratio=data.get("ramRatio"),
            memory=data.get("memory"),
            cpu_limit_ratio=data.get("cpuLimitRatio") if data.get("cpuLimitRatio") is not None else 2,
            shm_size_gb=data.get("shmSizeGB"),
            gpu=Gpu(count=gpu.get("count") or 0, type=gpu.get("type"), product=gpu.get("product")) if gpu else None,
            tpu=Tpu(type=tpu.get("type"), topology=tpu.get("topology"), chips=tpu.get("tpuChipsCount"))
            if tpu
            else None,
            rdma=data.get("rdma"),
            extra_selectors=dict(data.get("extraSelectors") or {}),
            extra_tolerations=list(data.get("extraTolerations") or []),
        )

    def to_dict(self) -> dict:
        return {
            "cpus": self.cpus,
            "memoryGB": self.memory_gb,
            "ramRatio": self.ram_ratio,
            "memory": self.memory,
            "cpuLimitRatio": self.cpu_limit_ratio,
            "shmSizeGB": self.shm_size_gb,
            "gpu": {"count": self.gpu.count, "type": self.gpu.type, "product": self.gpu.product} if self.gpu else None,
            "tpu": {"type": self.tpu.type, "topology": self.tpu.topology, "tpuChipsCount": self.tpu.chips}
            if self.tpu
            else None,
            "rdma": self.rdma,
            "extraSelectors": dict(self.extra_selectors),
            "extraTolerations": list(self.extra_tolerations),
        }


@dataclass(frozen=True)
class Totals:
    """What a whole experiment asks for while all its processes that run at once run."""

    processes: int = 0
    cpus: float = 0
    memory_gb: float = 0
    # GPU count by kind (`Gpu.kind`: the product, else the type; "" when the manifest names neither)
    gpus_by_type: dict[str, int] = field(default_factory=dict)
    tpu_chips: int = 0

    @property
    def gpus(self) -> int:
        return sum(self.gpus_by_type.values())

    @property
    def gpu_text(self) -> str:
        """ "8 × A100", "8 × A100 + 2 × T4", "8" when no type is named, "0"."""
        parts = [f"{n} × {kind.upper()}" if kind else str(n) for kind, n in self.gpus_by_type.items()]
        return " + ".join(parts) or "0"

    @property
    def gpu_short(self) -> str:
        """For a table column: the type only when a single short one is named, else the total."""
        kinds = list(self.gpus_by_type)
        if len(kinds) == 1 and 0 < len(kinds[0]) <= SHORT_GPU_TYPE:
            return self.gpu_text
        return str(self.gpus)

    def as_json(self) -> dict:
        """The figures the table, the page, the API and the CLI show."""
        return {
            "processes": self.processes,
            "cpus": _number(self.cpus),
            "gpus": self.gpus,
            "gpus_by_type": dict(self.gpus_by_type),
            "memory_gb": _number(self.memory_gb),
            "tpu_chips": self.tpu_chips,
        }


@dataclass(frozen=True)
class ProcessGroup:
    """A manifest type: `worker`, `Master`, `Worker`, `main`, a jobset group, the kuberay
    `Head`, or one kuberay worker pool (`ray_pool` set)."""

    name: str
    count: int
    resources: Resources
    completions: int = 1
    parallelisms: int = 1
    ray_start_params: dict[str, str] = field(default_factory=dict)
    ray_pool: bool = False

    @property
    def at_once(self) -> int:
        """Processes of this group running at the same time (a jobset replica runs
        `min(parallelisms, completions)` of its completions at once)."""
        return self.count * min(self.parallelisms, self.completions)

    @classmethod
    def from_dict(cls, name: str, data: dict, *, ray_pool: bool = False) -> ProcessGroup:
        count = data.get("count")
        return cls(
            name=name,
            count=(1 if name == "Head" and not ray_pool else 0) if count is None else count,
            resources=Resources.from_dict(data.get("resources")),
            completions=data.get("completions") or 1,
            parallelisms=data.get("parallelisms") or 1,
            ray_start_params=dict(data.get("rayStartParams") or {}),
            ray_pool=ray_pool,
        )

    def to_dict(self) -> dict:
        if self.ray_pool:
            return {"name": self.name, "count": self.count, "resources": self.resources.to_dict()}
        data: dict[str, Any] = {
            "count": self.count,
            "completions": self.completions,
            "parallelisms": self.parallelisms,
            "resources": self.resources.to_dict(),
        }
        if self.name == "Head":
            data["rayStartParams"] = dict(self.ray_start_params)
        return data


@dataclass(frozen=True)
class SharedVolume:
    size_gb: float | None
    mount_point: str | None = None
    storage_class: str | None = None
    access_mode: str | None = None


@dataclass(frozen=True)
class PvcMount:
    name: str
    mount_point: str | None


@dataclass(frozen=True)
class Storage:
    shared_volume: SharedVolume | None = None
    pvcs: list[PvcMount] = field(default_factory=list)


@dataclass(frozen=True)
class VsCode:
    enabled: bool = False
    path: str | None = None
    provider: str | None = None


@dataclass(frozen=True)
class Debug:
    jupyter: bool = False
    vscode: VsCode = field(default_factory=VsCode)
    # seconds to keep a failed experiment's processes for a terminal; None: don't
    hold_on_failure: int | None = None


@dataclass(frozen=True)
class SkipBuild:
    enabled: bool = False
    experiment_id: str | None = None
    fail_if_not_found: bool = False


@dataclass(frozen=True)
class Builder:
    image: str | None = None
    dockerfile: str = "Dockerfile"
    context: str = "."
    build_args: dict[str, str] = field(default_factory=dict)
    registry: str | None = None
    target: str | None = None
    skip_build: SkipBuild = field(default_factory=SkipBuild)


@dataclass(frozen=True)
class Clone:
    depth: int = 1
    include_dot_git: bool = False
    submodules: str = "false"  # "false", "true" or "recursive"


@dataclass(frozen=True)
class Spec:
    operator: str
    image: str
    command: str
    # manifest types in manifest order; for kuberay the Head, then each worker pool
    groups: list[ProcessGroup]
    timeout: int | None = None
    env: dict[str, str] = field(default_factory=dict)
    tensorboard: bool = False
    storage: Storage = field(default_factory=Storage)
    debug: Debug = field(default_factory=Debug)
    ray_version: str | None = None

    def group(self, *names: str) -> ProcessGroup | None:
        """The first non-pool group called one of `names` (`worker` or `Worker`…)."""
        for name in names:
            for group in self.groups:
                if group.name == name and not group.ray_pool:
                    return group
        return None

    @property
    def ray_pools(self) -> list[ProcessGroup]:
        return [group for group in self.groups if group.ray_pool]


@dataclass(frozen=True)
class Manifest:
    builder: Builder
    clone: Clone
    spec: Spec
    api_version: str = "0.2.3"
    kind: str = "AIchorManifest"

    def totals(self) -> Totals:
        cpus = memory = 0.0
        processes = chips = 0
        gpus: dict[str, int] = {}
        for group in self.spec.groups:
            n, res = group.at_once, group.resources
            processes += n
            cpus += n * res.cpus
            memory += n * (res.memory_gb or 0)
            if res.gpu and res.gpu.count:
                kind = res.gpu.kind
                gpus[kind] = gpus.get(kind, 0) + n * res.gpu.count
            if res.tpu and res.tpu.chips:
                chips += n * res.tpu.chips
        return Totals(processes=processes, cpus=cpus, memory_gb=memory, gpus_by_type=gpus, tpu_chips=chips)

    # -- the stored form

    @classmethod
    def from_dict(cls, data: dict) -> Manifest:
        builder, clone, spec = data.get("builder") or {}, data.get("clone") or {}, data.get("spec") or {}
        skip = builder.get("skipBuild") or {}
        storage = spec.get("storage") or {}
        shared = storage.get("sharedVolume")
        debug = spec.get("debug") or {}
        vscode = debug.get("vscode") or {}
        groups = [ProcessGroup.from_dict(name, group) for name, group in (spec.get("types") or {}).items()]
        groups += [ProcessGroup.from_dict(pool["name"], pool, ray_pool=True) for pool in spec.get("workers") or []]
        return cls(
            kind=data.get("kind") or "AIchorManifest",
            api_version=data.get("apiVersion") or "0.2.3",
            builder=Builder(
                image=builder.get("image"),
                dockerfile=builder.get("dockerfile") or "Dockerfile",
                context=builder.get("context") or ".",
                build_args=dict(builder.get("buildArgs") or {}),
                registry=builder.get("registry"),
                target=builder.get("target"),
                skip_build=SkipBuild(
                    enabled=bool(skip.get("enabled")),
                    experiment_id=skip.get("experimentID"),
                    fail_if_not_found=bool(skip.get("failIfNotFound")),
                ),
            ),
            clone=Clone(
                depth=clone.get("depth") or 1,
                include_dot_git=bool(clone.get("includeDotGit")),
                submodules=clone.get("submodules") or "false",
            ),
            spec=Spec(
                operator=spec.get("operator"),
                image=spec.get("image"),
                command=spec.get("command"),
                groups=groups,
                timeout=spec.get("timeout"),
                env=dict(spec.get("env") or {}),
                tensorboard=bool((spec.get("tensorboard") or {}).get("enabled")),
                storage=Storage(
                    shared_volume=SharedVolume(
                        size_gb=shared.get("sizeGB"),
                        mount_point=shared.get("mountPoint"),
                        storage_class=shared.get("storageClass"),
                        access_mode=shared.get("accessMode"),
                    )
                    if shared
                    else None,
                    pvcs=[
                        PvcMount(p.get("name"), p.get("mountPoint")) for p in storage.get("attachExistingPVCs") or []
                    ],
                ),
                debug=Debug(
                    jupyter=bool(debug.get("jupyter")),
                    vscode=VsCode(
                        enabled=bool(vscode.get("enabled")), path=vscode.get("path"), provider=vscode.get("provider")
                    ),
                    hold_on_failure=debug.get("holdOnFailure"),
                ),
                ray_version=spec.get("rayVersion"),
            ),
        )

    def to_dict(self) -> dict:
        spec, builder = self.spec, self.builder
        shared = spec.storage.shared_volume
        data = {
            "kind": self.kind,
            "apiVersion": self.api_version,
            "builder": {
                "image": builder.image,
                "dockerfile": builder.dockerfile,
                "context": builder.context,
                "buildArgs": dict(builder.build_args),
                "registry": builder.registry,
                "target": builder.target,
                "skipBuild": {
                    "enabled": builder.skip_build.enabled,
                    "experimentID": builder.skip_build.experiment_id,
                    "failIfNotFound": builder.skip_build.fail_if_not_found,
                },
            },
            "clone": {
                "depth": self.clone.depth,
                "includeDotGit": self.clone.include_dot_git,
                "submodules": self.clone.submodules,
            },
            "spec": {
                "operator": spec.operator,
                "image": spec.image,
                "command": spec.command,
                "timeout": spec.timeout,
                "env": dict(spec.env),
                "tensorboard": {"enabled": spec.tensorboard},
                "storage": {
                    "sharedVolume": {
                        "mountPoint": shared.mount_point,
                        "sizeGB": shared.size_gb,
                        "storageClass": shared.storage_class,
                        "accessMode": shared.access_mode,
                    }
                    if shared
                    else None,
                    "attachExistingPVCs": [{"name": p.name, "mountPoint": p.mount_point} for p in spec.storage.pvcs],
                },
                "debug": {
                    "jupyter": spec.debug.jupyter,
                    "vscode": {
                        "enabled": spec.debug.vscode.enabled,
                        "path": spec.debug.vscode.path,
                        "provider": spec.debug.vscode.provider,
                    },
                    "holdOnFailure": spec.debug.hold_on_failure,
                },
                "rayVersion": spec.ray_version,
                "types": {g.name: g.to_dict() for g in spec.groups if not g.ray_pool},
            },
        }
        if spec.operator == "kuberay":
            data["spec"]["workers"] = [g.to_dict() for g in spec.ray_pools]
        return data
