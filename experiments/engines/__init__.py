"""Engines keyed by kind. The Kubernetes engine is not built yet: its experiments fail at
Submitting with a clear reason rather than pretending to run."""

from experiments.engines.base import Engine, EngineError
from experiments.engines.docker import DockerEngine
from experiments.engines.local import LocalEngine

REGISTRY: dict[str, type[Engine]] = {DockerEngine.kind: DockerEngine, LocalEngine.kind: LocalEngine}


def get_engine(engine_model) -> Engine:
    try:
        cls = REGISTRY[engine_model.kind]
    except KeyError:
        raise EngineError(f"engines of kind {engine_model.kind!r} are not supported by this server yet") from None
    return cls(engine_model.config)
