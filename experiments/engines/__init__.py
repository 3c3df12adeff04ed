"""Engines keyed by kind. The local engine exists only when AICHOR_LOCAL_ENGINE=true: its
experiments fail at the first step that needs it otherwise."""

from django.conf import settings

from experiments.engines.base import Engine, EngineError
from experiments.engines.docker import DockerEngine
from experiments.engines.kubernetes import KubernetesEngine
from experiments.engines.local import LocalEngine

REGISTRY: dict[str, type[Engine]] = {
    DockerEngine.kind: DockerEngine,
    KubernetesEngine.kind: KubernetesEngine,
    LocalEngine.kind: LocalEngine,
}
DISABLED = "the local engine is disabled: set AICHOR_LOCAL_ENGINE=true"


def get_engine(engine_model) -> Engine:
    try:
        cls = REGISTRY[engine_model.kind]
    except KeyError:
        raise EngineError(f"engines of kind {engine_model.kind!r} are not supported by this server yet") from None
    if cls is LocalEngine and not settings.LOCAL_ENGINE:
        raise EngineError(DISABLED)
    return cls(engine_model.config)


def process_names(engine_model, handle: dict | None) -> list[str]:
    """The names of an experiment's processes, for the pickers of the terminal, logs and
    port-forward; none before Submitting or on an engine this server cannot run."""
    if not handle:
        return []
    try:
        return [process.name for process in get_engine(engine_model).processes(handle)]
    except EngineError:
        return []
