"""Per-engine limits (SPEC §4), set by organisation admins in the engine's `config` JSON.

They are engine settings, not environment variables: one platform can run a small Docker host
and a large cluster side by side. Every reader goes through `engine_limit`, which falls back to
the default (with a warning) on a value that is not a positive integer, so a typo in an admin
form never means "no limit"."""

from __future__ import annotations

import logging

from experiments.manifest.types import Manifest
from projects.models import Engine

log = logging.getLogger(__name__)

MAX_PROCESSES = "max_processes_per_experiment"
MAX_RUNNING = "max_running_experiments_per_project"
# Completions of one experiment a single-host engine plans (not runs) at once: see check_started.
MAX_PLANNED_COMPLETIONS = 10_000

DEFAULTS: dict[str, int] = {
    # Fits the largest of AIchor's public demos: 10 jobs × 10 completions, parallelisms 2.
    MAX_PROCESSES: 128,
    MAX_RUNNING: 20,
}


def engine_limit(engine: Engine, name: str) -> int:
    default = DEFAULTS[name]
    value = (engine.config or {}).get(name) if isinstance(engine.config, dict) else None
    if value is None:
        return default
    # bool is an int subclass: `true` in the JSON must not read as a limit of 1.
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        log.warning(
            "engine %s: config %s=%r is not a positive integer; using the default %d", engine.name, name, value, default
        )
        return default
    return value


def processes_at_once(manifest: Manifest) -> list[tuple[str, int]]:
    """(path, processes) for every process group of a validated manifest, counted without
    planning the processes: a jobset of 10^6 must cost as little as one of 10."""
    spec = manifest.spec
    if spec.operator == "batch":
        name = spec.groups[0].name if spec.groups else "worker"
        return [(f"spec.types.{name}", 1)]
    if spec.operator == "jobset":
        # Only `parallelisms` completions of a job run at the same time.
        return [(f"spec.types.{group.name}", group.at_once) for group in spec.groups]
    if spec.operator == "kuberay":
        groups = [("spec.types.Head", 1)]
        groups += [(f"spec.types.Workers[{i}].count", pool.count) for i, pool in enumerate(spec.ray_pools)]
        # The submitter runs the user's command as the Ray driver: one more process.
        return [*groups, ("spec.types.Head", 1)]
    # pytorch/xgboost (worker, or Master + Worker), jax (worker) and any operator whose types
    # are plain counts: every replica of every type runs at once.
    return [(f"spec.types.{group.name}.count", group.count) for group in spec.groups]


def check_processes(manifest: Manifest, engine: Engine) -> str | None:
    """The "path: message" error when the manifest starts more processes at once than the
    engine allows, else None."""
    limit = engine_limit(engine, MAX_PROCESSES)
    groups = processes_at_once(manifest)
    total = sum(count for _path, count in groups)
    if total <= limit:
        return None
    # Point at the group to change when one group alone is over the limit, else at the types.
    path, biggest = max(groups, key=lambda group: group[1])
    if biggest <= limit:
        path = "spec.types"
    detail = ""
    if manifest.spec.operator == "jobset" and path != "spec.types":
        group = manifest.spec.group(path.removeprefix("spec.types."))
        detail = f" (count {group.count} × {min(group.parallelisms, group.completions)} completions in parallel)"
    return f"{path}: {total} processes at once{detail} exceed engine {engine.name}'s limit of {limit} ({MAX_PROCESSES})"


def check_started(manifest: Manifest, engine: Engine) -> str | None:
    """What a single-host engine plans when it submits: every completion of a jobset is named
    and planned up front (the docker engine creates its container, the local engine writes its
    plan), though only `parallelisms` of each job run at once, and those alone count against
    the process limit (checked at Cloning). So the planned ones have a bound of their own,
    before anything is planned: a manifest of a million completions costs nothing."""
    if manifest.spec.operator != "jobset":
        return None
    total = sum(group.count * group.completions for group in manifest.spec.groups)
    if total <= MAX_PLANNED_COMPLETIONS:
        return None
    return (
        f"spec.types: engine {engine.name} plans every completion when it submits, {total} completions, over "
        f"the {MAX_PLANNED_COMPLETIONS} a single host plans (only parallelisms of them run at once)"
    )
