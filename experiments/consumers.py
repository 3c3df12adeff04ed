"""The live log of an experiment over a WebSocket.

It reads the stored LogChunks (polling the database), not a channel layer: the web server and
the worker may be separate processes without Redis, and a reconnecting browser must get the
same lines anyway. Protocol (server → browser, JSON):
  {"type": "lines", "first": N, "lines": [...], "total": T}  lines N.. of the stream; a `first`
  beyond what the browser holds means lines were skipped (it asks for them over HTTP on demand)
  {"type": "streams", "streams": [...]}   the streams the experiment has so far
  {"type": "end", "status": "Succeeded"}  the experiment is over and every line was sent
"""

import asyncio
from urllib.parse import parse_qs

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer
from django.http import Http404

from experiments import logview
from experiments.access import get_experiment

POLL_SECONDS = 0.5
TAIL_LINES = 1000
# Close code for "no such experiment (or not yours)": the browser stops reconnecting.
CLOSE_NOT_FOUND = 4404


class LogConsumer(AsyncJsonWebsocketConsumer):
    async def connect(self) -> None:
        self.task: asyncio.Task | None = None
        try:
            self.experiment, _ = await database_sync_to_async(get_experiment)(
                self.scope["user"], self.scope["url_route"]["kwargs"]["experiment_id"]
            )
        except Http404:
            await self.close(code=CLOSE_NOT_FOUND)
            return
        query = parse_qs(self.scope.get("query_string", b"").decode())
        self.stream = (query.get("stream") or [""])[0][:100]
        await self.accept()
        self.task = asyncio.create_task(self.follow())

    async def disconnect(self, code: int) -> None:
        if self.task:
            self.task.cancel()

    async def receive_json(self, content, **kwargs) -> None:
        pass  # the browser only listens; switching streams is a new connection

    async def follow(self) -> None:
        first, lines, total = await database_sync_to_async(logview.tail)(self.experiment.pk, self.stream, TAIL_LINES)
        await self.send_json({"type": "lines", "first": first, "lines": lines, "total": total})
        position, known_streams, tick = total, None, 0
        while True:
            status = await database_sync_to_async(logview.follow_ended)(self.experiment.pk)
            ended = status is not None
            # Read after the status: lines written before the experiment ended are all in.
            total = await database_sync_to_async(logview.total_lines)(self.experiment.pk, self.stream)
            if total > position:
                first, lines = await database_sync_to_async(logview.line_range)(
                    self.experiment.pk, self.stream, position, total
                )
                await self.send_json({"type": "lines", "first": first, "lines": lines, "total": total})
                position = total
            if tick % 4 == 0 or ended:
                streams = await database_sync_to_async(logview.stream_names)(self.experiment.pk)
                if streams != known_streams:
                    known_streams = streams
                    await self.send_json({"type": "streams", "streams": streams})
            if ended:
                await self.send_json({"type": "end", "status": status})
                return
            tick += 1
            await asyncio.sleep(POLL_SECONDS)
