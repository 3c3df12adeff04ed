"""Append-only logs kept in LogChunk rows, so they survive the containers and stay out of the
experiment row. One writer per stream (the task that owns the step or the process)."""

import logging
import threading
import time
from contextlib import nullcontext

from django.db import IntegrityError, connection, transaction
from django.db.models import Max, Sum

from experiments.models import LogChunk

logger = logging.getLogger("experiments.logs")

FLUSH_BYTES = 64 * 1024
FLUSH_SECONDS = 0.5
# The largest chunk row (but a longer line stays whole: the viewer numbers lines per chunk, and
# engines bound a line's length). A burst of megabytes becomes many rows, none of them huge.
CHUNK_BYTES = 256 * 1024


class LogWriter:
    def __init__(self, experiment_id, stream: str) -> None:
        self.experiment_id = experiment_id
        self.stream = stream
        self._buffer: list[str] = []
        self._size = 0
        self._last_flush = time.monotonic()
        # A build streams from a reader thread while the step's loop flushes on a timer.
        self._lock = threading.RLock()
        # Where the stream ends is asked of the database only when the first chunk finds its
        # place taken: most writers begin a new stream (a step's first attempt), and a resumed
        # one loses one failed insert instead of every writer paying a query.
        self._seq, self._lines = 0, 0

    def _load_position(self) -> None:
        agg = LogChunk.objects.filter(experiment_id=self.experiment_id, stream=self.stream).aggregate(
            seq=Max("seq"), lines=Sum("line_count")
        )
        self._seq = (agg["seq"] + 1) if agg["seq"] is not None else 0
        self._lines = agg["lines"] or 0

    def write(self, text: str) -> None:
        if not text:
            return
        with self._lock:
            self._buffer.append(text)
            self._size += len(text)
        self.flush_if_due()

    def flush_if_due(self) -> None:
        """Called on writes and by loops waiting on silent work, so readers see output promptly."""
        if self._size >= FLUSH_BYTES or time.monotonic() - self._last_flush >= FLUSH_SECONDS:
            self.flush()

    def line(self, text: str) -> None:
        self.write(text if text.endswith("\n") else text + "\n")

    def flush(self) -> None:
        with self._lock:
            self._flush()

    def _flush(self) -> None:
        self._last_flush = time.monotonic()
        if not self._buffer:
            return
        text = "".join(self._buffer)
        self._buffer, self._size = [], 0
        start = 0
        while start < len(text):
            end = len(text)
            if end - start > CHUNK_BYTES:
                cut = text.rfind("\n", start, start + CHUNK_BYTES)
                if cut < 0:
                    cut = text.find("\n", start + CHUNK_BYTES)
                end = cut + 1 if cut >= 0 else end
            self._append(text[start:end])
            start = end

    def _append(self, text: str) -> None:
        count = text.count("\n") + (0 if text.endswith("\n") else 1)
        for _attempt in range(3):
            try:
                # A savepoint only inside a transaction: alone, a failed insert harms nothing.
                with transaction.atomic() if connection.in_atomic_block else nullcontext():
                    LogChunk.objects.create(
                        experiment_id=self.experiment_id,
                        stream=self.stream,
                        seq=self._seq,
                        first_line=self._lines,
                        line_count=count,
                        text=text,
                    )
                break
            except IntegrityError:
                # The stream goes on from an earlier attempt, or another writer (a retried
                # task) appended meanwhile: continue after it.
                self._load_position()
        self._seq += 1
        self._lines += count
        # The substring test first: most output has no metric, and this runs on every chunk.
        if "AICHOR_METRIC" in text and self.stream.startswith("process:"):
            _record_metrics(self.experiment_id, text)

    def close(self) -> None:
        self.flush()

    def __enter__(self) -> "LogWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _record_metrics(experiment_id, text: str) -> None:
    from metrics.services import record_log_metrics  # metrics reads experiments' models

    try:
        record_log_metrics(experiment_id, text)
    except Exception:
        # The log chunk is stored already; a metric that cannot be recorded must not stop the
        # watcher from reading the rest of the output.
        logger.exception("metrics of experiment %s not recorded", experiment_id)


def append_log(experiment_id, stream: str, text: str) -> None:
    with LogWriter(experiment_id, stream) as writer:
        writer.write(text)


def read_log(experiment_id, stream: str, *, after_seq: int = -1, limit: int | None = None) -> list[LogChunk]:
    qs = LogChunk.objects.filter(experiment_id=experiment_id, stream=stream, seq__gt=after_seq).order_by("seq")
    return list(qs[:limit] if limit else qs)


def log_text(experiment_id, stream: str) -> str:
    return "".join(chunk.text for chunk in read_log(experiment_id, stream))


def streams(experiment_id) -> list[str]:
    return list(
        LogChunk.objects.filter(experiment_id=experiment_id)
        .values_list("stream", flat=True)
        .distinct()
        .order_by("stream")
    )
