"""TensorBoard served by aichor: one real TensorBoard process per experiment (or per chosen set of
a project's experiments, TensorBoard's `name:path` logdir spec), on 127.0.0.1 only,
started on the first view and shared by every viewer of this web process, stopped after
IDLE_SECONDS without a request, at most settings.AICHOR_TENSORBOARD_MAX at once (the longest
idle is stopped to make room). The dashboard proxies to it (metrics.views), so only members
reach it.

It reads the experiment's AICHOR_TENSORBOARD_PATH: s3:// through boto3 (TensorBoard needs no
TensorFlow), or, on the filesystem backend, a mirror of its event files only. TensorBoard follows
links and reads what a projector config names, and that folder is the workload's to fill: a
link there (`ln -s / tensorboard/root`) would hand members the server's files. The mirror is
filled through the datasets listing and reads, which never follow a link (refresh_mirror).

A first view waits for TensorBoard to start, and most of that is importing it (seconds on a busy
machine). So each web process keeps one spare TensorBoard with its imports done and its frontend
compressed (metrics/tensorboard_warm.py), waiting for a command line: started with the first
request this process serves (metrics.apps), used by the next TensorBoard to start, and replaced
REFILL_SECONDS after that one answers. Its data server (the Rust one, wherever it can read the
logdir) and the C checksum of event records make the reading itself fast (tensorboard_warm)."""

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from django.conf import settings

from datasets.services import InvalidKey, StorageError
from datasets.storage import is_s3
from experiments.models import Experiment
from metrics.compare import MAX_RUNS
from metrics.services import event_files, read_event_file, tensorboard_location

IDLE_SECONDS = 600
START_SECONDS = 30.0
WARM_SCRIPT = Path(__file__).with_name("tensorboard_warm.py")
REFILL_SECONDS = 15.0
# The flags every TensorBoard gets; a running experiment's files are read anew every few seconds.
FLAGS = ["--host=127.0.0.1", "--reload_interval=5"]
# TensorBoard's Rust data server reads an experiment's mirror far faster than its Python loader
# (~6 000 scalars per CPU second: 17 s for 50 tags × 2 000 steps), but no s3:// and no logdir
# spec: those two keep the Python loader.
FAST, PYTHON = "--load_fast=true", "--load_fast=false"


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
_spare: subprocess.Popen | None = None
_refill: threading.Timer | None = None


def url_prefix(experiment_id) -> str:
    return f"/experiments/{experiment_id}/tensorboard"


# --- a project's chosen experiments ----------------------------------------------------------
# The set's URL names its experiments (sorted, so every viewer of one set shares its TensorBoard,
# and in every web process alike): /p/<slug>/tensorboard/<hex>_<hex>…/
SET_KEY = re.compile(rf"[0-9a-f]{{32}}(?:_[0-9a-f]{{32}}){{0,{MAX_RUNS - 1}}}")


def set_key(ids) -> str:
    return "_".join(sorted({uuid_hex(i) for i in ids}))


def uuid_hex(value) -> str:
    return uuid.UUID(str(value)).hex


def set_ids(key: str) -> list[str] | None:
    """The experiment ids a set key names, or None for a key no link of ours makes."""
    if not SET_KEY.fullmatch(key):
        return None
    ids = key.split("_")
    return ids if ids == sorted(set(ids)) else None


def set_prefix(slug: str, key: str) -> str:
    return f"/p/{slug}/tensorboard/{key}"


def run_names(experiments: list[Experiment]) -> list[str]:
    """Short ids name the runs (`1a2b3c4d/train`); full ids should two short ones collide."""
    short = [e.short_id for e in experiments]
    return short if len(set(short)) == len(short) else [str(e.pk) for e in experiments]


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
        try:
            _copy_new_bytes(bucket, folder, path, size, root / path)
        except (OSError, InvalidKey, StorageError):
            # Swapped since the listing (for a link, a folder, nothing) or a file that became a
            # folder: skipped, so one such name never fails the whole tab.
            continue


