"""The live log of an experiment over a WebSocket.

It reads the stored LogChunks (polling the database), not a channel layer: the web server and
the worker may be separate processes without Redis, and a reconnecting browser must get the
same lines anyway. After the tail, every stored line is sent, in order, chunk after chunk (a
workload printing thousands of lines a second is followed whole, never sampled); a browser
that reads slower than the workload prints holds the sending back (the server's write buffer
waits for it), and the database is read no further ahead than what was sent.
Protocol (server → browser, JSON):
  {"type": "lines", "first": N, "lines": [...], "total": T}  lines N.. of the stream; a `first`
  beyond what the browser holds means lines were skipped (it asks for them over HTTP on demand);
  after the first message (the tail) that happens only if the stored log itself has a hole
  {"type": "streams", "streams": [...]}   the streams the experiment has so far
  {"type": "end", "status": "Succeeded"}  the experiment is over and every line was sent
"""

import asyncio
import time
from urllib.parse import parse_qs

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer
from django.http import Http404

from experiments import logview
from experiments.access import get_experiment

POLL_SECONDS = 0.5
# How often the list of streams is looked at (a new process, a new step log).
STREAMS_SECONDS = 2.0
TAIL_LINES = 1000
# Close code for "no such experiment (or not yours)": the browser stops reconnecting.
CLOSE_NOT_FOUND = 4404


class LogConsumer(AsyncJsonWebsocketConsumer):
    # No group messages reach it (it reads the stored log): without a channel layer a follower
    # costs no Redis BRPOP loop, and a Redis hiccup cannot close it.
    channel_layer_alias = "no-channel-layer"

    async def connect(self) -> None:
        self.task: asyncio.Task | None = None
        try:
            self.experiment, _ = await database_sync_to_async(get_experiment)(
                self.scope["user"], self.scope["url_route"]["kwargs"]["experiment_id"]
            )
        except Http404:
            await self.close(code=CLOSE_NOT_FOUND)
            return
        # A hostile query (bytes that are not UTF-8, a NUL PostgreSQL cannot compare) names no
        # stream: the follower gets an empty log, not a server error.
        query = parse_qs(self.scope.get("query_string", b"").decode(errors="replace"))
        self.stream = (query.get("stream") or [""])[0][:100].replace("\x00", "")
        await self.accept()
        self.task = asyncio.create_task(self.follow())

    async def disconnect(self, code: int) -> None:
        if self.task:
            self.task.cancel()

    async def receive_json(self, content, **kwargs) -> None:
        pass  # the browser only listens; switching streams is a new connection

    async def follow(self) -> None:
        pk = self.experiment.pk
        first, lines, self.total, seq = await database_sync_to_async(logview.tail_at)(pk, self.stream, TAIL_LINES)
        await self.send_json({"type": "lines", "first": first, "lines": lines, "total": self.total})
        self.known_streams, self.streams_due = None, 0.0
        while True:
            status = await database_sync_to_async(logview.follow_ended)(pk)
            ended = status is not None
            # Read after the status: lines written before the experiment ended are all in.
            while True:
                chunks = await database_sync_to_async(logview.chunks_after)(pk, self.stream, seq)
                if not chunks:
                    break
                seq = await self.send_chunks(chunks)
                if len(chunks) < logview.FOLLOW_CHUNKS and seq == chunks[-1][0]:
                    break  # caught up with what is stored
                await self.send_streams()  # a long catch-up still shows a new process at once
            await self.send_streams(now=ended)
            if ended:
                await self.send_json({"type": "end", "status": status})
                return
            await asyncio.sleep(POLL_SECONDS)

    async def send_chunks(self, chunks: list[tuple[int, int, str]]) -> int:
        """One message of the chunks' lines; the seq of the last chunk sent. A chunk that does
        not start where the one before ended (a hole in the stored log) starts the next one."""
        first, lines, seq = chunks[0][1], [], chunks[0][0]
        for taken, (chunk_seq, chunk_first, text) in enumerate(chunks):
            if taken and chunk_first != first + len(lines):
                break
            lines += logview.split_lines(text)
            seq = chunk_seq
        self.total = max(self.total, first + len(lines))
        await self.send_json({"type": "lines", "first": first, "lines": lines, "total": self.total})
        return seq

    async def send_streams(self, now: bool = False) -> None:
        if not now and time.monotonic() < self.streams_due:
            return
        self.streams_due = time.monotonic() + STREAMS_SECONDS
        streams = await database_sync_to_async(logview.stream_names)(self.experiment.pk)
        if streams != self.known_streams:
            self.known_streams = streams
            await self.send_json({"type": "streams", "streams": streams})
