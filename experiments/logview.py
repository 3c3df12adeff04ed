"""Read-side of stored logs for the dashboard: line ranges, the tail, search and download.

Lines are numbered from 0 across a stream as LogWriter counts them (`first_line` of each chunk),
so a line number found by search is the same one the viewer asks for around it. Only the chunks
that overlap the requested range are read: a 1 GB log never loads whole.
"""

import re
from collections.abc import Iterator
from contextlib import closing

from django.db import connection
from django.db.models import F, Value
from django.db.models.functions import StrIndex
from django.utils import timezone

from aichor.lib.sql import distinct_values
from experiments.models import TERMINAL_STATUSES, Experiment, LogChunk

# The most lines one answer (HTTP or WebSocket message) carries; more is fetched on demand.
# A cancelled or timed-out workload's last output is collected by the stop task just after the
# status changed: a follower keeps reading this long after the end before it closes.
LOG_SETTLE_SECONDS = 3.0
MAX_LINES = 2000
MAX_MATCHES = 200
# Chunks (at most logs.CHUNK_BYTES each) one read of a live follower takes: a WebSocket message
# of about a MiB, so a follower far behind catches up in big steps yet never holds the log.
FOLLOW_CHUNKS = 4
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def split_lines(text: str) -> list[str]:
    lines = text.split("\n")
    if text.endswith("\n"):
        lines.pop()
    return lines


def total_lines(experiment_id, stream: str) -> int:
    return end_of(experiment_id, stream)[0]


def end_of(experiment_id, stream: str) -> tuple[int, int]:
    """(total lines, seq of the last chunk or -1): where a follower starts reading new chunks."""
    last = (
        LogChunk.objects.filter(experiment_id=experiment_id, stream=stream)
        .order_by("-seq")
        .values("first_line", "line_count", "seq")
        .first()
    )
    return (last["first_line"] + last["line_count"], last["seq"]) if last else (0, -1)


def chunks_after(experiment_id, stream: str, after_seq: int, limit: int = FOLLOW_CHUNKS) -> list[tuple[int, int, str]]:
    """(seq, first line number, text) of the next `limit` chunks after `after_seq`: a follower
    reads new output whole, chunk by chunk (an index range, whatever the log's length), in
    answers of bounded size however far behind it is."""
    return list(
        LogChunk.objects.filter(experiment_id=experiment_id, stream=stream, seq__gt=after_seq)
        .order_by("seq")
        .values_list("seq", "first_line", "text")[:limit]
    )


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
    return tail_at(experiment_id, stream, count)[:3]


def tail_at(experiment_id, stream: str, count: int = 1000) -> tuple[int, list[str], int, int]:
    """tail(), and the seq of the last chunk it read: a follower goes on from there."""
    total, seq = end_of(experiment_id, stream)
    first, lines = line_range(experiment_id, stream, total - count, total)
    return first, lines, total, seq


def search(experiment_id, stream: str, query: str) -> tuple[list[tuple[int, str]], bool]:
    """Case-insensitive matches over the whole stored log: ([(line number, text)], truncated).

    A whole chunk is searched at once (lower-cased, then str.find: C speed, about 0.5 s of CPU
    for 200 MiB), never line by line, and only the lines that match are cut out. The database
    lower-cases nothing (its ILIKE/UPPER took 20 s for 200 MiB): when part of the query has no
    case (digits, punctuation), it picks the chunks holding that part with strpos, an exact
    byte search, so only those travel."""
    needle = query.lower()
    if not needle or "\n" in needle:
        return [], False  # a line holds no line break
    chunks = LogChunk.objects.filter(experiment_id=experiment_id, stream=stream)
    anchor = _caseless_part(query)
    if anchor:
        chunks = chunks.annotate(at=StrIndex("text", Value(anchor))).filter(at__gt=0)
    matches: list[tuple[int, str]] = []
    # Closed at once when the matches are enough: the rest of the stream is cancelled.
    with closing(_streamed(chunks.order_by("seq").values_list("first_line", "text"))) as rows:
        for chunk_first, text in rows:
            for offset, line in _matching_lines(text, needle):
                matches.append((chunk_first + offset, line))
                if len(matches) >= MAX_MATCHES:
                    return matches, True
    return matches, False


def _streamed(rows) -> Iterator[tuple]:
    """The rows of a values_list query as PostgreSQL sends them, one at a time (psycopg's
    stream): the database reads the next chunks while this process searches the last ones,
    where a server-side cursor would wait for each FETCH. Other databases: Django's iterator."""
    sql, params = rows.query.sql_with_params()
    with connection.cursor() as cursor:
        if not hasattr(cursor.cursor, "stream"):
            yield from rows.iterator(chunk_size=8)
            return
        yield from cursor.cursor.stream(sql, params)


def _caseless_part(query: str) -> str:
    """The longest run of the query that lower- and upper-casing leave alone (digits, spaces,
    punctuation), when long enough to pick chunks: every matching chunk holds it as it is."""
    runs = re.split(r"[^\W\d_]+", query)  # cut at letters
    best = max((run for run in runs if run.lower() == run.upper() == run), key=len, default="")
    return best if len(best.strip()) >= 3 else ""


def _matching_lines(text: str, needle: str) -> Iterator[tuple[int, str]]:
    """(offset in the chunk, line without ANSI escapes) of each line of `text` holding `needle`
    (lower-cased), one per line. An escape never holds a line break, so removing them keeps the
    line numbers; a match may straddle one (colour codes around a word)."""
    plain = ANSI.sub("", text) if "\x1b" in text else text
    folded = plain.lower()
    if len(folded) != len(plain):  # a letter whose lower case is longer (İ): line by line
        for offset, line in enumerate(split_lines(plain)):
            if needle in line.lower():
                yield offset, line
        return
    offset, counted_to = 0, 0
    at = folded.find(needle)
    while at >= 0:
        start = plain.rfind("\n", 0, at) + 1
        end = plain.find("\n", at)
        end = len(plain) if end < 0 else end
        offset += plain.count("\n", counted_to, start)
        counted_to = start
        yield offset, plain[start:end]
        at = folded.find(needle, end + 1)


def iter_text(experiment_id, stream: str) -> Iterator[str]:
    """The whole log, chunk by chunk, for a streamed download."""
    chunks = (
        LogChunk.objects.filter(experiment_id=experiment_id, stream=stream)
        .order_by("seq")
        .values_list("text", flat=True)
    )
    yield from chunks.iterator(chunk_size=50)


def stream_names(experiment_id) -> list[str]:
    """The experiment's streams, in order. One index probe per stream (one_chunk_per_seq), where
    DISTINCT read every chunk: the experiment page and each log follower ask while the log grows
    by thousands of chunks, and rows just written cost a heap visit each."""
    pk = LogChunk._meta.get_field("experiment").get_db_prep_value(experiment_id, connection)
    return distinct_values(LogChunk, "stream", "experiment_id", pk)


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