def _copy_new_bytes(bucket: str, folder: str, path: str, size: int, copy: Path) -> None:
    have = copy.stat().st_size if copy.is_file() else 0
    if have >= size:
        return
    copy.parent.mkdir(parents=True, exist_ok=True)
    with copy.open("ab") as out:
        while have < size:
            piece = read_event_file(bucket, folder, path, have, size)
            if not piece:
                break
            out.write(piece)
            have += len(piece)


def _base_environment() -> dict[str, str]:
    return {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("AWS_", "S3_", "AICHOR_", "DATABASE_", "REDIS_", "EMAIL_"))
    }


def _storage_environment() -> dict[str, str]:
    env: dict[str, str] = {}
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


def _spares_wanted() -> bool:
    return getattr(settings, "AICHOR_TENSORBOARD_SPARE", True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(prefix: str, source: list[str]) -> Instance:
    """A TensorBoard reading `source` (--logdir=… or --logdir_spec=…, and its loader): the spare
    when there is one, else a new one, told at once."""
    global _spare
    port = _free_port()
    order = json.dumps(
        {"args": [*source, *FLAGS, f"--port={port}", f"--path_prefix={prefix}"], "env": _storage_environment()}
    )
    process, _spare = _spare, None
    for _ in range(2):
        if process is None or process.poll() is not None:
            process = _warm_process()
        try:
            process.stdin.write(order.encode() + b"\n")
            process.stdin.close()
            return Instance(process=process, port=port, prefix=prefix)
        except OSError:  # it died meanwhile: once more, with a new one
            process.kill()
            process.wait()
            process = None
    raise TensorBoardUnavailable("TensorBoard would not start")


def _warm_process() -> subprocess.Popen:
    return subprocess.Popen(
        # -P: metrics/ (whose tensorboard.py would shadow the package) stays off sys.path.
        [sys.executable, "-P", str(WARM_SCRIPT)],
        env=_base_environment(),
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def prewarm() -> None:
    """Have a spare TensorBoard importing itself, unless one is there (or spares are off)."""
    global _spare
    if not _spares_wanted():
        return
    with _lock:
        if _spare is None or _spare.poll() is not None:
            _spare = _warm_process()


def _stop_spare() -> None:
    global _spare
    spare, _spare = _spare, None
    if spare is not None and spare.poll() is None:
        spare.stdin.close()  # end of input: it exits unused
        try:
            spare.wait(timeout=5)
        except subprocess.TimeoutExpired:
            spare.kill()
            spare.wait()


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
    return _instance(
        str(experiment.pk),
        url_prefix(experiment.pk),
        lambda: [f"--logdir={logdir(experiment)}", PYTHON if is_s3() else FAST],
    )


def instance_for_set(slug: str, experiments: list[Experiment]) -> Instance:
    """One TensorBoard over several experiments of a project, each a run group named by its short id."""
    key = set_key(e.pk for e in experiments)

    def source() -> list[str]:
        names = run_names(experiments)
        spec = ",".join(f"{name}:{logdir(e)}" for name, e in zip(names, experiments, strict=True))
        return [f"--logdir_spec={spec}", PYTHON]

    return _instance(f"{slug}/{key}", set_prefix(slug, key), source)


def _instance(key: str, prefix: str, source) -> Instance:
    global _refill
    with _lock:
        instance = _instances.get(key)
        if instance is None or not instance.alive():
            _stop(key)
            _make_room()
            instance = _instances[key] = _start(prefix, source())
            _start_reaper()
        instance.last_used = time.monotonic()
    if not instance.ready:
        _wait_ready(instance)
        # Replaced a little later: importing a spare would slow down the first reads of the one
        # that just started (seconds, on two busy cores).
        if _refill is not None:
            _refill.cancel()
        _refill = threading.Timer(REFILL_SECONDS, prewarm)
        _refill.daemon = True
        _refill.start()
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
    """Every TensorBoard of this process, and its spare."""
    with _lock:
        for key in list(_instances):
            _stop(key)
        if _refill is not None:
            _refill.cancel()
        _stop_spare()


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
