"""The object store behind the fake Kubernetes API server (a fake because no cluster can run on
this machine): resources, resourceVersions, label and field selectors, patches, the watch
history, and deletion with owner references (foreground, background, orphan) as the real API
server and garbage collector do it. Everything received from outside is validated with
`tests.k8s.schemas.validate_object`; a rejected object is a 422 `Status` like the real one."""

from __future__ import annotations

import base64
import copy
import json
import random
import re
import threading
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from tests.k8s.schemas import validate_object


@dataclass(frozen=True)
class Resource:
    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool = True
    has_status: bool = True
    short: tuple = ()

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def qualified(self) -> str:
        """How the real server names the resource in messages: `jobs.batch`, `pods`."""
        return f"{self.plural}.{self.group}" if self.group else self.plural

    @property
    def builtin(self) -> bool:
        return self.group in ("", "batch")


RESOURCES = [
    Resource("", "v1", "namespaces", "Namespace", namespaced=False, short=("ns",)),
    Resource("", "v1", "secrets", "Secret", has_status=False),
    Resource("", "v1", "pods", "Pod", short=("po",)),
    Resource("", "v1", "services", "Service", short=("svc",)),
    Resource("", "v1", "configmaps", "ConfigMap", has_status=False, short=("cm",)),
    Resource("", "v1", "persistentvolumeclaims", "PersistentVolumeClaim", short=("pvc",)),
    Resource("", "v1", "events", "Event", has_status=False, short=("ev",)),
    Resource("batch", "v1", "jobs", "Job"),
    Resource("jobset.x-k8s.io", "v1alpha2", "jobsets", "JobSet"),
    Resource("kubeflow.org", "v1", "pytorchjobs", "PyTorchJob"),
    Resource("kubeflow.org", "v1", "xgboostjobs", "XGBoostJob"),
    Resource("kubeflow.org", "v1", "jaxjobs", "JAXJob"),
    Resource("kubeflow.org", "v1", "tfjobs", "TFJob"),
    Resource("ray.io", "v1", "rayjobs", "RayJob"),
    Resource("ray.io", "v1", "rayclusters", "RayCluster"),
]
BY_PATH = {(r.group, r.version, r.plural): r for r in RESOURCES}
BY_KIND = {r.kind: r for r in RESOURCES}
# The API server keeps a window of changes to resume watches from; older is 410 Gone.
HISTORY = 10_000
# Lists whose items a strategic merge patch merges by a key instead of replacing.
MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "ephemeralContainers": "name",
    "volumes": "name",
    "env": "name",
    "volumeMounts": "mountPath",
    "ports": "containerPort",
    "conditions": "type",
    "ownerReferences": "uid",
    "imagePullSecrets": "name",
    "containerStatuses": "name",
    "initContainerStatuses": "name",
}
NAME_CHARS = "bcdfghjklmnpqrstvwxz2456789"  # what apiserver's generateName draws from


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class ApiError(Exception):
    """An error the server answers with a `Status` body."""

    def __init__(self, code: int, reason: str, message: str, details: dict | None = None) -> None:
        super().__init__(message)
        self.code, self.reason, self.message, self.details = code, reason, message, details

    def status(self) -> dict:
        body = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        }
        if self.details is not None:
            body["details"] = self.details
        return body


def _details(res: Resource, name: str, **more) -> dict:
    details = {"name": name, **({"group": res.group} if res.group else {}), "kind": res.plural}
    return details | more


def not_found(res: Resource, name: str) -> ApiError:
    return ApiError(404, "NotFound", f'{res.qualified} "{name}" not found', _details(res, name))


