"""Uploaded archives: a gzip bomb or a flood of files stops at the limits while unpacking, and
archives nothing references (an upload cut by a server restart) are swept."""

import io
import os
import tarfile
import time
import uuid
from pathlib import Path

import pytest
from django.core.files.base import ContentFile
from django.core.files.storage import default_storage

from experiments.archives import sweep_orphan_archives
from experiments.models import Experiment, Status, StepName, StepStatus
from experiments.pipeline import run_clone, workdir_of
from experiments.services import create_experiment

pytestmark = pytest.mark.django_db(transaction=True)

MANIFEST = "kind: AIchorManifest\n"


class Zeros(io.RawIOBase):
    """`size` zero bytes, produced as read: the bomb is built without holding it in memory."""

    def __init__(self, size: int) -> None:
        self.left = size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = min(len(buffer), self.left)
        buffer[:n] = bytes(n)
        self.left -= n
        return n


def archive_experiment(project, build) -> Experiment:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        build(tar)
    name = default_storage.save(f"archives/{uuid.uuid4()}.tar.gz", ContentFile(buf.getvalue()))
    return create_experiment(
        project=project, source=Experiment.Source.ARCHIVE, archive=name, manifest_path="aichor_manifests/manifest.yaml"
    )


def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def bytes_on_disk(root: Path) -> int:
    return sum(os.lstat(os.path.join(d, f)).st_blocks * 512 for d, _, files in os.walk(root) for f in files)


def test_gzip_bomb_stops_at_the_unpacked_size_limit(project, settings):
    settings.MAX_UNPACKED_BYTES = 4 * 1024 * 1024
    bomb_size = 256 * 1024 * 1024

    def build(tar):
        add(tar, "aichor_manifests/manifest.yaml", MANIFEST.encode())
        info = tarfile.TarInfo("data/zeros.bin")
        info.size = bomb_size
        tar.addfile(info, Zeros(bomb_size))

    experiment = archive_experiment(project, build)
    assert default_storage.size(experiment.archive) < 1024 * 1024  # a small upload...
    run_clone(experiment.pk)
    experiment.refresh_from_db()
    assert experiment.status == Status.FAILED
    assert "AICHOR_MAX_UNPACKED_BYTES" in experiment.failure_reason
    assert experiment.steps.get(name=StepName.CLONING).status == StepStatus.FAILED
    # ...that never became the 256 MiB member on the worker's disk.
    assert bytes_on_disk(workdir_of(experiment.pk)) < settings.MAX_UNPACKED_BYTES


def test_archive_with_too_many_files_fails_naming_the_limit(project, settings):
    settings.MAX_ARCHIVE_FILES = 20

    def build(tar):
        add(tar, "aichor_manifests/manifest.yaml", MANIFEST.encode())
        for i in range(100):
            add(tar, f"many/{i}.txt", b"x")

    experiment = archive_experiment(project, build)
    run_clone(experiment.pk)
    experiment.refresh_from_db()
    assert experiment.status == Status.FAILED
    assert "more than 20 files (AICHOR_MAX_ARCHIVE_FILES)" in experiment.failure_reason
    workdir = workdir_of(experiment.pk)
    assert len([f for _, _, files in os.walk(workdir) for f in files]) <= 20


def test_archive_within_the_limits_unpacks(project, settings):
    settings.MAX_UNPACKED_BYTES = 1024 * 1024
    settings.MAX_ARCHIVE_FILES = 10

    def build(tar):
        add(tar, "aichor_manifests/manifest.yaml", MANIFEST.encode())
        add(tar, "src/train.py", b"print('hi')\n" * 1000)

    experiment = archive_experiment(project, build)
    run_clone(experiment.pk)
    experiment.refresh_from_db()
    # The manifest is deliberately incomplete: failing on it proves unpacking went through.
    assert "Invalid manifest" in experiment.failure_reason, experiment.failure_reason
    assert (workdir_of(experiment.pk) / "src/train.py").stat().st_size == 12_000


def _archive(age_seconds: float) -> str:
    name = default_storage.save(f"archives/{uuid.uuid4()}.tar", ContentFile(b"tar"))
    stamp = time.time() - age_seconds
    os.utime(default_storage.path(name), (stamp, stamp))
    return name


def test_sweep_removes_only_old_unreferenced_archives(project):
    orphan = _archive(2 * 3600)
    referenced = _archive(2 * 3600)
    fresh = _archive(60)
    create_experiment(project=project, source=Experiment.Source.ARCHIVE, archive=referenced, manifest_path="m.yaml")

    assert sweep_orphan_archives() == [orphan]
    assert not default_storage.exists(orphan)
    assert default_storage.exists(referenced)
    assert default_storage.exists(fresh)
    # The experiment goes with the test's database; its old archive must not go on to be an
    # orphan that a later test of this worker's sweep finds.
    default_storage.delete(referenced)
    default_storage.delete(fresh)


def test_sweep_runs_from_celery_beat(settings):
    from aichor.celery import app

    schedule = {entry["task"] for entry in settings.CELERY_BEAT_SCHEDULE.values()}
    assert "experiments.sweep_archives" in schedule
    app.loader.import_default_modules()  # what a worker does at start (autodiscovery is lazy)
    assert "experiments.sweep_archives" in app.tasks
