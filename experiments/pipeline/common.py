"""What every step shares: entering a step, the cancel-and-heartbeat check of slow loops,
the scratch folder. Handing over to the next step is experiments.queue.next_step, also importable
from here."""

import logging
import time
from pathlib import Path
from uuid import UUID

from django.conf import settings

from experiments import services
from experiments.models import Experiment
from experiments.queue import next_step

__all__ = ["Liveness", "StepFailed", "enter", "inside", "log", "next_step", "workdir_of"]

log = logging.getLogger("experiments.pipeline")


class StepFailed(Exception):
    """Ends the experiment as Failed at the current step with this message."""


class Liveness:
    """Called often from slow loops: says whether to give up (cancelled) and keeps the
    heartbeat fresh so reconcile leaves a working task alone. Made as its step begins, which
    found the experiment active and beat its heartbeat: the database is asked again after
    `check` seconds (a cancel is seen that much later at most, and a submit or clone of a
    fraction of a second asks nothing), the heartbeat beaten every `every` seconds."""

    def __init__(self, experiment_id: UUID, every: float = 5.0, check: float = 0.25) -> None:
        self.experiment_id = experiment_id
        self.every = every
        self.check = check
        self._last = self._checked = time.monotonic()
        self._cancelled = False

    def __call__(self) -> bool:
        now = time.monotonic()
        if now - self._last >= self.every:
            self._last = self._checked = now
            self._cancelled = not services.heartbeat(self.experiment_id)
        elif now - self._checked >= self.check:
            self._checked = now
            self._cancelled = not services.is_active(self.experiment_id)
        return self._cancelled


def workdir_of(experiment_id: UUID) -> Path:
    return Path(settings.WORK_DIR) / str(experiment_id)


def enter(experiment_id: UUID, step: str) -> Experiment | None:
    """Begin `step`, or resume it when reconcile re-enqueued a lost task: the experiment's
    `resumed` then says so (an earlier attempt may have left work behind)."""
    if not services.begin_step(experiment_id, step):
        experiment = Experiment.objects.filter(pk=experiment_id).select_related("project", "engine").first()
        if not experiment or experiment.is_terminal or experiment.current_step != step:
            return None
        services.heartbeat(experiment_id)
        experiment.resumed = True
        return experiment
    experiment = Experiment.objects.select_related("project", "engine").get(pk=experiment_id)
    experiment.resumed = False
    return experiment


def inside(root: Path, relative: str, what: str) -> Path:
    path = (root / relative).resolve()
    if path != root.resolve() and root.resolve() not in path.parents:
        raise StepFailed(f"{what} {relative!r} points outside the repository")
    return path