def invalid(res: Resource, name: str, causes: list[str]) -> ApiError:
    """A 422 as the real server words it: `Job.batch "x" is invalid: [a: b, c: d]`."""
    parsed = []
    for cause in causes:
        field, _, message = cause.partition(": ")
        parsed.append({"reason": _cause_reason(message), "message": message or field, "field": field})
    kind = f"{res.kind}.{res.group}" if res.group else res.kind
    text = causes[0] if len(causes) == 1 else "[" + ", ".join(causes) + "]"
    details = {"name": name, **({"group": res.group} if res.group else {}), "kind": res.kind, "causes": parsed}
    return ApiError(422, "Invalid", f'{kind} "{name}" is invalid: {text}', details)


def _cause_reason(message: str) -> str:
    for prefix, reason in (
        ("Required value", "FieldValueRequired"),
        ("Unsupported value", "FieldValueNotSupported"),
        ("Duplicate value", "FieldValueDuplicate"),
        ("Forbidden", "FieldValueForbidden"),
        ("Too long", "FieldValueTooLong"),
    ):
        if message.startswith(prefix):
            return reason
    return "FieldValueInvalid"


# --- selectors ------------------------------------------------------------------------------
_REQUIREMENT = re.compile(r"^\s*(!?)\s*([A-Za-z0-9_./-]+)\s*(?:(==|=|!=|\s+in\s+|\s+notin\s+)\s*(.*?))?\s*$")


def parse_label_selector(text: str | None) -> list[tuple[str, str, set[str]]]:
    """`a=b,c!=d,e in (x,y),f notin (z),g,!h` into (key, op, values); 400 when malformed."""
    if not text:
        return []
    parts, depth, current = [], 0, ""
    for ch in text:  # commas inside (…) belong to a set
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
            continue
        depth += ch == "("
        depth -= ch == ")"
        current += ch
    parts.append(current)
    requirements = []
    for part in parts:
        m = _REQUIREMENT.match(part)
        if not m or not part.strip():
            raise ApiError(400, "BadRequest", f'unable to parse requirement: invalid label selector "{text}"')
        negate, key, op, rest = m.groups()
        if negate:
            if op:
                raise ApiError(400, "BadRequest", f'unable to parse requirement: invalid label selector "{text}"')
            requirements.append((key, "!", set()))
        elif not op:
            requirements.append((key, "exists", set()))
        elif op.strip() in ("in", "notin"):
            rest = rest.strip()
            if not (rest.startswith("(") and rest.endswith(")")):
                raise ApiError(400, "BadRequest", f'unable to parse requirement: invalid label selector "{text}"')
            values = {v.strip() for v in rest[1:-1].split(",") if v.strip()}
            requirements.append((key, op.strip(), values))
        else:
            requirements.append((key, "!=" if op == "!=" else "=", {rest}))
    return requirements


def labels_match(labels: dict, requirements) -> bool:
    for key, op, values in requirements:
        present = key in labels
        if op == "=" and labels.get(key) not in values:
            return False
        if op == "!=" and present and labels[key] in values:
            return False
        if op == "in" and labels.get(key) not in values:
            return False
        if op == "notin" and present and labels[key] in values:
            return False
        if op == "exists" and not present:
            return False
        if op == "!" and present:
            return False
    return True


def parse_field_selector(text: str | None) -> list[tuple[str, bool, str]]:
    if not text:
        return []
    out = []
    for part in text.split(","):
        if "!=" in part:
            key, value = part.split("!=", 1)
            out.append((key.strip(), False, value.strip()))
        elif "=" in part:
            key, value = part.replace("==", "=").split("=", 1)
            out.append((key.strip(), True, value.strip()))
        else:
            raise ApiError(400, "BadRequest", f"invalid selector: '{text}'; can't understand '{part}'")
    return out


def fields_match(obj: dict, requirements) -> bool:
    for path, equal, value in requirements:
        node = obj
        for step in path.split("."):
            node = node.get(step) if isinstance(node, dict) else None
        if ((node if node is not None else "") == value) != equal:
            return False
    return True


