"""Validate Kubernetes objects the way an API server with `fieldValidation=Strict` would, for the
fake API server and for k8s_render's tests (no cluster can run here).

`validate_object(obj)` returns the causes a real server would put in its 422 `Status`, as
"field.path: message" strings; an empty list means the object would be accepted.

- Core kinds: the JSON schemas `kubernetes-validate` ships for one pinned minor (`K8S_MINOR`),
  strict variant (unknown fields rejected).
- Custom resources: the upstream CRDs' `openAPIV3Schema` (`/work/shared/k8s/crds`), with
  jsonschema plus a walk that rejects fields the schema does not declare (JSON schema alone lets
  them through; the server rejects them unless `x-kubernetes-preserve-unknown-fields`).
- Both: what the schemas cannot express but the server (or the operator's admission webhook)
  checks: metadata.name syntax per kind, label keys and values, container/volume/env names and
  volume mounts that name a declared volume.

Not checked (known gaps): CEL rules (`x-kubernetes-validations`), defaults, formats such as
int32 ranges, immutability on update.
"""

import functools
import gzip
import importlib.resources
import json
import os
import re
import subprocess
from pathlib import Path

import jsonschema
import referencing
import yaml

# 1.36: the Kubernetes the pinned operators were built against (JobSet v0.12.0 and KubeRay v1.7.0
# embed k8s.io/api v0.36, training-operator v1.9.4 v0.36.3) and the official client v36.
K8S_MINOR = "1.36"

# kind -> (apiVersion, CRD file); the CRD version is apiVersion's
CRDS = {
    "JobSet": ("jobset.x-k8s.io/v1alpha2", "jobset.x-k8s.io_jobsets.yaml.gz"),
    "PyTorchJob": ("kubeflow.org/v1", "kubeflow.org_pytorchjobs.yaml.gz"),
    "XGBoostJob": ("kubeflow.org/v1", "kubeflow.org_xgboostjobs.yaml.gz"),
    "JAXJob": ("kubeflow.org/v1", "kubeflow.org_jaxjobs.yaml.gz"),
    "TFJob": ("kubeflow.org/v1", "kubeflow.org_tfjobs.yaml.gz"),
    "RayJob": ("ray.io/v1", "ray.io_rayjobs.yaml.gz"),
    "RayCluster": ("ray.io/v1", "ray.io_rayclusters.yaml.gz"),
}
CORE = {
    "Namespace": "v1",
    "Secret": "v1",
    "Pod": "v1",
    "PersistentVolumeClaim": "v1",
    "Service": "v1",
    "ConfigMap": "v1",
    "Event": "v1",
    "Job": "batch/v1",
}

DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
DNS1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
LABEL_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
ENV_NAME = re.compile(r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")
IANA_SVC_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$")

# What kind of name each kind takes. "label" = DNS-1123 label, "1035" = DNS-1035 label,
# "subdomain" = DNS-1123 subdomain; the number is the longest name accepted. JobSet, the Kubeflow
# jobs and the Ray kinds take their rule from the operator's admission webhook / validation
# (the names become parts of Job, pod and Service names); RayJob's 47 leaves room for the
# RayCluster suffix KubeRay appends.
NAME_RULES = {
    "Namespace": ("label", 63),
    "Service": ("1035", 63),
    "Job": ("label", 63),  # the Job name becomes the `batch.kubernetes.io/job-name` label value
    "JobSet": ("1035", 63),
    "PyTorchJob": ("1035", 63),
    "XGBoostJob": ("1035", 63),
    "JAXJob": ("1035", 63),
    "TFJob": ("1035", 63),
    "RayJob": ("1035", 47),
    "RayCluster": ("1035", 63),
}
OBJECT_META_FIELDS = {
    "name",
    "generateName",
    "namespace",
    "selfLink",
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "labels",
    "annotations",
    "ownerReferences",
    "finalizers",
    "managedFields",
}


class SchemasMissing(RuntimeError):
    pass


def crds_dir() -> Path:
    """The shared k8s reference data's crds/ folder: AICHOR_K8S_SHARED, else `shared/k8s` beside
    this checkout, beside the checkout it was cloned from (a CI clone elsewhere), or /work."""
    shared = os.environ.get("AICHOR_K8S_SHARED")
    if shared:
        candidates = [Path(shared)]
    else:
        repo = Path(__file__).resolve().parents[2]
        candidates = [repo.parent / "shared" / "k8s"]
        origin = _clone_origin(repo)
        if origin:
            candidates.append(origin.parent / "shared" / "k8s")
        candidates.append(Path("/work/shared/k8s"))
    for base in candidates:
        if (base / "crds").is_dir():
            return base / "crds"
    raise SchemasMissing(
        f"CRD schemas not found at {', '.join(str(b / 'crds') for b in candidates)}: set AICHOR_K8S_SHARED "
        "to the folder holding crds/ (the shared k8s reference data)"
    )


def _clone_origin(repo: Path) -> Path | None:
    """The local checkout `repo` was cloned from, if it was cloned from a folder."""
    try:
        url = subprocess.run(
            ["git", "-C", str(repo), "config", "--get", "remote.origin.url"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    path = Path(url.removeprefix("file://")) if url.startswith(("/", "file://")) else None
    return path if path and path.is_dir() else None


@functools.cache
def crd_schema(kind: str) -> dict:
    api_version, filename = CRDS[kind]
    version = api_version.split("/")[1]
    path = crds_dir() / filename
    if not path.exists():
        raise SchemasMissing(f"CRD file missing: {path}")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        crd = yaml.load(f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    for v in crd["spec"]["versions"]:
        if v["name"] == version:
            return v["schema"]["openAPIV3Schema"]
    raise SchemasMissing(f"{filename} has no version {version}")


@functools.cache
def _crd_validator(kind: str) -> jsonschema.Draft7Validator:
    return jsonschema.Draft7Validator(crd_schema(kind))


def _schema_json(name: str) -> dict:
    ref = importlib.resources.files("kubernetes_validate").joinpath(
        f"kubernetes-json-schema/v{K8S_MINOR}.0-local-strict/{name}"
    )
    return json.loads(ref.read_text(encoding="utf-8"))


@functools.cache
def _core_registry() -> referencing.Registry:
    # kubernetes_validate.validate() re-reads the 2 MB definitions file on every call; the fake
    # server validates every request, so load it once.
    definitions = referencing.Resource.from_contents(_schema_json("_definitions.json"))
    return definitions @ referencing.Registry()


@functools.cache
def _core_validator(kind: str, api_version: str) -> jsonschema.Draft202012Validator:
    group_version = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version)
    schema = _schema_json(f"{kind.lower()}-{group_version}.json")
    return jsonschema.Draft202012Validator(schema, registry=_core_registry())


def _path(parts) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "<root>"


def _schema_causes(validator, obj: dict) -> list[str]:
    causes = []
    for error in sorted(validator.iter_errors(obj), key=lambda e: list(map(str, e.absolute_path))):
        causes.append(f"{_path(error.absolute_path)}: {error.message}")
    return causes


def _unknown_fields(value, schema: dict, path: list) -> list[str]:
    """Fields the schema does not declare, as the server's strict field validation reports them."""
    if not isinstance(schema, dict) or schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    causes = []
    if isinstance(value, dict):
        props = schema.get("properties")
        extra = schema.get("additionalProperties")
        for key, item in value.items():
            if props is not None and key in props:
                causes += _unknown_fields(item, props[key], [*path, key])
            elif isinstance(extra, dict):
                causes += _unknown_fields(item, extra, [*path, key])
            elif extra is True:
                continue
            elif props is not None or schema.get("type") == "object":
                causes.append(f'{_path([*path, key])}: unknown field "{key}"')
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            causes += _unknown_fields(item, schema["items"], [*path, i])
    return causes


def _name_causes(name, rule: str, limit: int, path: str) -> list[str]:
    if not isinstance(name, str) or not name:
        return [f"{path}: Required value: name is required"]
    pattern, what = {
        "label": (DNS1123_LABEL, "a lowercase RFC 1123 label"),
        "1035": (DNS1035_LABEL, "a DNS-1035 label (lowercase, starts with a letter)"),
        "subdomain": (DNS1123_SUBDOMAIN, "a lowercase RFC 1123 subdomain"),
    }[rule]
    causes = []
    if len(name) > limit:
        causes.append(f"{path}: Invalid value: {name!r}: must be no more than {limit} characters")
    if not pattern.match(name):
        causes.append(f"{path}: Invalid value: {name!r}: must be {what}")
    return causes


def _qualified_name(key, path: str) -> list[str]:
    if not isinstance(key, str):
        return [f"{path}: Invalid value: {key!r}: must be a string"]
    prefix, _, name = key.rpartition("/")
    causes = []
    if "/" in key and (not prefix or len(prefix) > 253 or not DNS1123_SUBDOMAIN.match(prefix)):
        causes.append(f"{path}: Invalid value: {key!r}: prefix must be a DNS-1123 subdomain")
    if not name or len(name) > 63 or not LABEL_NAME.match(name):
        causes.append(
            f"{path}: Invalid value: {key!r}: name part must be 63 characters or less, alphanumeric, "
            "'-', '_' or '.', starting and ending with an alphanumeric character"
        )
    return causes


def _labels_causes(labels, path: str) -> list[str]:
    if not isinstance(labels, dict):
        return []
    causes = []
    for key, value in labels.items():
        causes += _qualified_name(key, f"{path}[{key}]" if isinstance(key, str) else path)
        if not isinstance(value, str):
            continue  # the schema reports the type
        if value and (len(value) > 63 or not LABEL_NAME.match(value)):
            causes.append(
                f"{path}[{key}]: Invalid value: {value!r}: a label value must be 63 characters or less, "
                "empty or alphanumeric with '-', '_' or '.' inside"
            )
    return causes


def _meta_causes(meta, path: str, *, top_kind: str | None) -> list[str]:
    if not isinstance(meta, dict):
        return [] if meta is None and top_kind is None else [f"{path}: Required value"]
    causes = []
    if top_kind in CRDS:
        # A custom resource's metadata is ObjectMeta on the server, not the CRD schema's bare
        # `type: object` (core kinds' schemas already say so).
        causes += [f'{path}.{k}: unknown field "{k}"' for k in meta if k not in OBJECT_META_FIELDS]
    if top_kind is not None:
        if not meta.get("generateName") or meta.get("name"):
            rule, limit = NAME_RULES.get(top_kind, ("subdomain", 253))
            causes += _name_causes(meta.get("name"), rule, limit, f"{path}.name")
    causes += _labels_causes(meta.get("labels"), f"{path}.labels")
    annotations = meta.get("annotations")
    if isinstance(annotations, dict):
        for key in annotations:
            causes += _qualified_name(key, f"{path}.annotations")
    return causes


def _pod_spec_causes(spec, path: str) -> list[str]:
    if not isinstance(spec, dict):
        return []
    causes = []
    volumes = set()
    for i, vol in enumerate(spec.get("volumes") or []):
        if isinstance(vol, dict):
            causes += _name_causes(vol.get("name"), "label", 63, f"{path}.volumes[{i}].name")
            volumes.add(vol.get("name"))
    seen = set()
    for field in ("initContainers", "containers"):
        for i, c in enumerate(spec.get(field) or []):
            if not isinstance(c, dict):
                continue
            where = f"{path}.{field}[{i}]"
            causes += _name_causes(c.get("name"), "label", 63, f"{where}.name")
            if c.get("name") in seen:
                causes.append(f"{where}.name: Duplicate value: {c.get('name')!r}")
            seen.add(c.get("name"))
            for j, env in enumerate(c.get("env") or []):
                name = env.get("name") if isinstance(env, dict) else None
                if not isinstance(name, str) or not ENV_NAME.match(name):
                    causes.append(
                        f"{where}.env[{j}].name: Invalid value: {name!r}: must be a valid environment variable name"
                    )
            for j, mount in enumerate(c.get("volumeMounts") or []):
                if isinstance(mount, dict) and mount.get("name") not in volumes:
                    causes.append(f"{where}.volumeMounts[{j}].name: Not found: {mount.get('name')!r}")
            for j, port in enumerate(c.get("ports") or []):
                name = port.get("name") if isinstance(port, dict) else None
                if name is not None and (len(name) > 15 or not IANA_SVC_NAME.match(name) or "--" in name):
                    causes.append(f"{where}.ports[{j}].name: Invalid value: {name!r}: must be an IANA_SVC_NAME")
    return causes


def _templates(obj: dict):
    """(path, pod template) of every pod template embedded in obj."""
    kind, spec = obj.get("kind"), obj.get("spec")
    if not isinstance(spec, dict):
        return
    if kind == "Job":
        yield "spec.template", spec.get("template")
    elif kind == "JobSet":
        for i, rj in enumerate(spec.get("replicatedJobs") or []):
            job_spec = ((rj or {}).get("template") or {}).get("spec") or {}
            yield f"spec.replicatedJobs[{i}].template.spec.template", job_spec.get("template")
    elif kind in ("PyTorchJob", "XGBoostJob", "JAXJob", "TFJob"):
        field = {"PyTorchJob": "pytorch", "XGBoostJob": "xgb", "JAXJob": "jax", "TFJob": "tf"}[kind]
        for rtype, rs in (spec.get(f"{field}ReplicaSpecs") or {}).items():
            yield f"spec.{field}ReplicaSpecs[{rtype}].template", (rs or {}).get("template")
    elif kind in ("RayJob", "RayCluster"):
        cluster, base = (spec.get("rayClusterSpec"), "spec.rayClusterSpec") if kind == "RayJob" else (spec, "spec")
        if isinstance(cluster, dict):
            yield f"{base}.headGroupSpec.template", (cluster.get("headGroupSpec") or {}).get("template")
            for i, group in enumerate(cluster.get("workerGroupSpecs") or []):
                yield f"{base}.workerGroupSpecs[{i}].template", (group or {}).get("template")
        if kind == "RayJob" and spec.get("submitterPodTemplate"):
            yield "spec.submitterPodTemplate", spec["submitterPodTemplate"]


def _kind_extra_causes(obj: dict) -> list[str]:
    kind, spec = obj.get("kind"), obj.get("spec") or {}
    causes = []
    if kind == "JobSet" and isinstance(spec, dict):
        jobset = (obj.get("metadata") or {}).get("name") or ""
        for i, rj in enumerate(spec.get("replicatedJobs") or []):
            if not isinstance(rj, dict):
                continue
            path = f"spec.replicatedJobs[{i}].name"
            causes += _name_causes(rj.get("name"), "1035", 63, path)
            # JobSet's webhook: the longest Job name, and the longest pod name with the 5
            # random characters the Job controller appends, must be DNS-1035 labels.
            replicas = rj.get("replicas") if isinstance(rj.get("replicas"), int) else 1
            job = f"{jobset}-{rj.get('name')}-{max(replicas - 1, 0)}"
            causes += _name_causes(job, "1035", 63, f"{path} (Job name {job})")
            job_spec = ((rj.get("template") or {}).get("spec")) or {}
            completions = job_spec.get("completions")
            if job_spec.get("completionMode") == "Indexed" and isinstance(completions, int):
                pod = f"{job}-{max(completions - 1, 0)}-abcde"
                causes += _name_causes(pod, "1035", 63, f"{path} (pod name {pod})")
    if kind == "RayJob" and isinstance(spec, dict):
        for i, group in enumerate((spec.get("rayClusterSpec") or {}).get("workerGroupSpecs") or []):
            if isinstance(group, dict):
                causes += _name_causes(
                    group.get("groupName"), "label", 63, f"spec.rayClusterSpec.workerGroupSpecs[{i}].groupName"
                )
    return causes


def validate_object(obj: dict) -> list[str]:
    """The causes a strict API server would reject obj with; [] when it would accept it."""
    if not isinstance(obj, dict):
        return ["<root>: Invalid value: not an object"]
    kind, api_version = obj.get("kind"), obj.get("apiVersion")
    if kind in CRDS:
        if api_version != CRDS[kind][0]:
            return [f"apiVersion: Unsupported value: {api_version!r}: supported values: {CRDS[kind][0]!r}"]
        causes = _schema_causes(_crd_validator(kind), obj)
        causes += _unknown_fields({k: v for k, v in obj.items() if k != "metadata"}, crd_schema(kind), [])
    elif CORE.get(kind) == api_version:
        causes = _schema_causes(_core_validator(kind, api_version), obj)
    else:
        return [f"kind: no resource {kind!r} in {api_version!r} (known: {sorted({**CORE, **CRDS})})"]
    causes += _meta_causes(obj.get("metadata"), "metadata", top_kind=kind)
    for path, template in _templates(obj):
        if isinstance(template, dict):
            causes += _meta_causes(template.get("metadata"), f"{path}.metadata", top_kind=None)
            causes += _pod_spec_causes(template.get("spec"), f"{path}.spec")
    if kind == "Pod":
        causes += _pod_spec_causes(obj.get("spec"), "spec")
    causes += _kind_extra_causes(obj)
    return list(dict.fromkeys(causes))
