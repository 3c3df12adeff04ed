"""Port forwarding (SPEC §7, `aichor experiments port-forward`): one WebSocket carries one TCP
connection, as raw bytes both ways, to a port inside one process of a Running experiment.

The engine opens the connection (Engine.port_forward), inside the experiment's own network
namespace: this consumer never connects anywhere itself, so the server's own services (Redis,
PostgreSQL on its loopback) are out of reach, and a remote Docker host is reached where it is.
Authorised in connect(): an API token (`Authorization: Bearer`; never a query string, which
access logs keep) or the browser session, then projects.access (outsiders get the same refusal
as an unknown experiment). Refusals accept first and close with 4000 + the HTTP status they
mirror, so a client can tell the reason (a refused handshake only ever says 403)."""

import asyncio
import logging
from urllib.parse import parse_qs

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncWebsocketConsumer
from django.http import Http404

from experiments.access import get_experiment
from experiments.engines import get_engine
from experiments.engines.base import Engine, EngineError, ExecSession, NotSupported
from experiments.models import Status, StepName
from projects.tokens import authenticate_token, bearer_of

log = logging.getLogger(__name__)

CLOSE_BAD_PROCESS = 4400
CLOSE_NOT_LOGGED_IN = 4401
CLOSE_NOT_FOUND = 4404
CLOSE_NOT_RUNNING = 4409
CLOSE_UNSUPPORTED = 4501
CLOSE_UNREACHABLE = 4502
READ_TIMEOUT = 0.5  # how soon a reader thread notices the tunnel was closed


class Refused(Exception):
    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code


def _user_of(scope):
    headers = dict(scope.get("headers") or [])
    raw = bearer_of(headers.get(b"authorization", b"").decode("latin-1"))
    if raw:
        return authenticate_token(raw)
    user = scope.get("user")
    return user if user is not None and user.is_authenticated else None


@database_sync_to_async
def authorise(scope, experiment_id, process: str | None) -> tuple[Engine, dict, str]:
    """(engine, handle, process) to forward to, or Refused."""
    user = _user_of(scope)
    if user is None:
        raise Refused(CLOSE_NOT_LOGGED_IN, "authenticate with an API token (Authorization: Bearer)")
    try:
        experiment, _ = get_experiment(user, experiment_id)
    except Http404:
        raise Refused(CLOSE_NOT_FOUND, "no such experiment") from None
    if experiment.status != Status.PROCESSING or experiment.current_step != StepName.RUNNING:
        raise Refused(CLOSE_NOT_RUNNING, "the experiment is not running")
    try:
        engine = get_engine(experiment.engine)
    except EngineError as exc:
        raise Refused(CLOSE_UNSUPPORTED, str(exc)) from None
    processes = [p.name for p in engine.processes(experiment.handle)] if experiment.handle else []
    if not processes:
        raise Refused(CLOSE_NOT_RUNNING, "the experiment has no process yet")
    if process and process not in processes:
        raise Refused(CLOSE_BAD_PROCESS, f"no process {process}; it has {', '.join(processes)}")
    return engine, experiment.handle, process or processes[0]


def _wake(future: asyncio.Future) -> None:
    if not future.done():  # the descriptor stays readable until the pump reads it
        future.set_result(None)


def _open(engine: Engine, handle: dict, process: str, port: int) -> ExecSession:
    try:
        return engine.port_forward(handle, process, port)
    except NotSupported as exc:
        raise Refused(CLOSE_UNSUPPORTED, str(exc)) from None
    except EngineError as exc:
        raise Refused(CLOSE_UNREACHABLE, str(exc)) from None


class PortForwardConsumer(AsyncWebsocketConsumer):
    # No group messages reach this consumer: without a channel layer every keystroke is one
    # receive, not a race between the socket and a channel-layer poll (a Redis BRPOP in production).
    channel_layer_alias = "no-channel-layer"

    async def connect(self) -> None:
        self.session: ExecSession | None = None
        self.pump: asyncio.Task | None = None
        kwargs = self.scope["url_route"]["kwargs"]
        port = kwargs["port"]
        process = (parse_qs(self.scope.get("query_string", b"").decode()).get("process") or [None])[0]
        await self.accept()
        try:
            if not 0 < port < 65536:
                raise Refused(CLOSE_BAD_PROCESS, "the port must be between 1 and 65535")
            engine, handle, process = await authorise(self.scope, kwargs["experiment_id"], process)
            self.session = await asyncio.to_thread(_open, engine, handle, process, port)
        except Refused as refused:
            await self._close(refused.code, str(refused))
            return
        self.pump = asyncio.create_task(self._pump(self.session))

    async def _pump(self, session: ExecSession) -> None:
        fd = session.fileno()
        loop = asyncio.get_running_loop()
        while True:
            if fd is None:
                data = await asyncio.to_thread(session.read, READ_TIMEOUT)
            else:
                # Readiness on the event loop, one read per wake-up: the next read waits until
                # the WebSocket took this one, so a slow client slows the sender down.
                readable = loop.create_future()
                loop.add_reader(fd, _wake, readable)
                try:
                    await readable
                finally:
                    loop.remove_reader(fd)
                data = session.read(0)
            if data is None:
                break
            if data:
                await self.send(bytes_data=data)
        failure = session.failure()
        if failure:
            await self._close(CLOSE_UNREACHABLE, failure)
        else:
            await self.close()

    async def _close(self, code: int, reason: str) -> None:
        # WebSocket close reasons are capped at 123 bytes.
        await self.close(code=code, reason=reason.encode()[:120].decode(errors="ignore"))

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        if self.session is None:
            return
        data = bytes_data if bytes_data is not None else (text_data or "").encode()
        try:
            written = self.session.write_nowait(data)
            if written < len(data):
                # What the far side does not take now waits in a thread, never on the event loop.
                await asyncio.to_thread(self.session.write, data[written:])
        except OSError:
            pass  # the connection is gone; the pump reports the end

    async def disconnect(self, code: int) -> None:
        if self.pump is not None:
            self.pump.cancel()
        if self.session is not None:
            session, self.session = self.session, None
            await asyncio.to_thread(session.close)