# --- patches --------------------------------------------------------------------------------
def merge_patch(target, patch):
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def strategic_merge_patch(target, patch, key: str | None = None):
    """The strategic merge patch as far as an engine needs it: a merge patch whose known lists
    (containers, env, conditions, ownerReferences…) merge item by item on their merge key."""
    if isinstance(patch, dict):
        result = dict(target) if isinstance(target, dict) else {}
        for k, value in patch.items():
            if k.startswith("$"):
                continue  # directives ($patch, $setElementOrder…) are not modelled
            if value is None:
                result.pop(k, None)
            else:
                result[k] = strategic_merge_patch(result.get(k), value, k)
        return result
    if isinstance(patch, list) and key in MERGE_KEYS and isinstance(target, list):
        merge_key = MERGE_KEYS[key]
        result = [copy.deepcopy(item) for item in target]
        for item in patch:
            if not isinstance(item, dict) or merge_key not in item:
                result.append(copy.deepcopy(item))
                continue
            if item.get("$patch") == "delete":
                result = [r for r in result if r.get(merge_key) != item[merge_key]]
                continue
            for i, existing in enumerate(result):
                if isinstance(existing, dict) and existing.get(merge_key) == item[merge_key]:
                    result[i] = strategic_merge_patch(existing, item, None)
                    break
            else:
                result.append(copy.deepcopy(item))
        return result
    if key == "finalizers" and isinstance(patch, list) and isinstance(target, list):
        return list(dict.fromkeys([*target, *patch]))
    return copy.deepcopy(patch)


def json_patch(target: dict, operations: list) -> dict:
    """RFC 6902, the operations a client sends: add, remove, replace, test."""
    doc = copy.deepcopy(target)
    for op in operations:
        if not isinstance(op, dict) or "path" not in op:
            raise ApiError(400, "BadRequest", "the server rejected our request due to an error in our request")
        steps = [s.replace("~1", "/").replace("~0", "~") for s in op["path"].split("/")[1:]]
        parent = doc
        for step in steps[:-1]:
            parent = parent[int(step)] if isinstance(parent, list) else parent.setdefault(step, {})
        last = steps[-1] if steps else ""
        kind = op.get("op")
        try:
            if kind in ("add", "replace"):
                if isinstance(parent, list):
                    index = len(parent) if last == "-" else int(last)
                    if kind == "add":
                        parent.insert(index, op["value"])
                    else:
                        parent[index] = op["value"]
                else:
                    if kind == "replace" and last not in parent:
                        raise KeyError(last)
                    parent[last] = op["value"]
            elif kind == "remove":
                del parent[int(last) if isinstance(parent, list) else last]
            elif kind == "test":
                current = parent[int(last)] if isinstance(parent, list) else parent.get(last)
                if current != op.get("value"):
                    raise ApiError(422, "Invalid", f"testing value {op['path']} failed")
            else:
                raise ApiError(400, "BadRequest", f"Unexpected kind: {kind}")
        except (KeyError, IndexError, ValueError):
            raise ApiError(
                422,
                "Invalid",
                f"the server rejected our request: jsonpatch {kind} operation does not apply: "
                f'doc is missing path: "{op["path"]}"',
            ) from None
    return doc


