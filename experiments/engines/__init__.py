"""Engines keyed by kind. The Kubernetes engine is not built yet: its experiments fail at
Submitting with a clear reason rather than pretending to run. The local engine exists only when
AICHOR_LOCAL_ENGINE=true: its experiments fail at the first step that needs it otherwise."""

from django.conf import settings

from experiments.engines.base import Engine, EngineError
from experiments.engines.docker import DockerEngine
from experiments.engines.local import LocalEngine

REGISTRY: dict[str, type[Engine]] = {DockerEngine.kind: DockerEngine, LocalEngine.kind: LocalEngine}
DISABLED = "the local engine is disabled: set AICHOR_LOCAL_ENGINE=true"


def get_engine(engine_model) -> Engine:
    try:
        cls = REGISTRY[engine_model.kind]
    except KeyError:
        raise EngineError(f"engines of kind {engine_model.kind!r} are not supported by this server yet") from None
    if cls is LocalEngine and not settings.LOCAL_ENGINE:
        raise EngineError(DISABLED)
    return cls(engine_model.config)
