"""Uploaded code archives in default storage (`archives/`): removing the ones nothing uses.

An upload cut short (the server killed mid-stream, a crash between the storage write and the
experiment row) leaves a file no experiment references. The sweep removes such files once they
are old enough that no upload can still be writing them or about to link them."""

import logging
from datetime import timedelta

from django.conf import settings
from django.core.files.storage import default_storage
from django.utils import timezone

from experiments.models import Experiment

log = logging.getLogger(__name__)

ARCHIVES_DIR = "archives"


def sweep_orphan_archives(max_age_seconds: float | None = None) -> list[str]:
    """Delete archives older than `max_age_seconds` (by modification time: a file still being
    written keeps getting fresher) that no experiment references; returns their names."""
    if max_age_seconds is None:
        max_age_seconds = settings.ORPHAN_ARCHIVE_SECONDS
    if not default_storage.exists(ARCHIVES_DIR):
        return []
    cutoff = timezone.now() - timedelta(seconds=max_age_seconds)
    _, files = default_storage.listdir(ARCHIVES_DIR)
    old = []
    for name in files:
        path = f"{ARCHIVES_DIR}/{name}"
        try:
            if default_storage.get_modified_time(path) < cutoff:
                old.append(path)
        except FileNotFoundError:
            continue  # removed meanwhile
    # Checked after the ages: an archive linked while we looked is seen as referenced.
    referenced = set(Experiment.objects.filter(archive__in=old).values_list("archive", flat=True))
    removed = []
    for path in old:
        if path in referenced:
            continue
        default_storage.delete(path)
        removed.append(path)
    if removed:
        log.info("removed %d orphan archive(s): %s", len(removed), ", ".join(removed))
    return removed