# --- the store ------------------------------------------------------------------------------
class Store:
    """All objects of the fake cluster, under one lock. `listeners` receive every change (type,
    resource, object) to in-process controllers; watches read the history."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.changed = threading.Condition(self.lock)
        self.objects: dict[tuple[str, str, str], dict] = {}
        self.rv = 0
        self.history: deque = deque(maxlen=HISTORY)  # (rv, type, resource plural+group, object)
        self.listeners: list[Callable[[str, Resource, dict], None]] = []
        self.closed = False
        self.requests = 0  # API calls served, for benchmarks
        self.reset()

    def reset(self) -> None:
        with self.lock:
            self.objects.clear()
            self.history.clear()
            for name in ("default", "kube-system", "kube-public"):
                self.create(
                    BY_KIND["Namespace"], None, {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}
                )

    # -- reading
    def get(self, res: Resource, ns: str | None, name: str) -> dict:
        with self.lock:
            obj = self.objects.get((res.qualified, ns or "", name))
            if obj is None:
                raise not_found(res, name)
            return copy.deepcopy(obj)

    def find(self, res: Resource, ns: str | None, name: str) -> dict | None:
        try:
            return self.get(res, ns, name)
        except ApiError:
            return None

    def list(self, res: Resource, ns: str | None, labels=None, fields=None) -> tuple[list[dict], str]:
        labels, fields = parse_label_selector(labels), parse_field_selector(fields)
        with self.lock:
            items = [
                copy.deepcopy(obj)
                for (q, obj_ns, _), obj in sorted(self.objects.items())
                if q == res.qualified
                and (ns is None or obj_ns == ns)
                and labels_match(obj["metadata"].get("labels") or {}, labels)
                and fields_match(obj, fields)
            ]
            return items, str(self.rv)

    def dependents(self, uid: str) -> list[tuple[Resource, dict]]:
        with self.lock:
            return [
                (_resource_of(obj), copy.deepcopy(obj))
                for obj in self.objects.values()
                if any(ref.get("uid") == uid for ref in obj["metadata"].get("ownerReferences") or [])
            ]

    def by_uid(self, uid: str) -> tuple[Resource, dict] | None:
        with self.lock:
            for obj in self.objects.values():
                if obj["metadata"]["uid"] == uid:
                    return _resource_of(obj), copy.deepcopy(obj)
        return None

    # -- writing
    def create(self, res: Resource, ns: str | None, obj: dict, *, dry_run: bool = False) -> dict:
        obj = copy.deepcopy(obj)
        self._check_kind(res, obj)
        meta = obj.setdefault("metadata", {})
        if res.namespaced:
            if meta.get("namespace") not in (None, "", ns):
                raise ApiError(
                    400,
                    "BadRequest",
                    "the namespace of the provided object does not match the namespace sent on the request",
                )
            meta["namespace"] = ns
        else:
            meta.pop("namespace", None)
        with self.lock:
            if not meta.get("name") and meta.get("generateName"):
                meta["name"] = meta["generateName"] + "".join(random.choices(NAME_CHARS, k=5))
            name = meta.get("name") or ""
            if not name:
                raise invalid(res, "", ["metadata.name: Required value: name or generateName is required"])
            if res.namespaced:
                namespace = self.objects.get(("namespaces", "", ns))
                if namespace is None:
                    raise ApiError(404, "NotFound", f'namespaces "{ns}" not found', {"name": ns, "kind": "namespaces"})
                if namespace["metadata"].get("deletionTimestamp"):
                    raise ApiError(
                        403,
                        "Forbidden",
                        f'{res.plural} "{name}" is forbidden: unable to create new content in namespace {ns} '
                        "because it is being terminated",
                        _details(res, name),
                    )
            key = (res.qualified, ns or "", name)
            for server_set in ("uid", "resourceVersion", "creationTimestamp", "deletionTimestamp", "generation"):
                meta.pop(server_set, None)
            causes = validate_object(obj)  # as sent: defaults must not hide a client's mistake
            if causes:
                raise invalid(res, name, causes)
            meta["uid"] = str(uuid.uuid4())
            meta["creationTimestamp"] = now()
            _default(res, obj)
            if key in self.objects:
                raise ApiError(409, "AlreadyExists", f'{res.qualified} "{name}" already exists', _details(res, name))
            if res.has_status:
                meta["generation"] = 1
            if dry_run:
                return copy.deepcopy(obj)
            self._store(res, key, obj, "ADDED")
            return copy.deepcopy(obj)

    def replace(self, res: Resource, ns: str | None, name: str, obj: dict, *, subresource: str | None = None) -> dict:
        """PUT: the object as sent; on the main resource status is kept, on /status only status
        changes (the status subresource)."""
        obj = copy.deepcopy(obj)
        self._check_kind(res, obj)
        with self.lock:
            current = self.get(res, ns, name)
            sent_name = (obj.get("metadata") or {}).get("name")
            if sent_name not in (None, name):
                raise ApiError(
                    400,
                    "BadRequest",
                    f"the name of the object ({sent_name}) does not match the name on the URL ({name})",
                )
            sent_rv = (obj.get("metadata") or {}).get("resourceVersion")
            if sent_rv and sent_rv != current["metadata"]["resourceVersion"]:
                raise self._conflict(res, name)
            return self._update(res, current, obj, subresource)

    def patch(self, res: Resource, ns, name: str, body, content_type: str, *, subresource: str | None = None) -> dict:
        with self.lock:
            current = self.get(res, ns, name)
            if "json-patch" in content_type:
                if not isinstance(body, list):
                    raise ApiError(400, "BadRequest", "json patch must be a list of operations")
                patched = json_patch(current, body)
            elif not isinstance(body, dict):
                raise ApiError(400, "BadRequest", "the body of the request was in an unknown format")
            elif "strategic-merge-patch" in content_type:
                if not res.builtin:
                    raise ApiError(
                        415,
                        "UnsupportedMediaType",
                        "the body of the request was in an unknown format - accepted media types include: "
                        "application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml",
                    )
                patched = strategic_merge_patch(current, body)
            elif "merge-patch" in content_type:
                patched = merge_patch(current, body)
            else:
                raise ApiError(
                    415, "UnsupportedMediaType", f"the body of the request was in an unknown format - {content_type}"
                )
            sent_rv = (body.get("metadata") or {}).get("resourceVersion") if isinstance(body, dict) else None
            if sent_rv and sent_rv != current["metadata"]["resourceVersion"]:
                raise self._conflict(res, name)
            return self._update(res, current, patched, subresource)

    def mutate(self, res: Resource, ns, name: str, change: Callable[[dict], None], *, subresource=None) -> dict | None:
        """Read-modify-write for the in-process controllers (as their client would retry on 409);
        None when the object is gone."""
        with self.lock:
            current = self.find(res, ns, name)
            if current is None:
                return None
            new = copy.deepcopy(current)
            change(new)
            if new == current:
                return current
            return self._update(res, current, new, subresource)

    def _update(self, res: Resource, current: dict, new: dict, subresource: str | None) -> dict:
        meta = new.setdefault("metadata", {})
        old_meta = current["metadata"]
        if subresource == "status":
            new = {**copy.deepcopy(current), "status": new.get("status")}
            meta = new["metadata"]
        elif res.has_status:
            if "status" in current:
                new["status"] = copy.deepcopy(current["status"])
            else:
                new.pop("status", None)
        for fixed in ("uid", "creationTimestamp", "name", "namespace", "deletionTimestamp", "generation"):
            if fixed in old_meta:
                meta[fixed] = old_meta[fixed]
            else:
                meta.pop(fixed, None)
        meta["resourceVersion"] = old_meta["resourceVersion"]
        if res.has_status and subresource != "status" and new.get("spec") != current.get("spec"):
            meta["generation"] = old_meta.get("generation", 1) + 1
        if res.kind == "Secret":
            _fold_string_data(new)
        causes = validate_object(new)
        if causes:
            raise invalid(res, meta.get("name", ""), causes)
        if new == current:
            return copy.deepcopy(current)
        key = (res.qualified, meta.get("namespace", ""), meta["name"])
        if meta.get("deletionTimestamp") and not meta.get("finalizers"):
            self._remove(res, key)
            return new
        self._store(res, key, new, "MODIFIED")
        return copy.deepcopy(new)

    def delete(
        self, res: Resource, ns, name: str, *, propagation: str | None = None, grace: int | None = None
    ) -> tuple[dict, bool]:
        """(the object, whether it is gone already). Pods bound to a node end gracefully: the
        kubelet stops their containers and then removes them (`finalize_pod`)."""
        with self.lock:
            obj = self.get(res, ns, name)
            meta = obj["metadata"]
            key = (res.qualified, ns or "", name)
            if propagation is None:
                # batch/v1 Jobs orphan their pods unless told otherwise (a legacy the API keeps).
                propagation = "Orphan" if res.kind == "Job" else "Background"
            if propagation not in ("Orphan", "Background", "Foreground"):
                raise ApiError(
                    422,
                    "Invalid",
                    f'DeleteOptions.meta.k8s.io "" is invalid: propagationPolicy: Unsupported value: "{propagation}"',
                )
            if meta.get("deletionTimestamp"):
                return obj, False  # already being deleted
            if res.kind == "Namespace":
                return self._delete_namespace(res, key, obj), False
            if propagation == "Orphan":
                for dep_res, dep in self.dependents(meta["uid"]):
                    self.mutate(
                        dep_res, dep["metadata"].get("namespace"), dep["metadata"]["name"], _drop_owner(meta["uid"])
                    )
            graceful_pod = (
                res.kind == "Pod"
                and obj["spec"].get("nodeName")
                and (obj.get("status") or {}).get("phase") not in ("Succeeded", "Failed")
                and grace != 0
            )
            if propagation == "Foreground" or graceful_pod or meta.get("finalizers"):
                meta["deletionTimestamp"] = now()
                if propagation == "Foreground":
                    meta["finalizers"] = list(dict.fromkeys([*(meta.get("finalizers") or []), "foregroundDeletion"]))
                if graceful_pod:
                    meta["deletionGracePeriodSeconds"] = (
                        grace if grace is not None else obj["spec"].get("terminationGracePeriodSeconds", 30)
                    )
                self._store(res, key, obj, "MODIFIED")
                if propagation == "Foreground":
                    for dep_res, dep in self.dependents(meta["uid"]):
                        self.delete(
                            dep_res, dep["metadata"].get("namespace"), dep["metadata"]["name"], propagation="Foreground"
                        )
                    self._release_foreground(meta["uid"])
                return self.find(res, ns, name) or obj, self.find(res, ns, name) is None
            self._remove(res, key)
            return obj, True

    def finalize_pod(self, ns: str, name: str, uid: str) -> None:
        """The kubelet's last word on a pod it has stopped: the object goes."""
        with self.lock:
            key = ("pods", ns, name)
            obj = self.objects.get(key)
            if obj is not None and obj["metadata"]["uid"] == uid:
                if obj["metadata"].get("finalizers"):
                    return
                self._remove(BY_KIND["Pod"], key)

    def _delete_namespace(self, res, key, obj) -> dict:
        obj["metadata"]["deletionTimestamp"] = now()
        obj.setdefault("status", {})["phase"] = "Terminating"
        self._store(res, key, obj, "MODIFIED")
        ns = obj["metadata"]["name"]
        for q, obj_ns, name in [k for k in self.objects if k[1] == ns]:
            if (q, obj_ns, name) in self.objects:
                inner = _resource_of(self.objects[(q, obj_ns, name)])
                try:
                    self.delete(inner, ns, name, propagation="Background")
                except ApiError:
                    pass
        self._release_namespace(ns)
        return copy.deepcopy(obj)

    def _release_namespace(self, ns: str) -> None:
        namespace = self.objects.get(("namespaces", "", ns))
        if namespace and namespace["metadata"].get("deletionTimestamp"):
            if not any(k[1] == ns for k in self.objects):
                self._remove(BY_KIND["Namespace"], ("namespaces", "", ns))

    def _release_foreground(self, uid: str) -> None:
        """An owner in foreground deletion goes once no dependent is left."""
        found = self.by_uid(uid)
        if not found:
            return
        res, owner = found
        meta = owner["metadata"]
        if "foregroundDeletion" not in (meta.get("finalizers") or []) or self.dependents(uid):
            return
        meta["finalizers"] = [f for f in meta["finalizers"] if f != "foregroundDeletion"]
        key = (res.qualified, meta.get("namespace", ""), meta["name"])
        if not meta["finalizers"]:
            meta.pop("finalizers")
        # A running pod still goes through its kubelet (`finalize_pod`).
        if meta.get("finalizers") or (res.kind == "Pod" and "deletionGracePeriodSeconds" in meta):
            self._store(res, key, owner, "MODIFIED")
        else:
            self._remove(res, key)

    def _remove(self, res: Resource, key) -> None:
        obj = self.objects.pop(key, None)
        if obj is None:
            return
        obj = copy.deepcopy(obj)
        self.rv += 1
        obj["metadata"]["resourceVersion"] = str(self.rv)
        self._record("DELETED", res, obj)
        uid = obj["metadata"]["uid"]
        # The garbage collector: dependents of a deleted owner go (background), …
        for dep_res, dep in self.dependents(uid):
            refs = dep["metadata"].get("ownerReferences") or []
            if any(self.by_uid(r["uid"]) for r in refs if r.get("uid") != uid):
                self.mutate(dep_res, dep["metadata"].get("namespace"), dep["metadata"]["name"], _drop_owner(uid))
                continue
            try:
                self.delete(
                    dep_res, dep["metadata"].get("namespace"), dep["metadata"]["name"], propagation="Background"
                )
            except ApiError:
                pass
        # … and an owner waiting in foreground deletion may now go too.
        for ref in obj["metadata"].get("ownerReferences") or []:
            self._release_foreground(ref["uid"])
        if res.namespaced:
            self._release_namespace(key[1])

    def _store(self, res: Resource, key, obj: dict, kind: str) -> None:
        self.rv += 1
        obj["metadata"]["resourceVersion"] = str(self.rv)
        self.objects[key] = obj
        self._record(kind, res, copy.deepcopy(obj))

    def _record(self, kind: str, res: Resource, obj: dict) -> None:
        self.history.append((self.rv, kind, res.qualified, obj))
        for listener in self.listeners:
            listener(kind, res, obj)
        self.changed.notify_all()

    def _conflict(self, res: Resource, name: str) -> ApiError:
        return ApiError(
            409,
            "Conflict",
            f'Operation cannot be fulfilled on {res.qualified} "{name}": the object has been modified; '
            "please apply your changes to the latest version and try again",
            _details(res, name),
        )

    def _check_kind(self, res: Resource, obj: dict) -> None:
        if not isinstance(obj, dict):
            raise ApiError(400, "BadRequest", "the body of the request was in an unknown format")
        if res.builtin:
            # The server's decoder takes a built-in kind's missing type from the URL (clients
            # often send V1Pod(...) without kind and apiVersion); custom resources need both.
            obj.setdefault("kind", res.kind)
            obj.setdefault("apiVersion", res.api_version)
        kind, api_version = obj.get("kind"), obj.get("apiVersion")
        if not kind and not res.builtin:
            raise ApiError(400, "BadRequest", "Object 'Kind' is missing in '" + json.dumps(obj)[:200] + "'")
        if kind != res.kind or api_version != res.api_version:
            raise ApiError(
                400,
                "BadRequest",
                f"the API version in the data ({api_version}) does not match the expected API version ({res.api_version})"
                if api_version != res.api_version
                else f"the kind in the data ({kind}) does not match the expected kind ({res.kind})",
            )

    # -- watching
    def events_since(self, rv: int, qualified: str) -> list[tuple[int, str, dict]] | None:
        """Changes after `rv` to one resource; None when `rv` is older than the history kept."""
        with self.lock:
            if self.history and rv < self.history[0][0] - 1 and len(self.history) == self.history.maxlen:
                return None
            out = []
            for h in reversed(self.history):  # newest first: a live watch reads only the tail
                if h[0] <= rv:
                    break
                if h[2] == qualified:
                    out.append((h[0], h[1], h[3]))
            out.reverse()
            return out


