"""A project's PVC records follow on the cluster: the receivers of projects.signals, connected by
ExperimentsConfig.ready() (projects imports nothing from experiments, so it only announces)."""

import logging
from importlib import import_module

from experiments.engines.base import EngineError
from experiments.models import ACTIVE_STATUSES, Experiment
from projects.signals import UNREACHABLE, PvcRefused

log = logging.getLogger(__name__)


def _cluster():
    """experiments.engines.k8s_pvcs, imported when a PVC is first handled: it brings the
    Kubernetes client (~60 MiB), which a web process without PVCs never needs."""
    return import_module("experiments.engines.k8s_pvcs")


def create_claim(sender, pvc, **kwargs) -> None:
    try:
        _cluster().create(
            pvc.engine.config,
            pvc.project.namespace,
            str(pvc.project_id),
            name=pvc.name,
            size_mib=pvc.size_mib,
            storage_class=pvc.storage_class,
            access_mode=pvc.access_mode,
        )
    except EngineError as exc:
        raise PvcRefused(f"The PVC was not created on {pvc.engine.name}: {exc}") from None


def delete_claim(sender, pvc, **kwargs) -> None:
    """Refused while an active experiment mounts the claim: the cluster would only put the
    deletion off until its pods end (the protection finalizer), and the data would go then."""
    users = mounting(pvc.project_id, pvc.name)
    if users:
        ids = ", ".join(str(e.pk)[:8] for e in users)
        raise PvcRefused(
            f"PVC {pvc.name} is mounted by {len(users)} running experiment(s) ({ids}): delete it once they have ended."
        )
    try:
        _cluster().delete(pvc.engine.config, pvc.project.namespace, pvc.name)
    except EngineError as exc:
        # The record stays: without it nobody would know the claim still holds storage.
        raise PvcRefused(f"PVC {pvc.name} was not deleted on {pvc.engine.name}: {exc}") from None


def mounting(project_id: int, name: str) -> list[Experiment]:
    """The project's experiments not ended yet whose manifest attaches the claim `name`. An
    experiment still cloning has no manifest yet; its validation will find the record gone."""
    active = Experiment.objects.filter(project_id=project_id, status__in=ACTIVE_STATUSES, manifest__isnull=False)
    return [
        experiment
        for experiment in active.only("pk", "manifest")
        if any(mount.name == name for mount in experiment.typed_manifest.spec.storage.pvcs)
    ]


def claim_phases(sender, project, pvcs, **kwargs) -> dict[int, str]:
    """One list call per engine holding the project's records."""
    found: dict[int, str] = {}
    k8s_pvcs = _cluster()
    for engine in {pvc.engine for pvc in pvcs}:
        try:
            on_cluster = k8s_pvcs.phases(engine.config, project.namespace, str(project.pk))
        except EngineError as exc:
            log.warning("PVC phases of %s on %s: %s", project.slug, engine.name, exc)
            on_cluster = None
        for pvc in pvcs:
            if pvc.engine == engine:
                phase = UNREACHABLE if on_cluster is None else on_cluster.get(pvc.name, k8s_pvcs.MISSING)
                found[pvc.pk] = phase
    return found
