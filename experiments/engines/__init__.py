"""Engines keyed by kind. The local engine exists only when AICHOR_LOCAL_ENGINE=true: its
experiments fail at the first step that needs it otherwise."""

from importlib import import_module

from django.conf import settings

from experiments.engines.base import Engine, EngineError

# Imported on first use: the Kubernetes client alone is ~60 MiB in every web process otherwise,
# most of which never talk to a cluster.
REGISTRY: dict[str, str] = {
    "docker": "experiments.engines.docker.DockerEngine",
    "kubernetes": "experiments.engines.kubernetes.KubernetesEngine",
    "local": "experiments.engines.local.LocalEngine",
}
DISABLED = "the local engine is disabled: set AICHOR_LOCAL_ENGINE=true"


def engine_class(kind: str) -> type[Engine]:
    try:
        module, _, name = REGISTRY[kind].rpartition(".")
    except KeyError:
        raise EngineError(f"engines of kind {kind!r} are not supported by this server yet") from None
    return getattr(import_module(module), name)


def get_engine(engine_model) -> Engine:
    cls = engine_class(engine_model.kind)
    if engine_model.kind == "local" and not settings.LOCAL_ENGINE:
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