def _resource_of(obj: dict) -> Resource:
    return BY_KIND[obj["kind"]]


def _drop_owner(uid: str):
    def change(obj: dict) -> None:
        refs = [r for r in obj["metadata"].get("ownerReferences") or [] if r.get("uid") != uid]
        if refs:
            obj["metadata"]["ownerReferences"] = refs
        else:
            obj["metadata"].pop("ownerReferences", None)

    return change


def _fold_string_data(obj: dict) -> None:
    string_data = obj.pop("stringData", None) or {}
    if string_data:
        data = obj.setdefault("data", {})
        for k, v in string_data.items():
            data[k] = base64.b64encode(str(v).encode()).decode()


_SERVICE_IPS = iter(range(1, 65_000))


def _default(res: Resource, obj: dict) -> None:
    """What the API server's defaulting adds on create (the parts a client can observe)."""
    kind, spec = res.kind, obj.get("spec")
    if kind == "Namespace":
        obj["metadata"].setdefault("labels", {})["kubernetes.io/metadata.name"] = obj["metadata"]["name"]
        obj["spec"] = {"finalizers": ["kubernetes"]}
        obj["status"] = {"phase": "Active"}
    elif kind == "Secret":
        _fold_string_data(obj)
        obj.setdefault("type", "Opaque")
    elif kind == "Pod" and isinstance(spec, dict):
        spec.setdefault("restartPolicy", "Always")
        spec.setdefault("dnsPolicy", "ClusterFirst")
        spec.setdefault("schedulerName", "default-scheduler")
        spec.setdefault("terminationGracePeriodSeconds", 30)
        for c in [*(spec.get("initContainers") or []), *(spec.get("containers") or [])]:
            if isinstance(c, dict) and isinstance(c.get("image"), str):
                tagged = ":" in c["image"].rsplit("/", 1)[-1] or "@" in c["image"]
                latest = c["image"].endswith(":latest") or not tagged
                c.setdefault("imagePullPolicy", "Always" if latest else "IfNotPresent")
        obj["status"] = {"phase": "Pending", "qosClass": "BestEffort"}
    elif kind == "PersistentVolumeClaim":
        obj["status"] = {"phase": "Pending"}
    elif kind == "Service" and isinstance(spec, dict):
        if spec.get("clusterIP") != "None":
            n = next(_SERVICE_IPS)
            spec["clusterIP"] = f"10.96.{n // 250}.{n % 250 + 1}"
        if spec.get("clusterIP"):
            spec["clusterIPs"] = [spec["clusterIP"]]
        spec.setdefault("type", "ClusterIP")
        spec.setdefault("sessionAffinity", "None")
        obj["status"] = {"loadBalancer": {}}
    elif kind == "Job" and isinstance(spec, dict):
        # The Job strategy: a selector on the controller uid, and the labels pods carry.
        uid_placeholder = obj["metadata"]["uid"]
        name = obj["metadata"]["name"]
        template = spec.setdefault("template", {})
        labels = template.setdefault("metadata", {}).setdefault("labels", {})
        labels.update(
            {
                "batch.kubernetes.io/controller-uid": uid_placeholder,
                "controller-uid": uid_placeholder,
                "batch.kubernetes.io/job-name": name,
                "job-name": name,
            }
        )
        spec.setdefault("selector", {"matchLabels": {"batch.kubernetes.io/controller-uid": uid_placeholder}})
        if spec.get("completions") is None and spec.get("parallelism") is None:
            spec["completions"] = 1
        spec.setdefault("parallelism", 1)
        spec.setdefault("backoffLimit", 6)
        spec.setdefault("completionMode", "NonIndexed")
        spec.setdefault("suspend", False)
        obj["status"] = {}
    elif res.has_status and not res.builtin:
        obj.pop("status", None)
