"""Read-side of stored logs for the dashboard: line ranges, the tail, search and download.

Lines are numbered from 0 across a stream as LogWriter counts them (`first_line` of each chunk),
so a line number found by search is the same one the viewer asks for around it. Only the chunks
that overlap the requested range are read: a 1 GB log never loads whole.
"""

import re
from collections.abc import Iterator

from django.db.models import F
from django.utils import timezone

from experiments.models import TERMINAL_STATUSES, Experiment, LogChunk

# The most lines one answer (HTTP or WebSocket message) carries; more is fetched on demand.
# A cancelled or timed-out workload's last output is collected by the stop task just after the
# status changed: a follower keeps reading this long after the end before it closes.
LOG_SETTLE_SECONDS = 3.0
MAX_LINES = 2000
MAX_MATCHES = 200
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def split_lines(text: str) -> list[str]:
    lines = text.split("\n")
    if text.endswith("\n"):
        lines.pop()
    return lines


def total_lines(experiment_id, stream: str) -> int:
    last = (
        LogChunk.objects.filter(experiment_id=experiment_id, stream=stream)
        .order_by("-seq")
        .values("first_line", "line_count")
        .first()
    )
    return last["first_line"] + last["line_count"] if last else 0


def line_range(experiment_id, stream: str, start: int, end: int) -> tuple[int, list[str]]:
    """Lines [start, end) (clamped to MAX_LINES from the end), as (first line number, lines)."""
    start = max(0, start, end - MAX_LINES)
    if end <= start:
        return start, []
    chunks = (
        LogChunk.objects.filter(experiment_id=experiment_id, stream=stream, first_line__lt=end)
        .alias(last=F("first_line") + F("line_count"))
        .filter(last__gt=start)
        .order_by("seq")
        .values_list("first_line", "text")
    )
    lines: list[str] = []
    first = None
    for chunk_first, text in chunks:
        chunk_lines = split_lines(text)
        lo, hi = max(start - chunk_first, 0), min(end - chunk_first, len(chunk_lines))
        if first is None:
            first = chunk_first + lo
        lines.extend(chunk_lines[lo:hi])
    return (first if first is not None else start), lines


def tail(experiment_id, stream: str, count: int = 1000) -> tuple[int, list[str], int]:
    """(first line number, the last `count` lines, total lines)."""
    total = total_lines(experiment_id, stream)
    first, lines = line_range(experiment_id, stream, total - count, total)
    return first, lines, total


def search(experiment_id, stream: str, query: str) -> tuple[list[tuple[int, str]], bool]:
    """Case-insensitive matches over the whole stored log: ([(line number, text)], truncated).
    The database picks the chunks that contain the text; only those are split into lines."""
    needle = query.lower()
    matches: list[tuple[int, str]] = []
    chunks = (
        LogChunk.objects.filter(experiment_id=experiment_id, stream=stream, text__icontains=query)
        .order_by("seq")
        .values_list("first_line", "text")
    )
    for chunk_first, text in chunks.iterator(chunk_size=20):
        for offset, line in enumerate(split_lines(text)):
            plain = ANSI.sub("", line)
            if needle in plain.lower():
                matches.append((chunk_first + offset, plain))
                if len(matches) >= MAX_MATCHES:
                    return matches, True
    return matches, False


def iter_text(experiment_id, stream: str) -> Iterator[str]:
    """The whole log, chunk by chunk, for a streamed download."""
    chunks = (
        LogChunk.objects.filter(experiment_id=experiment_id, stream=stream)
        .order_by("seq")
        .values_list("text", flat=True)
    )
    yield from chunks.iterator(chunk_size=50)


def stream_names(experiment_id) -> list[str]:
    return list(
        LogChunk.objects.filter(experiment_id=experiment_id)
        .values_list("stream", flat=True)
        .distinct()
        .order_by("stream")
    )


def follow_ended(experiment_id) -> str | None:
    """The experiment's final status once its logs are complete, else None (keep following)."""
    row = Experiment.objects.filter(pk=experiment_id).values_list("status", "finished_at").first()
    if row is None:
        return "gone"
    status, finished_at = row
    if status not in TERMINAL_STATUSES:
        return None
    if finished_at and (timezone.now() - finished_at).total_seconds() < LOG_SETTLE_SECONDS:
        return None
    return status
