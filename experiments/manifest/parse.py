"""Validation and normalisation of AIchor manifests (SPEC §3).

Pure Python on purpose: the webhook, the CLI preview and the pipeline all validate
the same text, and tests must run without a database.

The contract with callers: ``parse_manifest`` either returns a typed ``Manifest`` in
which every field is present with its default filled in (so engines never guess), or raises
``ManifestError`` listing *every* problem as ``"path: message"``. Users fix a
manifest in one push instead of one error per push, so validation keeps going
after the first problem.

Deliberate leniency, so that manifests written for AIchor run unchanged (SPEC's
compatibility rule), each also marked where it happens:

* a top-level ``name`` is accepted and dropped: AIchor's reference lists it;
* ``spec.activeDeadlineSeconds`` is accepted: older AIchor manifests use it, and
  ``spec.timeout`` wins when both are set;
* ``kind`` and ``apiVersion`` may be omitted (AIchor fills them in); wrong values
  are still errors;
* ``builder.image`` may be omitted (AIchor makes all builder fields optional): it
  is then taken from ``spec.image``;
* an optional block left empty (``env:`` with every line commented out) is YAML
  null and means "not set", not "wrong type";
* ``pytorch``/``xgboost`` accept ``Master`` alone, which Kubeflow runs as a
  single-process job;
* ``accelerators.gpu`` without ``count`` asks for one GPU.
"""

from __future__ import annotations

import difflib
import math
import posixpath
import re
from typing import Any

import yaml

from aichor.lib.variables import PROTECTED_VARS
from experiments.manifest.types import Manifest

# `tf` is AIchor's legacy TensorFlow operator: no longer documented, still in users' repositories.
OPERATORS = ("batch", "jobset", "jax", "pytorch", "xgboost", "kuberay", "tf")
# The TFJob replica types AIchor passed through, in the order TF_CONFIG lists them.
TF_TYPES = ("Chief", "Worker", "PS")
API_VERSIONS = ("0.2.3", "0.2.2", "0.2.1")
KIND = "AIchorManifest"

# A manifest is a few dozen lines; refusing megabytes of YAML keeps a hostile
# repository from tying up a pipeline worker in the parser.
MAX_MANIFEST_CHARS = 512 * 1024

SUBMODULE_MODES = ("false", "true", "recursive")
ACCESS_MODES = ("ReadWriteOnce", "ReadWriteMany", "ReadOnlyMany")
TOLERATION_OPERATORS = ("Exists", "Equal")
TOLERATION_EFFECTS = ("NoSchedule", "PreferNoSchedule", "NoExecute")

# jobset group names become Kubernetes object names, hence DNS-label-ish.
JOBSET_GROUP_RE = re.compile(r"^[a-z][a-z0-9-]*$")
# KubeRay worker group names end up in a label value.
RAY_GROUP_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?$")
PVC_NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")

_DURATION_RE = re.compile(r"^(?:\d+(?:\.\d+)?[dhms])+$")
_DURATION_PART_RE = re.compile(r"(\d+(?:\.\d+)?)([dhms])")
_UNIT_SECONDS = {"d": 86400, "h": 3600, "m": 60, "s": 1}

_TOP_KEYS = ("kind", "apiVersion", "name", "builder", "clone", "spec")
_BUILDER_KEYS = (
    "image",
    "dockerfile",
    "context",
    "buildArgs",
    "registry",
    "target",
    "skipBuild",
)
_SKIP_BUILD_KEYS = ("enabled", "experimentID", "failIfNotFound")
_CLONE_KEYS = ("depth", "includeDotGit", "submodules")
_SPEC_KEYS = (
    "operator",
    "image",
    "command",
    "types",
    "timeout",
    "activeDeadlineSeconds",
    "env",
    "tensorboard",
    "storage",
    "debug",
    "rayVersion",
)
_STORAGE_KEYS = ("sharedVolume", "attachExistingPVCs")
_SHARED_VOLUME_KEYS = ("mountPoint", "sizeGB", "storageClass", "accessMode")
_PVC_KEYS = ("name", "mountPoint")
_DEBUG_KEYS = ("jupyter", "vscode", "holdOnFailure")
_VSCODE_KEYS = ("enabled", "path", "provider")
_RESOURCE_KEYS = (
    "cpus",
    "ramRatio",
    "memory",
    "cpuLimitRatio",
    "shmSizeGB",
    "accelerators",
    "rdma",
    "extraSelectors",
    "extraTolerations",
)
_ACCELERATOR_KEYS = ("gpu", "tpu")
_GPU_KEYS = ("count", "type", "product")
_TPU_KEYS = ("type", "topology", "tpuChipsCount")
_TOLERATION_KEYS = ("key", "operator", "value", "effect", "tolerationSeconds")

# Shown next to "unknown field" so a key that is valid elsewhere is not a mystery.
_KEY_HINTS = {
    "completions": "only the jobset operator uses completions",
    "parallelisms": "only the jobset operator uses parallelisms",
    "rayStartParams": "only the kuberay Head uses rayStartParams",
}


