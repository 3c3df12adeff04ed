"""Port forwarding (SPEC §7, `aichor experiments port-forward`): one WebSocket carries one TCP
connection, as raw bytes both ways, to a port inside one process of a Running experiment.

Docker containers use the host network and local processes run on the server's host, so the
port is reached at the engine host's address. Authorised in connect(): an API token
(`Authorization: Bearer`, or `?token=` for clients that cannot set headers) or the browser
session, then projects.access (outsiders get the same refusal as an unknown experiment).
Refusals accept first and close with 4000 + the HTTP status they mirror, so a client can
tell the reason (a refused handshake only ever says 403)."""

import asyncio
import logging
import os
from urllib.parse import parse_qs, urlsplit

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncWebsocketConsumer
from django.http import Http404

from experiments.models import Experiment, Status, StepName
from experiments.pipeline import handle_processes
from projects.access import get_experiment
from projects.tokens import authenticate_token, bearer_of

log = logging.getLogger(__name__)

CLOSE_BAD_PROCESS = 4400
CLOSE_NOT_LOGGED_IN = 4401
CLOSE_NOT_FOUND = 4404
CLOSE_NOT_RUNNING = 4409
CLOSE_UNSUPPORTED = 4501
CLOSE_UNREACHABLE = 4502
READ_SIZE = 64 * 1024
CONNECT_TIMEOUT = 10


class Refused(Exception):
    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code


def engine_host(experiment: Experiment) -> str:
    if experiment.engine.kind == "local":
        return "127.0.0.1"
    if experiment.engine.kind == "docker":
        base = experiment.engine.config.get("docker_host") or os.environ.get("DOCKER_HOST") or ""
        # A tcp:// or ssh:// Docker host is another machine: its host network is there.
        return urlsplit(base).hostname or "127.0.0.1" if base.startswith(("tcp://", "ssh://")) else "127.0.0.1"
    raise Refused(CLOSE_UNSUPPORTED, f"port-forward is not available on {experiment.engine.kind} engines")


def _user_of(scope):
    headers = dict(scope.get("headers") or [])
    raw = bearer_of(headers.get(b"authorization", b"").decode("latin-1"))
    if not raw:
        raw = (parse_qs(scope.get("query_string", b"").decode()).get("token") or [None])[0]
    if raw:
        return authenticate_token(raw)
    user = scope.get("user")
    return user if user is not None and user.is_authenticated else None


@database_sync_to_async
def authorise(scope, experiment_id, process: str | None) -> tuple[str, str]:
    """(host, process) to connect to, or Refused."""
    user = _user_of(scope)
    if user is None:
        raise Refused(CLOSE_NOT_LOGGED_IN, "authenticate with an API token")
    try:
        experiment = get_experiment(user, experiment_id)
    except Http404:
        raise Refused(CLOSE_NOT_FOUND, "no such experiment") from None
    if experiment.status != Status.PROCESSING or experiment.current_step != StepName.RUNNING:
        raise Refused(CLOSE_NOT_RUNNING, "the experiment is not running")
    processes = handle_processes(experiment.handle or {})
    if not processes:
        raise Refused(CLOSE_NOT_RUNNING, "the experiment has no process yet")
    if process and process not in processes:
        raise Refused(CLOSE_BAD_PROCESS, f"no process {process}; it has {', '.join(processes)}")
    return engine_host(experiment), process or processes[0]


class PortForwardConsumer(AsyncWebsocketConsumer):
    # No group messages reach this consumer: without a channel layer every keystroke is one
    # receive, not a race between the socket and a channel-layer poll (a Redis BRPOP in production).
    channel_layer_alias = "no-channel-layer"

    async def connect(self) -> None:
        self.writer: asyncio.StreamWriter | None = None
        self.pump: asyncio.Task | None = None
        kwargs = self.scope["url_route"]["kwargs"]
        port = kwargs["port"]
        process = (parse_qs(self.scope.get("query_string", b"").decode()).get("process") or [None])[0]
        await self.accept()
        try:
            if not 0 < port < 65536:
                raise Refused(CLOSE_BAD_PROCESS, "the port must be between 1 and 65535")
            host, process = await authorise(self.scope, kwargs["experiment_id"], process)
            try:
                reader, self.writer = await asyncio.wait_for(asyncio.open_connection(host, port), CONNECT_TIMEOUT)
            except (OSError, TimeoutError):
                raise Refused(CLOSE_UNREACHABLE, f"nothing answers on port {port} in {process}") from None
        except Refused as refused:
            await self.close(code=refused.code, reason=str(refused))
            return
        self.pump = asyncio.create_task(self._pump(reader))

    async def _pump(self, reader: asyncio.StreamReader) -> None:
        try:
            while data := await reader.read(READ_SIZE):
                await self.send(bytes_data=data)
        except OSError:
            pass
        await self.close()

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        if self.writer is None:
            return
        self.writer.write(bytes_data if bytes_data is not None else (text_data or "").encode())
        await self.writer.drain()

    async def disconnect(self, code: int) -> None:
        if self.pump is not None:
            self.pump.cancel()
        if self.writer is not None:
            self.writer.close()
