"""Runs side by side: their manifests flattened to one row per setting (the rows that differ
marked), their final metrics, and the curves of each metric overlaid. No state changes here."""

from dataclasses import dataclass

from experiments.models import Experiment
from metrics import services

MIN_RUNS, MAX_RUNS = 2, 10


@dataclass
class Row:
    label: str
    values: list[str]

    @property
    def differs(self) -> bool:
        return len(set(self.values)) > 1


def flatten(value, path: str = "") -> dict[str, str]:
    """`{"spec": {"env": {"LR": "3e-4"}}}` -> `{"spec.env.LR": "3e-4"}`; empty values left out."""
    if isinstance(value, dict):
        out: dict[str, str] = {}
        for key, item in value.items():
            out.update(flatten(item, f"{path}.{key}" if path else str(key)))
        return out
    if value in (None, "", [], {}):
        return {}
    if isinstance(value, list):
        return {path: ", ".join(str(v) for v in value)}
    return {path: str(value)}


def manifest_rows(experiments: list[Experiment]) -> list[Row]:
    """Where the code came from first, then every manifest setting any of the runs has."""
    rows = [
        Row("commit", [e.commit_sha[:12] if e.source == "git" else f"archive {e.archive}" for e in experiments]),
        Row("branch", [e.branch for e in experiments]),
        Row("engine", [e.engine.name for e in experiments]),
    ]
    flat = [flatten(e.manifest or {}) for e in experiments]
    keys = list(dict.fromkeys(key for manifest in flat for key in manifest))
    rows += [Row(key, [manifest.get(key, "—") for manifest in flat]) for key in keys]
    return rows


def curves(experiments: list[Experiment]) -> tuple[list[dict], dict]:
    """The final metrics table's rows (name, then each run's last value or None) and, per
    metric, each run's downsampled points for the overlaid charts."""
    per_run = [{s.name: s for s in services.chart_series(e)[0]} for e in experiments]
    names = sorted({name for run in per_run for name in run})
    table = [
        {
            "name": name,
            "values": [run[name].last_value if name in run else None for run in per_run],
            "lower_is_better": next(run[name] for run in per_run if name in run).lower_is_better,
        }
        for name in names
    ]
    charts = {
        name: [{"steps": run[name].steps, "values": run[name].values} if name in run else None for run in per_run]
        for name in names
    }
    return table, charts