class ManifestError(Exception):
    """Every problem found in a manifest, each as ``"path: message"``."""

    def __init__(self, errors: list[str]):
        # A bare string would otherwise be split into characters; it also lets a
        # serialiser that rebuilds exceptions from str(exc) get a sane object.
        self.errors: list[str] = [errors] if isinstance(errors, str) else list(errors)
        # args holds the list so pickling (Celery results) rebuilds the same errors.
        super().__init__(self.errors)

    def __str__(self) -> str:
        return "\n".join(self.errors)


def parse_duration(value: str | int) -> int:
    """Seconds in ``"90s"``, ``"15m"``, ``"6h"``, ``"1d"``, ``"1h30m"`` or plain int seconds.

    Raises ValueError for anything else (including booleans and negatives), so
    callers can report one error per bad field.
    """
    # bool is an int subclass: `timeout: true` is a mistake, not one second.
    # ValueError (not TypeError) for every bad input: the documented contract,
    # so callers need one except clause per field.
    if isinstance(value, bool):
        raise ValueError(  # noqa: TRY004
            "expected a duration such as '90s', '6h' or '1d', got true/false"
        )
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a duration cannot be negative")
        return value
    if not isinstance(value, str):
        raise ValueError(  # noqa: TRY004
            f"expected a duration such as '90s', '6h' or '1d', got {_describe(value)}"
        )
    text = value.strip()
    if text.isdigit():
        return int(text)
    if not _DURATION_RE.match(text):
        raise ValueError(
            f"invalid duration {value!r}: use a number of seconds or units d/h/m/s, "
            "e.g. '90s', '15m', '6h', '1d', '1h30m'"
        )
    total = sum(float(amount) * _UNIT_SECONDS[unit] for amount, unit in _DURATION_PART_RE.findall(text))
    return round(total)


def parse_manifest(text: str, *, known_pvcs: set[str] | None = None) -> Manifest:
    """Parse YAML text, validate, return the typed manifest with every default filled.

    Raises ManifestError listing all problems (not just the first).
    """
    return Manifest.from_dict(normalise(text, known_pvcs=known_pvcs))


def normalise(text: str, *, known_pvcs: set[str] | None = None) -> dict:
    """The validated manifest in its stored form (AIchor's key names, defaults filled)."""
    data = _load_yaml(text)
    validator = _Validator(known_pvcs)
    try:
        result = validator.manifest(data)
    except ManifestError:
        raise
    except Exception as exc:
        # The pipeline turns ManifestError into a failed Cloning step; any other
        # exception would crash the worker and leave the experiment stuck, so a
        # validator bug must still surface as a readable manifest failure.
        raise ManifestError([f"manifest: could not be validated ({type(exc).__name__}: {exc})"]) from exc
    if validator.errors:
        raise ManifestError(validator.errors)
    return result


# --------------------------------------------------------------------------- YAML


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys.

    PyYAML silently keeps the last duplicate, so a second ``spec:`` block would
    quietly discard the first: exactly the silent typo the validator exists to
    catch.
    """


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode) -> dict:
    seen: set[Any] = set()
    for key_node, _value_node in node.value:
        # Merge keys (<<) legitimately repeat keys that are then overridden.
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=True)
        try:
            duplicate = key in seen
            seen.add(key)
        except TypeError:
            continue  # construct_mapping reports unhashable keys itself
        if duplicate:
            raise yaml.constructor.ConstructorError(
                "while constructing a mapping",
                node.start_mark,
                f"found duplicate key {key!r}",
                key_node.start_mark,
            )
    return loader.construct_mapping(node, deep=True)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _load_yaml(text: str) -> dict:
    if not isinstance(text, str):
        raise ManifestError([f"manifest: expected YAML text, got {_describe(text)}"])
    if len(text) > MAX_MANIFEST_CHARS:
        raise ManifestError([f"manifest: larger than {MAX_MANIFEST_CHARS // 1024} KiB; is this the right file?"])
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise ManifestError([_yaml_error_message(exc)]) from None
    except RecursionError:
        raise ManifestError(["manifest: YAML is nested too deeply"]) from None
    if data is None:
        raise ManifestError(["manifest: the file is empty; expected kind, apiVersion, builder and spec"])
    if not isinstance(data, dict):
        message = (
            f"manifest: line {_document_line(text)}: the top level must be a mapping "
            f"of fields (kind, apiVersion, builder, spec), got {_describe(data)}"
        )
        raise ManifestError([message])
    return data


def _yaml_error_message(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).strip()
    context = getattr(exc, "context", None)
    detail = f"{context}, {problem}" if context and problem else problem
    if mark is not None:
        return f"manifest: invalid YAML at line {mark.line + 1}, column {mark.column + 1}: {detail}"
    return f"manifest: invalid YAML: {detail}"


def _document_line(text: str) -> int:
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except (yaml.YAMLError, RecursionError):
        return 1
    return node.start_mark.line + 1 if node is not None else 1


# --------------------------------------------------------------------- helpers


def _describe(value: Any) -> str:
    if value is None:
        return "nothing (null)"
    if isinstance(value, bool):
        return f"{str(value).lower()} (a boolean)"
    if isinstance(value, int | float):
        return f"the number {value}"
    if isinstance(value, str):
        return f"the text {value!r}"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return f"a {type(value).__name__}"


def _show(value: Any) -> str:
    """A value the user wrote, quoted when it is text: 'tf', not "the text 'tf'"."""
    return repr(value) if isinstance(value, str) else _describe(value)


def _not_one_of(value: Any, choices: tuple[str, ...], what: str) -> str:
    options = ", ".join(choices)
    if isinstance(value, str):
        return f"unsupported {what} {value!r}; use one of {options}"
    return f"must be one of {options}, got {_describe(value)}"


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


def _scalar_to_str(value: Any) -> str | None:
    """Env, build args and selectors end up as strings; YAML typed them for us."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    if _is_number(value):
        return str(value)
    return None


