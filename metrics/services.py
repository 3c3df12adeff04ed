"""Recording metric points (from process logs and TensorBoard event files) and reading them back
downsampled for charts."""

import datetime
import logging
from collections import defaultdict
from pathlib import Path

from botocore.exceptions import BotoCoreError, ClientError
from django.core.cache import cache
from django.db import transaction
from django.utils import timezone

from datasets.services import InvalidKey, LinkRefused, StorageError, list_objects, open_object
from datasets.storage import is_s3, s3_client
from experiments.models import Experiment
from metrics import parse
from metrics.models import Chunk, EventFile, Series

log = logging.getLogger("metrics")

CHUNK_POINTS = 5000
# Two summary levels per chunk: min/max of every FINE points, and of every COARSE points. A chart
# reads raw points up to RAW_POINTS, then the fine level up to 40 000 points (800 to 8 000 read),
# then the coarse one (400 at 40 000, 1 000 at 100 000), and downsamples what it read.
FINE, COARSE = 10, 200
MAX_POINTS = 1000
RAW_POINTS = 4 * MAX_POINTS
FINE_POINTS = 40_000
# A poll's `since` reaches back this far: a row saved just before the previous answer but
# committed after it is still sent (series are replaced whole, so a repeat costs nothing).
POLL_OVERLAP = datetime.timedelta(seconds=5)
# Reading event files is skipped when the same experiment was read this recently.
TENSORBOARD_READ_SECONDS = 2
READ_BYTES = 64 * 1024 * 1024


def record_points(experiment_id, source: str, points: list[parse.Point]) -> None:
    """Append points to their series (created on their first point), in the order given."""
    by_name: dict[str, list[tuple[int | None, float]]] = defaultdict(list)
    for name, step, value in points:
        by_name[name].append((step, value))
    with transaction.atomic():
        for name, items in sorted(by_name.items()):
            Series.objects.get_or_create(experiment_id=experiment_id, name=name, defaults={"source": source})
            # Locked: two writers (a retried task, two processes printing one name) append in turn.
            series = Series.objects.select_for_update().get(experiment_id=experiment_id, name=name)
            _append(series, items)


def _append(series: Series, items: list[tuple[int | None, float]]) -> None:
    steps: list[int] = []
    values: list[float] = []
    next_step = series.last_step + 1 if series.last_step is not None else 0
    for step, value in items:
        step = next_step if step is None else step
        steps.append(step)
        values.append(value)
        next_step = step + 1
    series.count += len(values)
    series.last_step, series.last_value = steps[-1], values[-1]
    series.min_value = min(values if series.min_value is None else [series.min_value, *values])
    series.max_value = max(values if series.max_value is None else [series.max_value, *values])
    series.save()
    chunk = Chunk.objects.filter(series=series).order_by("-seq").first()
    while steps:
        if chunk is None or len(chunk.steps) >= CHUNK_POINTS:
            chunk = Chunk(series=series, seq=chunk.seq + 1 if chunk else 0)
        room = CHUNK_POINTS - len(chunk.steps)
        chunk.steps += steps[:room]
        chunk.values += values[:room]
        steps, values = steps[room:], values[room:]
        chunk.fine = list(parse.minmax(chunk.steps, chunk.values, FINE))
        chunk.coarse = list(parse.minmax(chunk.steps, chunk.values, COARSE))
        chunk.save()


def record_log_metrics(experiment_id, text: str) -> None:
    """Called by the log writer for process output that mentions the marker."""
    points = parse.metric_lines(text)
    if points:
        record_points(experiment_id, Series.Source.STDOUT, points)


# --- TensorBoard event files ---------------------------------------------------------------
def tensorboard_location(experiment: Experiment) -> tuple[str, str]:
    """(bucket, folder) of the experiment's AICHOR_TENSORBOARD_PATH (experiments.workload)."""
    return experiment.project.outputs_bucket, f"{experiment.output_prefix}tensorboard/"


def event_files(bucket: str, folder: str) -> list[tuple[str, int]]:
    """(path relative to the folder, size) of every event file under it."""
    if is_s3():
        found = []
        pages = s3_client(bucket).get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=folder)
        for page in pages:
            for item in page.get("Contents", []):
                key = item["Key"]
                if "tfevents" in key.rsplit("/", 1)[-1]:
                    found.append((key[len(folder) :], item["Size"]))
        return found
    return _fs_event_files(bucket, folder)


# A workload can nest folders without end: the walk stops after this many.
MAX_EVENT_FOLDERS = 1000


