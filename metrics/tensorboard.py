"""TensorBoard served by aichor: one real TensorBoard process per experiment, on 127.0.0.1 only,
started on the first view and shared by every viewer of this web process, stopped after
IDLE_SECONDS without a request, at most settings.AICHOR_TENSORBOARD_MAX at once (the longest
idle is stopped to make room). The dashboard proxies to it (metrics.views), so only members
reach it.

It reads the experiment's AICHOR_TENSORBOARD_PATH: s3:// through boto3 (TensorBoard needs no
TensorFlow), or, on the filesystem backend, a mirror of its event files only. TensorBoard follows
links and reads what a projector config names, and that folder is the workload's to fill: a
link there (`ln -s / tensorboard/root`) would hand members the server's files. The mirror is
filled through the datasets listing and reads, which never follow a link (refresh_mirror)."""

import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from django.conf import settings

from datasets.storage import is_s3
from experiments.models import Experiment
from metrics.services import event_files, read_event_file, tensorboard_location

IDLE_SECONDS = 600
START_SECONDS = 30.0


class TensorBoardUnavailable(Exception):
    pass


@dataclass
class Instance:
    process: subprocess.Popen
    port: int
    prefix: str
    last_used: float = field(default_factory=time.monotonic)
    ready: bool = False

    def alive(self) -> bool:
        return self.process.poll() is None


_instances: dict[str, Instance] = {}
# Held while starting or stopping: two first viewers must not start two TensorBoards.
_lock = threading.Lock()
_reaper: threading.Thread | None = None


def url_prefix(experiment_id) -> str:
    return f"/experiments/{experiment_id}/tensorboard"


def logdir(experiment: Experiment) -> str:
    bucket, folder = tensorboard_location(experiment)
    if is_s3():
        return f"s3://{bucket}/{folder}"
    refresh_mirror(experiment, force=True)
    return str(mirror_of(experiment))


def mirror_of(experiment: Experiment) -> Path:
    return Path(settings.WORK_DIR) / "tensorboard" / str(experiment.pk)


MIRROR_SECONDS = 2.0
_mirrored: dict[str, float] = {}


def refresh_mirror(experiment: Experiment, *, force: bool = False) -> None:
    """Append what the experiment's event files gained to their copies in the mirror (event
    files only grow); at most every MIRROR_SECONDS per experiment. Nothing on S3."""
    if is_s3():
        return
    key, now = str(experiment.pk), time.monotonic()
    if not force and now - _mirrored.get(key, float("-inf")) < MIRROR_SECONDS:
        return
    _mirrored[key] = now
    bucket, folder = tensorboard_location(experiment)
    root = mirror_of(experiment)
    root.mkdir(parents=True, exist_ok=True)
    for path, size in event_files(bucket, folder):
        copy = root / path
        have = copy.stat().st_size if copy.is_file() else 0
        if have >= size:
            continue
        copy.parent.mkdir(parents=True, exist_ok=True)
        with copy.open("ab") as out:
            while have < size:
                piece = read_event_file(bucket, folder, path, have, size)
                if not piece:
                    break
                out.write(piece)
                have += len(piece)


def _environment() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "S3_", "AICHOR_", "DATABASE_"))}
    if is_s3():
        # TensorBoard's S3 reader is boto3 with these variables (no credentials on its command line).
        env.update(
            S3_ENDPOINT=settings.AICHOR_S3_ENDPOINT or "",
            AWS_ENDPOINT_URL=settings.AICHOR_S3_ENDPOINT or "",
            AWS_ACCESS_KEY_ID=settings.AICHOR_S3_ACCESS_KEY,
            AWS_SECRET_ACCESS_KEY=settings.AICHOR_S3_SECRET_KEY,
            AWS_DEFAULT_REGION=settings.AICHOR_S3_REGION,
            AWS_REGION=settings.AICHOR_S3_REGION,
        )
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(experiment: Experiment) -> Instance:
    port = _free_port()
    prefix = url_prefix(experiment.pk)
    command = [
        sys.executable,
        "-m",
        "tensorboard.main",
        f"--logdir={logdir(experiment)}",
        "--host=127.0.0.1",
        f"--port={port}",
        f"--path_prefix={prefix}",
        # The Rust data server reads no s3:// and a running experiment's files are read anew
        # every few seconds by the Python loader alike.
        "--load_fast=false",
        "--reload_interval=5",
    ]
    process = subprocess.Popen(
        command, env=_environment(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    return Instance(process=process, port=port, prefix=prefix)


def _stop(key: str) -> None:
    instance = _instances.pop(key, None)
    if instance and instance.alive():
        instance.process.terminate()
        try:
            instance.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            instance.process.kill()
            instance.process.wait()


def instance_for(experiment: Experiment) -> Instance:
    """The experiment's running TensorBoard, started (and waited for) when there is none."""
    key = str(experiment.pk)
    with _lock:
        instance = _instances.get(key)
        if instance is None or not instance.alive():
            _stop(key)
            _make_room()
            instance = _instances[key] = _start(experiment)
            _start_reaper()
        instance.last_used = time.monotonic()
    if not instance.ready:
        _wait_ready(instance)
    return instance


def _make_room() -> None:
    limit = max(1, settings.AICHOR_TENSORBOARD_MAX)
    while len(_instances) >= limit:
        oldest = min(_instances, key=lambda k: _instances[k].last_used)
        _stop(oldest)


def _wait_ready(instance: Instance) -> None:
    """Until its port answers: TensorBoard takes a few seconds to import and bind."""
    deadline = time.monotonic() + START_SECONDS
    while time.monotonic() < deadline:
        if not instance.alive():
            raise TensorBoardUnavailable("TensorBoard exited while starting")
        try:
            with socket.create_connection(("127.0.0.1", instance.port), timeout=1):
                instance.ready = True
                return
        except OSError:
            time.sleep(0.1)
    raise TensorBoardUnavailable("TensorBoard did not start in time")


def stop_idle(now: float | None = None) -> list[str]:
    now = time.monotonic() if now is None else now
    with _lock:
        idle = [k for k, i in _instances.items() if now - i.last_used > IDLE_SECONDS or not i.alive()]
        for key in idle:
            _stop(key)
    return idle


def stop_all() -> None:
    with _lock:
        for key in list(_instances):
            _stop(key)


def running() -> list[str]:
    with _lock:
        return [k for k, i in _instances.items() if i.alive()]


def _start_reaper() -> None:
    global _reaper
    if _reaper is None or not _reaper.is_alive():
        _reaper = threading.Thread(target=_reap, name="aichor-tensorboard-reaper", daemon=True)
        _reaper.start()


def _reap() -> None:
    while True:
        time.sleep(30)
        stop_idle()
        with _lock:
            if not _instances:
                return