def _empty_spec() -> dict:
    return {
        "operator": None,
        "image": None,
        "command": None,
        "timeout": None,
        "env": {},
        "tensorboard": {"enabled": False},
        "storage": {"sharedVolume": None, "attachExistingPVCs": []},
        "debug": {
            "jupyter": False,
            "vscode": {"enabled": False, "path": None, "provider": None},
            "holdOnFailure": None,
        },
        "rayVersion": None,
        "types": {},
    }


class _Validator:
    """Walks the loaded YAML once, collecting errors and building the result."""

    def __init__(self, known_pvcs: set[str] | None) -> None:
        self.errors: list[str] = []
        self.known_pvcs = known_pvcs

    def err(self, path: str, message: str) -> None:
        self.errors.append(f"{path}: {message}")

    # -- primitive checks. Each returns the normalised value, or the default when
    # -- the field is absent, or None after recording an error.

    def mapping(
        self,
        value: Any,
        path: str,
        allowed: tuple[str, ...],
        *,
        required: tuple[str, ...] = (),
    ) -> dict | None:
        if value is None:
            value = {}
        if not isinstance(value, dict):
            self.err(path, f"must be a mapping of fields, got {_describe(value)}")
            return None
        for key in value:
            if key not in allowed:
                self.err(_join(path, key), self._unknown_key_message(key, allowed))
        for key in required:
            if value.get(key) is None:
                self.err(_join(path, key), "required field is missing")
        return value

    @staticmethod
    def _unknown_key_message(key: Any, allowed: tuple[str, ...]) -> str:
        message = "unknown field"
        if isinstance(key, str):
            folded = {name.lower(): name for name in allowed}
            guess = folded.get(key.lower()) or next(
                iter(difflib.get_close_matches(key, allowed, n=1, cutoff=0.7)), None
            )
            if guess:
                return f"{message}; did you mean '{guess}'?"
            if key in _KEY_HINTS:
                return f"{message}: {_KEY_HINTS[key]}"
        return f"{message}; expected one of: {', '.join(allowed)}"

    def string(
        self,
        value: Any,
        path: str,
        *,
        default: str | None = None,
        required: bool = False,
    ) -> str | None:
        if value is None:
            if required:
                self.err(path, "required field is missing")
            return default
        if not isinstance(value, str):
            self.err(path, f"must be text, got {_describe(value)}")
            return None
        if not value.strip():
            self.err(path, "must not be empty")
            return None
        return value

    def boolean(self, value: Any, path: str, *, default: bool = False) -> bool:
        if value is None:
            return default
        if not isinstance(value, bool):
            self.err(path, f"must be true or false, got {_describe(value)}")
            return default
        return value

    def integer(self, value: Any, path: str, *, default: int | None, minimum: int | None = None) -> int | None:
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            self.err(path, f"must be a whole number, got {_describe(value)}")
            return None
        if minimum is not None and value < minimum:
            bound = "0 or more" if minimum == 0 else f"at least {minimum}"
            self.err(path, f"must be {bound}, got {value}")
            return None
        return value

    def number(
        self,
        value: Any,
        path: str,
        *,
        default: float | None,
        minimum: float = 0,
        inclusive: bool = False,
    ) -> float | None:
        if value is None:
            return default
        # YAML's .nan and .inf are floats that slip through every comparison below.
        if not _is_number(value) or not math.isfinite(value):
            self.err(path, f"must be a number, got {_describe(value)}")
            return None
        if value < minimum or (value == minimum and not inclusive):
            if inclusive:
                bound = "0 or more" if minimum == 0 else f"at least {minimum:g}"
            else:
                bound = f"greater than {minimum:g}"
            self.err(path, f"must be {bound}, got {value}")
            return None
        return value

    def string_map(self, value: Any, path: str) -> dict[str, str]:
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.err(path, f"must be a mapping of names to values, got {_describe(value)}")
            return {}
        result: dict[str, str] = {}
        for key, item in value.items():
            if not isinstance(key, str) or not key:
                self.err(_join(path, key), "names must be non-empty text")
                continue
            text = _scalar_to_str(item)
            if text is None:
                self.err(
                    _join(path, key),
                    f"must be text, a number or true/false, got {_describe(item)}",
                )
                continue
            result[key] = text
        return result

    def duration(self, value: Any, path: str, *, allow_zero: bool) -> int | None:
        if value is None:
            return None
        try:
            seconds = parse_duration(value)
        except ValueError as exc:
            self.err(path, str(exc))
            return None
        if seconds == 0 and not allow_zero:
            self.err(path, "must be longer than 0 seconds")
            return None
        return seconds or None

    def repo_path(self, value: Any, path: str, *, default: str) -> str | None:
        text = self.string(value, path, default=default)
        if text is None or text == default:
            return text
        # Builds run inside the clone; a context of "/" or "../.." would send the
        # server's own files to the Docker daemon.
        if text.startswith("/") or "\\" in text:
            self.err(path, "must be a path relative to the repository")
            return None
        normalised = posixpath.normpath(text)
        if normalised == ".." or normalised.startswith("../"):
            self.err(path, "must stay inside the repository (no '..')")
            return None
        return normalised

    def mount_point(self, value: Any, path: str) -> str | None:
        text = self.string(value, path, required=True)
        if text is not None and not text.startswith("/"):
            self.err(path, "must be an absolute path such as /mnt/data")
            return None
        return text

    # -- sections

    def manifest(self, data: dict) -> dict:
        self.mapping(data, "", _TOP_KEYS, required=("spec",))
        # AIchor requires the builder key but none of its fields, so `builder:`
        # alone (null) is fine; only its absence is an error.
        if "builder" not in data:
            self.err("builder", "required field is missing")
        # "name" is in AIchor's reference but means nothing to aichor: accepted, dropped.

        # AIchor fills in a missing kind and apiVersion; wrong values are still errors.
        kind = KIND if data.get("kind") is None else data["kind"]
        if kind != KIND:
            self.err("kind", f"must be {KIND}, got {_show(kind)}")
        api_version = data.get("apiVersion")
        if api_version is None:
            api_version = API_VERSIONS[0]
        if api_version not in API_VERSIONS:
            self.err("apiVersion", _not_one_of(api_version, API_VERSIONS, "version"))
        if data.get("name") is not None and not isinstance(data["name"], str):
            self.err("name", f"must be text, got {_describe(data['name'])}")

        spec_data = data.get("spec")
        spec_image = spec_data.get("image") if isinstance(spec_data, dict) else None
        builder = self.builder(data.get("builder"), spec_image)
        clone = self.clone(data.get("clone"))
        spec = self.spec(spec_data, builder)
        return {
            "kind": KIND,
            "apiVersion": api_version,
            "builder": builder,
            "clone": clone,
            "spec": spec,
        }

    def builder(self, value: Any, spec_image: Any) -> dict:
        obj = self.mapping(value, "builder", _BUILDER_KEYS) or {}
        image = self.string(obj.get("image"), "builder.image")
        if image is None and obj.get("image") is None and isinstance(spec_image, str):
            image = spec_image  # AIchor lets builder.image be omitted

        build_args = self.string_map(obj.get("buildArgs"), "builder.buildArgs")
        skip = self.mapping(obj.get("skipBuild"), "builder.skipBuild", _SKIP_BUILD_KEYS) or {}
        skip_enabled = self.boolean(skip.get("enabled"), "builder.skipBuild.enabled")
        experiment_id = self.string(skip.get("experimentID"), "builder.skipBuild.experimentID")
        if skip_enabled and skip.get("experimentID") is None:
            self.err(
                "builder.skipBuild.experimentID",
                "required when skipBuild is enabled: the experiment whose image to reuse",
            )
        return {
            "image": image,
            "dockerfile": self.repo_path(obj.get("dockerfile"), "builder.dockerfile", default="Dockerfile"),
            "context": self.repo_path(obj.get("context"), "builder.context", default="."),
            "buildArgs": build_args,
            "registry": self.string(obj.get("registry"), "builder.registry"),
            "target": self.string(obj.get("target"), "builder.target"),
            "skipBuild": {
                "enabled": skip_enabled,
                "experimentID": experiment_id,
                "failIfNotFound": self.boolean(skip.get("failIfNotFound"), "builder.skipBuild.failIfNotFound"),
            },
        }

    def clone(self, value: Any) -> dict:
        obj = self.mapping(value, "clone", _CLONE_KEYS) or {}
        depth = self.integer(obj.get("depth"), "clone.depth", default=1, minimum=1)
        include_dot_git = self.boolean(obj.get("includeDotGit"), "clone.includeDotGit")
        raw = obj.get("submodules")
        # YAML turns an unquoted `submodules: true` into a boolean; the user meant "true".
        if isinstance(raw, bool):
            raw = "true" if raw else "false"
        submodules = "false" if raw is None else raw
        if submodules not in SUBMODULE_MODES:
            self.err(
                "clone.submodules",
                f'must be "false", "true" or "recursive", got {_show(submodules)}',
            )
            submodules = "false"
        elif submodules != "false" and not include_dot_git:
            self.err(
                "clone.submodules",
                "submodules need the repository's .git folder; set clone.includeDotGit: true",
            )
        return {
            "depth": depth,
            "includeDotGit": include_dot_git,
            "submodules": submodules,
        }

    def spec(self, value: Any, builder: dict) -> dict:
        if value is None:
            return _empty_spec()  # the missing spec is already reported
        obj = self.mapping(value, "spec", _SPEC_KEYS, required=("operator", "types"))
        if obj is None:
            # One "must be a mapping" beats a cascade of "required field is missing".
            return _empty_spec()

        operator = obj.get("operator")
        if operator is not None and operator not in OPERATORS:
            self.err("spec.operator", _not_one_of(operator, OPERATORS, "operator"))
            operator = None

        image = self.string(obj.get("image"), "spec.image", required=True)
        builder_image = builder["image"]
        if image is not None and builder_image is not None and image != builder_image:
            self.err(
                "spec.image",
                f"must be the image the builder builds ({builder_image!r}), got {image!r}",
            )
        command = self.string(obj.get("command"), "spec.command", required=True)

        timeout = self.duration(obj.get("timeout"), "spec.timeout", allow_zero=False)
        # activeDeadlineSeconds is not in SPEC, but AIchor manifests still carry it.
        deadline = self.integer(
            obj.get("activeDeadlineSeconds"),
            "spec.activeDeadlineSeconds",
            default=None,
            minimum=1,
        )
        if timeout is None and obj.get("timeout") is None:
            timeout = deadline

        tensorboard = self.mapping(obj.get("tensorboard"), "spec.tensorboard", ("enabled",)) or {}
        ray_version = obj.get("rayVersion")
        if ray_version is not None and not isinstance(ray_version, str):
            # An unquoted 2.10 is the float 2.1: converting would silently change it.
            self.err(
                "spec.rayVersion",
                f'must be quoted text such as "2.23.0", got {_describe(ray_version)}',
            )
            ray_version = None

        result: dict[str, Any] = {
            "operator": operator,
            "image": image,
            "command": command,
            "timeout": timeout,
            "env": self.env(obj.get("env")),
            "tensorboard": {"enabled": self.boolean(tensorboard.get("enabled"), "spec.tensorboard.enabled")},
            "storage": self.storage(obj.get("storage")),
            "debug": self.debug(obj.get("debug")),
            "rayVersion": ray_version,
            "types": {},
        }
        types, workers = self.types(obj.get("types"), operator)
        result["types"] = types
        if operator == "kuberay":
            result["workers"] = workers
        return result

    def env(self, value: Any) -> dict[str, str]:
        env = self.string_map(value, "spec.env")
        for name in env:
            if name in PROTECTED_VARS:
                # AIchor refuses them too: a run where the code silently sees another value is worse.
                self.err(f"spec.env.{name}", f"{name} is set by aichor and cannot be overridden; remove it")
        return env

    def storage(self, value: Any) -> dict:
        obj = self.mapping(value, "spec.storage", _STORAGE_KEYS) or {}
        mount_points: dict[str, str] = {}

        def claim(mount: str | None, path: str) -> None:
            # Two volumes on one mount point: one would silently hide the other.
            if mount is None:
                return
            if mount in mount_points:
                self.err(path, f"{mount} is already used by {mount_points[mount]}")
            else:
                mount_points[mount] = path

        shared = None
        raw_shared = obj.get("sharedVolume")
        if raw_shared is not None:
            path = "spec.storage.sharedVolume"
            sv = self.mapping(raw_shared, path, _SHARED_VOLUME_KEYS, required=("sizeGB",))
            if sv is not None:
                access_mode = self.string(sv.get("accessMode"), f"{path}.accessMode")
                if access_mode is not None and access_mode not in ACCESS_MODES:
                    self.err(
                        f"{path}.accessMode",
                        f"must be one of {', '.join(ACCESS_MODES)}",
                    )
                    access_mode = None
                shared = {
                    "mountPoint": self.mount_point(sv.get("mountPoint"), f"{path}.mountPoint"),
                    "sizeGB": self.number(sv.get("sizeGB"), f"{path}.sizeGB", default=None),
                    "storageClass": self.string(sv.get("storageClass"), f"{path}.storageClass"),
                    "accessMode": access_mode,
                }
                claim(shared["mountPoint"], f"{path}.mountPoint")

        pvcs: list[dict] = []
        raw_pvcs = obj.get("attachExistingPVCs")
        if raw_pvcs is not None and not isinstance(raw_pvcs, list):
            self.err(
                "spec.storage.attachExistingPVCs",
                f"must be a list of {{name, mountPoint}}, got {_describe(raw_pvcs)}",
            )
            raw_pvcs = None
        for index, item in enumerate(raw_pvcs or []):
            path = f"spec.storage.attachExistingPVCs[{index}]"
            entry = self.mapping(item, path, _PVC_KEYS)
            if entry is None:
                continue
            name = self.string(entry.get("name"), f"{path}.name", required=True)
            if name is not None:
                if not PVC_NAME_RE.match(name):
                    self.err(f"{path}.name", f"{name!r} is not a valid volume claim name")
                elif self.known_pvcs is not None and name not in self.known_pvcs:
                    self.err(
                        f"{path}.name",
                        f"no persistent volume claim named {name!r} in this project",
                    )
            mount = self.mount_point(entry.get("mountPoint"), f"{path}.mountPoint")
            claim(mount, f"{path}.mountPoint")
            pvcs.append({"name": name, "mountPoint": mount})
        return {"sharedVolume": shared, "attachExistingPVCs": pvcs}

    def debug(self, value: Any) -> dict:
        obj = self.mapping(value, "spec.debug", _DEBUG_KEYS) or {}
        vscode = self.mapping(obj.get("vscode"), "spec.debug.vscode", _VSCODE_KEYS) or {}
        return {
            "jupyter": self.boolean(obj.get("jupyter"), "spec.debug.jupyter"),
            "vscode": {
                "enabled": self.boolean(vscode.get("enabled"), "spec.debug.vscode.enabled"),
                "path": self.string(vscode.get("path"), "spec.debug.vscode.path"),
                "provider": self.string(vscode.get("provider"), "spec.debug.vscode.provider"),
            },
            # 0 reads naturally as "don't hold", so it normalises to None.
            "holdOnFailure": self.duration(obj.get("holdOnFailure"), "spec.debug.holdOnFailure", allow_zero=True),
        }

    # -- types

    def types(self, value: Any, operator: str | None) -> tuple[dict, list[dict]]:
        path = "spec.types"
        if value is None:
            return {}, []  # "required field is missing" already reported by spec()
        if not isinstance(value, dict):
            self.err(path, f"must be a mapping of process types, got {_describe(value)}")
            return {}, []
        if not value:
            self.err(path, "must define at least one process type")
            return {}, []
        names = [name for name in value if isinstance(name, str)]
        for name in value:
            if not isinstance(name, str):
                self.err(_join(path, name), "process type names must be text")

        if operator is None:
            # Still check every resources block so the user sees all problems now;
            # which type keys are valid depends on the operator, so allow them all.
            for name in names:
                if isinstance(value[name], dict):  # kuberay's Workers is a list
                    self.process_type(value[name], _join(path, name), any_operator=True)
            return {}, []
        if operator == "kuberay":
            return self.kuberay_head(value, names), self.ray_workers(value.get("Workers"))
        handler = {
            "pytorch": self.kubeflow_types,
            "xgboost": self.kubeflow_types,
            "jax": self.jax_types,
            "jobset": self.jobset_types,
            "batch": self.batch_types,
            "tf": self.tf_types,
        }[operator]
        return handler(value, names, operator), []

    def process_type(
        self,
        value: Any,
        path: str,
        *,
        jobset: bool = False,
        head: bool = False,
        any_operator: bool = False,
    ) -> dict | None:
        allowed: tuple[str, ...] = ("count", "resources")
        if jobset or any_operator:
            allowed += ("completions", "parallelisms")
        if head or any_operator:
            allowed += ("rayStartParams",)
        obj = self.mapping(value, path, allowed, required=("resources",))
        if obj is None:
            return None
        count = self.integer(obj.get("count"), f"{path}.count", default=1, minimum=0)
        if head and count is not None and count != 1:
            self.err(f"{path}.count", "the Ray head is always a single process; remove count")
        entry: dict[str, Any] = {
            "count": count,
            "completions": self.integer(obj.get("completions"), f"{path}.completions", default=1, minimum=1),
            "parallelisms": self.integer(obj.get("parallelisms"), f"{path}.parallelisms", default=1, minimum=1),
            "resources": self.resources(obj.get("resources"), f"{path}.resources"),
        }
        if head:
            entry["rayStartParams"] = self.string_map(obj.get("rayStartParams"), f"{path}.rayStartParams")
        return entry

    def _only(self, types: dict, names: list[str], allowed: tuple[str, ...], what: str) -> None:
        for name in names:
            if name not in allowed:
                self.err(f"spec.types.{name}", f"unknown process type; {what}")

    def kubeflow_types(self, types: dict, names: list[str], operator: str) -> dict:
        what = f"{operator} accepts 'worker', or 'Master' and 'Worker'"
        self._only(types, names, ("worker", "Master", "Worker"), what)
        if "worker" in types and ("Master" in types or "Worker" in types):
            self.err(
                "spec.types",
                "use either 'worker' (0.2.3) or 'Master'/'Worker' (0.2.2 and earlier), not both",
            )
        result: dict[str, dict] = {}
        for name in ("worker", "Master", "Worker"):
            if name in types:
                entry = self.process_type(types[name], f"spec.types.{name}")
                if entry is not None:
                    result[name] = entry
        master = result.get("Master")
        if master is not None and master["count"] is not None and master["count"] != 1:
            self.err(
                "spec.types.Master.count",
                "there is exactly one Master; count must be 1",
            )
        return result

    def jax_types(self, types: dict, names: list[str], operator: str) -> dict:
        self._only(types, names, ("worker", "Worker"), "jax accepts 'worker' (or 'Worker')")
        if "worker" in types and "Worker" in types:
            self.err("spec.types", "use either 'worker' or 'Worker', not both")
        return self._collect(types, ("worker", "Worker"))

    def batch_types(self, types: dict, names: list[str], operator: str) -> dict:
        allowed = ("worker", "Worker", "main")
        self._only(types, names, allowed, "batch accepts one of 'worker', 'Worker' or 'main'")
        present = [name for name in allowed if name in types]
        if len(present) > 1:
            self.err("spec.types", "batch runs a single process; define exactly one type")
        result = self._collect(types, allowed)
        for name, entry in result.items():
            if entry["count"] is not None and entry["count"] != 1:
                self.err(
                    f"spec.types.{name}.count",
                    "batch runs a single process; count must be 1 (use jobset for several processes)",
                )
        return result

    def tf_types(self, types: dict, names: list[str], operator: str) -> dict:
        self._only(types, names, TF_TYPES, "tf accepts 'Chief', 'Worker' and 'PS'")
        result = self._collect(types, TF_TYPES)
        chief = result.get("Chief")
        if chief is not None and chief["count"] is not None and chief["count"] != 1:
            self.err("spec.types.Chief.count", "there is exactly one Chief; count must be 1")
        if set(result) == {"PS"}:
            # Parameter servers serve until the workers are done: alone they would never end.
            self.err("spec.types", "tf needs a 'Worker' or a 'Chief' type besides 'PS'")
        return result

    def jobset_types(self, types: dict, names: list[str], operator: str) -> dict:
        result: dict[str, dict] = {}
        for name in names:
            path = f"spec.types.{name}"
            if not JOBSET_GROUP_RE.match(name):
                self.err(
                    path,
                    "jobset group names must start with a lowercase letter and contain "
                    "only lowercase letters, digits and '-'",
                )
            entry = self.process_type(types[name], path, jobset=True)
            if entry is not None:
                result[name] = entry
        return result

    def _collect(self, types: dict, allowed: tuple[str, ...]) -> dict:
        result: dict[str, dict] = {}
        for name in allowed:
            if name in types:
                entry = self.process_type(types[name], f"spec.types.{name}")
                if entry is not None:
                    result[name] = entry
        return result

    def kuberay_head(self, types: dict, names: list[str]) -> dict:
        self._only(types, names, ("Head", "Workers"), "kuberay accepts 'Head' and 'Workers'")
        result: dict[str, dict] = {}
        if types.get("Head") is None:
            self.err("spec.types.Head", "required field is missing: kuberay needs a Ray head")
        else:
            head = self.process_type(types["Head"], "spec.types.Head", head=True)
            if head is not None:
                result["Head"] = head
        return result

    def ray_workers(self, value: Any) -> list[dict]:
        path = "spec.types.Workers"
        if value is None:
            return []
        if not isinstance(value, list):
            self.err(path, f"must be a list of worker pools, got {_describe(value)}")
            return []
        workers: list[dict] = []
        seen: set[str] = set()
        for index, item in enumerate(value):
            item_path = f"{path}[{index}]"
            obj = self.mapping(item, item_path, ("name", "count", "resources"), required=("resources",))
            if obj is None:
                continue
            name = self.string(obj.get("name"), f"{item_path}.name", required=True)
            if name is not None:
                if not RAY_GROUP_RE.match(name):
                    self.err(
                        f"{item_path}.name",
                        "use letters, digits, '-', '_' or '.', at most 63 characters",
                    )
                elif name in seen:
                    self.err(
                        f"{item_path}.name",
                        f"another worker pool is already named {name!r}",
                    )
                seen.add(name)
            workers.append(
                {
                    # Ray worker pools may start empty and be scaled by the job.
                    "name": name,
                    "count": self.integer(obj.get("count"), f"{item_path}.count", default=0, minimum=0),
                    "resources": self.resources(obj.get("resources"), f"{item_path}.resources"),
                }
            )
        return workers

    # -- resources

    def resources(self, value: Any, path: str) -> dict | None:
        if value is None:
            return None  # the caller reports the missing block
        obj = self.mapping(value, path, _RESOURCE_KEYS)
        if obj is None:
            return None
        cpus = self.number(obj.get("cpus"), f"{path}.cpus", default=1)
        ram_ratio = self.number(obj.get("ramRatio"), f"{path}.ramRatio", default=None)
        memory = self.number(obj.get("memory"), f"{path}.memory", default=None)
        if (obj.get("ramRatio") is None) == (obj.get("memory") is None):
            self.err(path, "set exactly one of ramRatio or memory")
        memory_gb: float | None = None
        if memory is not None:
            memory_gb = float(memory)
        elif ram_ratio is not None and cpus is not None:
            memory_gb = float(ram_ratio * cpus)

        gpu, tpu = self.accelerators(obj.get("accelerators"), f"{path}.accelerators")
        return {
            "cpus": cpus,
            "memoryGB": memory_gb,
            "ramRatio": ram_ratio,
            "memory": memory,
            "cpuLimitRatio": self.number(
                obj.get("cpuLimitRatio"),
                f"{path}.cpuLimitRatio",
                default=2,
                minimum=1,
                inclusive=True,
            ),
            # AIchor's own demos set shmSizeGB: 0 ("no extra shared memory").
            "shmSizeGB": self.number(obj.get("shmSizeGB"), f"{path}.shmSizeGB", default=None, inclusive=True),
            "gpu": gpu,
            "tpu": tpu,
            "rdma": self.rdma(obj.get("rdma"), f"{path}.rdma"),
            "extraSelectors": self.string_map(obj.get("extraSelectors"), f"{path}.extraSelectors"),
            "extraTolerations": self.tolerations(obj.get("extraTolerations"), f"{path}.extraTolerations"),
        }

    def accelerators(self, value: Any, path: str) -> tuple[dict | None, dict | None]:
        obj = self.mapping(value, path, _ACCELERATOR_KEYS)
        if obj is None:
            return None, None
        if obj.get("gpu") is not None and obj.get("tpu") is not None:
            self.err(path, "set at most one of gpu or tpu")
        gpu = tpu = None
        if obj.get("gpu") is not None:
            gpu_path = f"{path}.gpu"
            raw = self.mapping(obj["gpu"], gpu_path, _GPU_KEYS)
            if raw is not None:
                gpu = {
                    # A gpu block without count asks for a GPU; zero would be surprising.
                    "count": self.integer(raw.get("count"), f"{gpu_path}.count", default=1, minimum=0),
                    "type": self.string(raw.get("type"), f"{gpu_path}.type"),
                    "product": self.string(raw.get("product"), f"{gpu_path}.product"),
                }
        if obj.get("tpu") is not None:
            tpu_path = f"{path}.tpu"
            raw = self.mapping(obj["tpu"], tpu_path, _TPU_KEYS, required=("type",))
            if raw is not None:
                tpu = {
                    "type": self.string(raw.get("type"), f"{tpu_path}.type"),
                    "topology": self.string(raw.get("topology"), f"{tpu_path}.topology"),
                    "tpuChipsCount": self.integer(
                        raw.get("tpuChipsCount"),
                        f"{tpu_path}.tpuChipsCount",
                        default=None,
                        minimum=1,
                    ),
                }
        return gpu, tpu

    def rdma(self, value: Any, path: str) -> dict | None:
        if value is None:
            return None
        obj = self.mapping(value, path, ("devices",), required=("devices",))
        if obj is None or obj.get("devices") is None:
            return None
        devices = obj["devices"]
        if not isinstance(devices, list):
            self.err(f"{path}.devices", f"must be a list, got {_describe(devices)}")
            return None
        result: list[Any] = []
        for index, device in enumerate(devices):
            # Only flat items: the list is handed to engines as-is, and bounding its
            # shape keeps YAML alias tricks from producing huge nested structures.
            if isinstance(device, dict) and all(_scalar_to_str(item) is not None for item in device.values()):
                result.append(dict(device))
            elif _scalar_to_str(device) is not None:
                result.append(device)
            else:
                self.err(f"{path}.devices[{index}]", "must be a name or a flat mapping")
        return {"devices": result}

    def tolerations(self, value: Any, path: str) -> list[dict]:
        if value is None:
            return []
        if not isinstance(value, list):
            self.err(
                path,
                f"must be a list of Kubernetes tolerations, got {_describe(value)}",
            )
            return []
        result: list[dict] = []
        for index, item in enumerate(value):
            item_path = f"{path}[{index}]"
            obj = self.mapping(item, item_path, _TOLERATION_KEYS)
            if obj is None:
                continue
            toleration: dict[str, Any] = {}
            for key in ("key", "value"):
                if obj.get(key) is not None:
                    text = _scalar_to_str(obj[key])
                    if text is None:
                        self.err(
                            f"{item_path}.{key}",
                            f"must be text, got {_describe(obj[key])}",
                        )
                    else:
                        toleration[key] = text
            operator = obj.get("operator")
            if operator is not None:
                if operator not in TOLERATION_OPERATORS:
                    self.err(
                        f"{item_path}.operator",
                        f"must be one of {', '.join(TOLERATION_OPERATORS)}",
                    )
                else:
                    toleration["operator"] = operator
            effect = obj.get("effect")
            if effect is not None:
                if effect not in TOLERATION_EFFECTS:
                    self.err(
                        f"{item_path}.effect",
                        f"must be one of {', '.join(TOLERATION_EFFECTS)}",
                    )
                else:
                    toleration["effect"] = effect
            seconds = self.integer(
                obj.get("tolerationSeconds"),
                f"{item_path}.tolerationSeconds",
                default=None,
                minimum=0,
            )
            if seconds is not None:
                toleration["tolerationSeconds"] = seconds
            result.append(toleration)
        return result