def _fs_event_files(bucket: str, folder: str) -> list[tuple[str, int]]:
    """The filesystem backend's event files, walked through the datasets listing: a link a
    workload left (`ln -s / tensorboard/root`) is listed as a link and never followed."""
    found, pending, visited = [], [folder], 0
    while pending and visited < MAX_EVENT_FOLDERS:
        prefix, cursor = pending.pop(), None
        visited += 1
        while True:
            try:
                page = list_objects(bucket, prefix, cursor=cursor, page_size=1000)
            except (InvalidKey, LinkRefused):
                break  # a name no key may have, or a folder swapped for a link meanwhile
            for entry in page.entries:
                if entry.is_folder:
                    pending.append(entry.key)
                elif not entry.is_link and "tfevents" in entry.name and entry.size is not None:
                    found.append((entry.key[len(folder) :], entry.size))
            cursor = page.next_cursor
            if not cursor:
                break
    return found


def read_event_file(bucket: str, folder: str, path: str, offset: int, size: int) -> bytes:
    end = min(size, offset + READ_BYTES) - 1
    if is_s3():
        reply = s3_client(bucket).get_object(Bucket=bucket, Key=folder + path, Range=f"bytes={offset}-{end}")
        return reply["Body"].read()
    stored = open_object(bucket, folder + path)  # never through a link (datasets.services)
    try:
        stored.stream.seek(offset)
        return stored.stream.read(end + 1 - offset)
    finally:
        stored.stream.close()


def _series_name(path: str, tag: str) -> str:
    """A file in a subfolder is a run (`train/`, `eval/`): its tags are prefixed with it."""
    run = str(Path(path).parent)
    return tag if run == "." else f"{run}/{tag}"


def read_tensorboard(experiment: Experiment, *, force: bool = False) -> int:
    """Read what was appended to the experiment's event files since the last read; returns the
    points recorded. Cheap to call on every poll: throttled per experiment, and each file is
    read from its stored offset (a ranged GET on S3)."""
    if not force and not cache.add(f"metrics:tb:{experiment.pk}", 1, TENSORBOARD_READ_SECONDS):
        return 0
    bucket, folder = tensorboard_location(experiment)
    try:
        files = event_files(bucket, folder)
    except Exception as exc:  # storage unreachable: the stored series still answer
        log.warning("cannot list event files of %s: %s", experiment.pk, exc)
        return 0
    offsets = dict(EventFile.objects.filter(experiment=experiment).values_list("path", "offset"))
    recorded = 0
    for path, size in sorted(files):
        offset = offsets.get(path, 0)
        while size > offset:
            try:
                data = read_event_file(bucket, folder, path, offset, size)
            except (OSError, InvalidKey, StorageError, ClientError, BotoCoreError) as exc:
                # Gone, or swapped for a folder or a link since the listing: the workload owns
                # the folder. The other files and the stored series still answer.
                log.info("event file %s of %s skipped: %s", path, experiment.pk, exc)
                break
            payloads, used = parse.records(data)
            if not used:
                break
            points = [
                (_series_name(path, tag), step, value)
                for payload in payloads
                for tag, step, value in parse.scalars(payload)
            ]
            if not _advance(experiment, path, offset, offset + used, points):
                break  # another reader took this piece
            recorded += len(points)
            offset += used
    return recorded


def _advance(experiment: Experiment, path: str, old: int, new: int, points: list[parse.Point]) -> bool:
    """Points and the new offset in one transaction, the offset moved only from where this read
    began: two readers of one file never record a piece twice."""
    with transaction.atomic():
        if old == 0:
            EventFile.objects.get_or_create(experiment=experiment, path=path)
        moved = EventFile.objects.filter(experiment=experiment, path=path, offset=old).update(offset=new)
        if not moved:
            return False
        if points:
            record_points(experiment.pk, Series.Source.TENSORBOARD, points)
    return True


# --- reading -------------------------------------------------------------------------------
def chart_series(experiment: Experiment, since: datetime.datetime | None = None, max_points: int = MAX_POINTS):
    """The series changed since `since` (every series without it), each with at most
    `max_points` points, and the cursor to pass as the next `since`."""
    cursor = timezone.now()
    qs = Series.objects.filter(experiment=experiment).order_by("name")
    if since is not None:
        qs = qs.filter(updated_at__gte=since - POLL_OVERLAP)
    series = list(qs)
    # The level each series is read at (see FINE, COARSE).
    levels: dict[str, list[int]] = defaultdict(list)
    for item in series:
        if item.count <= RAW_POINTS:
            levels["raw"].append(item.pk)
        elif item.count <= FINE_POINTS:
            levels["fine"].append(item.pk)
        else:
            levels["coarse"].append(item.pk)
    points: dict[int, tuple[list, list]] = {item.pk: ([], []) for item in series}
    for level, ids in levels.items():
        rows = Chunk.objects.filter(series_id__in=ids).order_by("series_id", "seq")
        if level == "raw":
            for pk, steps, values in rows.values_list("series_id", "steps", "values"):
                points[pk][0].extend(steps)
                points[pk][1].extend(values)
        else:
            for pk, summary in rows.values_list("series_id", level):
                points[pk][0].extend(summary[0])
                points[pk][1].extend(summary[1])
    for item in series:
        item.steps, item.values = parse.downsample(*points[item.pk], max_points)
    return series, cursor
