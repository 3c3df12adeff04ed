"""One module per pipeline step. Each begins its step through services.begin_step (a
conditional update: a cancelled experiment goes no further), does its slow I/O outside any
transaction, keeps its log, and hands over to the next step."""

from experiments.pipeline.build import run_build
from experiments.pipeline.clone import fetch_code, fetch_git, run_clone
from experiments.pipeline.common import Liveness, StepFailed, workdir_of
from experiments.pipeline.complete import stop
from experiments.pipeline.reconcile import reconcile
from experiments.pipeline.run import run_submit
from experiments.pipeline.watcher import watch_engine, watch_once

__all__ = [
    "Liveness",
    "StepFailed",
    "fetch_code",
    "fetch_git",
    "reconcile",
    "run_build",
    "run_clone",
    "run_submit",
    "stop",
    "watch_engine",
    "watch_once",
    "workdir_of",
]
