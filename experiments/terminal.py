"""The in-browser terminal (SPEC §7): a WebSocket bridged to a login shell in one process of a
Running experiment, or of a failed one held for debugging.

Protocol
- server -> client: the shell's output as binary frames of raw bytes (xterm.js decodes UTF-8
  across frame boundaries, so a multi-byte character split by a read is still drawn whole).
- client -> server: keystrokes as binary frames (text frames are accepted too, for simple
  clients); control messages as a text frame holding one JSON object with a "type":
  {"type": "resize", "rows": 40, "cols": 120}. A text frame that is not such an object is typed.
- The close code says why a session ended or was refused: 4000 + the HTTP status it mirrors
  (CLOSE_REASONS); 1000 when the shell exited or the experiment stopped.

The engine's exec stream is blocking; a reader thread per session feeds the event loop, so one
slow container never stalls another session or the control messages of this one.
"""

import asyncio
import json
import logging
import re
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from urllib.parse import parse_qs

from channels.db import database_sync_to_async
from channels.exceptions import StopConsumer
from channels.generic.websocket import AsyncWebsocketConsumer
from django.conf import settings
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect
from django.utils import timezone
from django.views.decorators.http import require_POST

from experiments import services
from experiments.access import get_experiment
from experiments.engines import get_engine, process_names
from experiments.engines.base import EngineError, ExecSession
from experiments.models import Event, Experiment, Status, StepName

log = logging.getLogger(__name__)

# The client never chooses what runs: a login shell, bash where the image has it. The choice is
# probed first rather than made by an `sh -c "... exec bash"` wrapper, because a Ctrl-C typed
# while such a wrapper still runs kills it, and the session with it.
PROBE = ["/bin/sh", "-c", "command -v bash || true"]
FALLBACK_SHELL = ["/bin/sh", "-l"]

CLOSE_BAD_PROCESS = 4400
CLOSE_NOT_LOGGED_IN = 4401
CLOSE_NOT_FOUND = 4404  # outsiders too: they learn nothing about what exists
CLOSE_IDLE = 4408
CLOSE_NOT_RUNNING = 4409
CLOSE_DEADLINE = 4410
CLOSE_TOO_MANY = 4429
CLOSE_ENGINE = 1011
CLOSE_REASONS = {
    CLOSE_BAD_PROCESS: "no such process in this experiment",
    CLOSE_NOT_LOGGED_IN: "log in to open a terminal",
    CLOSE_NOT_FOUND: "no such experiment",
    CLOSE_NOT_RUNNING: "the experiment is not running",
    CLOSE_TOO_MANY: "too many open terminals",
}
READ_TIMEOUT = 0.5  # how soon a reader thread notices its session ended


@dataclass
class Parked:
    """A shell whose browser went away, kept for TERMINAL_REATTACH_SECONDS so a reconnect with
    the same resume token finds it as it was (output meanwhile included, up to PARKED_BYTES)."""

    session: ExecSession
    fd: int
    session_id: str
    opened_at: datetime
    started: float
    held: bool
    buffer: bytearray = field(default_factory=bytearray)
    timer: asyncio.TimerHandle | None = None
    expire: Callable[[str], None] | None = None  # closes it now, as its timer would


# Parked shells of this server process, keyed by (user id, experiment id, process, resume token):
# only the same person, on the same experiment and process, holding the token, gets one back.
# Touched from the event loop only. A reconnect that lands on another server process opens a
# fresh shell: the engine's exec stream cannot be handed between processes.
_PARKED: dict[tuple, Parked] = {}
# Parked shells being closed (their session event still to write): kept so nothing drops them
# half-way, and so close_parked_sessions can wait for them.
_CLOSING: set[asyncio.Task] = set()
PARKED_BYTES = 256 * 1024
RESUME_TOKEN = re.compile(r"^[A-Za-z0-9_-]{16,64}$")


def _closing(coroutine) -> None:
    task = asyncio.ensure_future(coroutine)
    _CLOSING.add(task)
    task.add_done_callback(_CLOSING.discard)


async def close_parked_sessions(why: str = "the browser went away") -> None:
    """Ends every parked shell of this process now, as if its reattach time were up, and waits
    until the session events are written, including those of shells already closing. Called
    as the server stops (aichor.asgi's lifespan) and by tests as each ends."""
    for parked in list(_PARKED.values()):
        if parked.timer:
            parked.timer.cancel()
        if parked.expire:
            parked.expire(why)
    if _CLOSING:
        await asyncio.wait(set(_CLOSING))


class Refused(Exception):
    def __init__(self, code: int) -> None:
        super().__init__(CLOSE_REASONS.get(code, ""))
        self.code = code


def is_running(experiment: Experiment) -> bool:
    return experiment.status == Status.PROCESSING and experiment.current_step == StepName.RUNNING


def open_sessions(user) -> int:
    """Terminals `user` has open on any server process: opened minus closed session events.
    Only the last hard-deadline window counts, so a server that died mid-session frees its
    slots once no session could still be alive."""
    since = timezone.now() - timedelta(seconds=settings.TERMINAL_MAX_SECONDS + 60)
    events = Event.objects.filter(actor=user, kind=Event.Kind.ACTION, created_at__gte=since)
    opened = set(events.filter(data__terminal="open").values_list("data__session", flat=True))
    closed = set(events.filter(data__terminal="close").values_list("data__session", flat=True))
    return len(opened - closed)


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m {secs:02d}s" if minutes else f"{secs}s"


class TerminalConsumer(AsyncWebsocketConsumer):
    # No group messages reach this consumer: without a channel layer every keystroke is one
    # receive, not a race between the socket and a channel-layer poll (a Redis BRPOP in production).
    channel_layer_alias = "no-channel-layer"
    session: ExecSession | None = None

    async def __call__(self, scope, receive, send) -> None:
        # Channels' loop (await_many_dispatch) races the socket against a channel layer with a
        # fresh task and an asyncio.wait per message: three event-loop turns per keystroke. This
        # consumer has no channel layer, so it awaits the socket itself: one turn.
        self.scope, self.channel_layer, self.base_send = scope, None, send
        try:
            while True:
                await self.dispatch(await receive())
        except StopConsumer:
            pass

    async def connect(self) -> None:
        self.session = None
        self.fd: int | None = None
        self.ended = self.torn_down = False
        self.tasks: list[asyncio.Task] = []
        self.stop_reading = threading.Event()
        # Accept before refusing: a refused handshake reaches the browser as a bare 1006, while
        # a close code lets the page say why. Nothing is sent before authorisation.
        await self.accept()
        user = self.scope.get("user")
        if user is None or not user.is_authenticated:
            await self._refuse(CLOSE_NOT_LOGGED_IN)
            return
        self.user = user
        query = parse_qs(self.scope.get("query_string", b"").decode())
        token = (query.get("resume") or [""])[0]
        self.resume_token = token if RESUME_TOKEN.match(token) else ""
        experiment_id = self.scope["url_route"]["kwargs"]["experiment_id"]
        process = (query.get("process") or [""])[0]
        parked_key = (user.pk, str(experiment_id), process, self.resume_token)
        resuming = bool(self.resume_token and process and parked_key in _PARKED)
        try:
            await database_sync_to_async(self._authorise)(experiment_id, process, resuming)
        except Refused as refused:
            await self._refuse(refused.code)
            return
        self.output: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.shell_ready = asyncio.Event()
        loop = asyncio.get_running_loop()
        parked = _PARKED.pop(parked_key, None) if resuming else None
        if parked is not None:
            # Authorised again above (membership, Running or held): the same shell, as it was.
            if parked.timer:
                parked.timer.cancel()
            loop.remove_reader(parked.fd)
            self.session, self.fd, self.session_id = parked.session, parked.fd, parked.session_id
            self.opened_at, self.started, self.held = parked.opened_at, parked.started, parked.held
            self.last_input = time.monotonic()
            self.shell_ready.set()
            if parked.buffer:
                self.output.put_nowait(bytes(parked.buffer))
            loop.add_reader(self.fd, self._on_readable)
            self.tasks = [asyncio.create_task(self._pump()), asyncio.create_task(self._watch())]
            return
        if resuming:
            # Taken meanwhile (a second tab with the same token): a fresh session after all.
            try:
                await database_sync_to_async(self._authorise)(experiment_id, process, False)
            except Refused as refused:
                await self._refuse(refused.code)
                return
        self.opened_at = timezone.now()
        self.started = self.last_input = time.monotonic()
        try:
            self.session = await asyncio.to_thread(self._open_shell)
        except EngineError as exc:
            await self._end(CLOSE_ENGINE, f"cannot open a shell in {self.process}: {exc}")
            return
        self.fd = self.session.fileno()
        if self.fd is not None:
            # Readiness on the event loop: a keystroke's echo skips a thread hand-over each way.
            loop.add_reader(self.fd, self._on_readable)
        else:
            threading.Thread(
                target=self._read_loop, args=(self.session, loop), name=f"terminal-{self.session_id[:8]}", daemon=True
            ).start()
        self.tasks = [asyncio.create_task(self._pump()), asyncio.create_task(self._watch())]

    def _authorise(self, experiment_id, process: str, resuming: bool) -> None:
        try:
            experiment, _ = get_experiment(self.user, experiment_id)
        except Http404:
            raise Refused(CLOSE_NOT_FOUND) from None
        self.held = experiment.is_held
        if not experiment.can_open_terminal:
            raise Refused(CLOSE_NOT_RUNNING)
        processes = process_names(experiment.engine, experiment.handle)
        process = process or (processes[0] if processes else "")
        if process not in processes:
            raise Refused(CLOSE_BAD_PROCESS)
        self.experiment, self.handle, self.process = experiment, experiment.handle, process
        if resuming:
            return  # the parked session keeps its slot and its open event
        if open_sessions(self.user) >= settings.TERMINAL_MAX_SESSIONS_PER_USER:
            raise Refused(CLOSE_TOO_MANY)
        self.session_id = uuid.uuid4().hex
        services.record_action(
            experiment.pk,
            f"{self.user.get_username()} opened a terminal on {process}" + (" (debug hold)" if self.held else ""),
            actor=self.user,
            data={"terminal": "open", "session": self.session_id, "process": process, "held": self.held},
        )

    def _open_shell(self) -> ExecSession:
        engine = get_engine(self.experiment.engine)
        probe = engine.exec(self.handle, self.process, command=PROBE, tty=False)
        found, deadline = b"", time.monotonic() + 5
        try:
            while (chunk := probe.read(timeout=max(0.0, deadline - time.monotonic()))) and time.monotonic() < deadline:
                found += chunk
        finally:
            probe.close()
        command = ["bash", "-l"] if b"bash" in found else FALLBACK_SHELL
        return engine.exec(self.handle, self.process, command=command, tty=True)

    async def _refuse(self, code: int) -> None:
        self.ended = True
        await self.close(code=code, reason=CLOSE_REASONS[code])

    # --- shell -> browser ----------------------------------------------------------------
    def _on_readable(self) -> None:
        data = self.session.read(0) if self.session else None
        if data is None:
            asyncio.get_running_loop().remove_reader(self.fd)
        if data != b"":
            self.output.put_nowait(data)

    def _read_loop(self, session: ExecSession, loop: asyncio.AbstractEventLoop) -> None:
        try:
            while not self.stop_reading.is_set():
                data = session.read(timeout=READ_TIMEOUT)
                if data is None:
                    break
                if data:
                    loop.call_soon_threadsafe(self.output.put_nowait, data)
            loop.call_soon_threadsafe(self.output.put_nowait, None)
        except RuntimeError:
            pass  # the event loop is gone (server shutting down): nobody left to tell

    async def _pump(self) -> None:
        while True:
            data = await self.output.get()
            if data is None:
                # The shell ended: typed `exit`, or its process (the container) stopped.
                await self._end(1000, await self._ended_message(shell_ended=True))
                return
            self.shell_ready.set()
            await self.base_send({"type": "websocket.send", "bytes": data})

    # --- browser -> shell ----------------------------------------------------------------
    async def dispatch(self, message: dict) -> None:
        # Channels closes stale database connections before every message, a thread hop that
        # doubled a keystroke's round trip. Keystrokes touch no database; everything here that
        # does goes through database_sync_to_async, which closes them itself.
        if message["type"] == "websocket.receive":
            await self.websocket_receive(message)
        else:
            await super().dispatch(message)

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        if self.session is None or self.ended:
            return
        self.last_input = time.monotonic()
        if text_data is not None:
            if text_data.startswith("{"):
                try:
                    message = json.loads(text_data)
                except ValueError:
                    message = None
                if isinstance(message, dict) and message.get("type") == "resize":
                    await self._resize(message)
                    return
            bytes_data = text_data.encode()
        if bytes_data:
            if not self.shell_ready.is_set():
                # Keys typed before the shell's first output (its prompt) would reach a shell
                # that has not set up its signal handlers yet: an early Ctrl-C would kill it.
                try:
                    await asyncio.wait_for(self.shell_ready.wait(), timeout=3)
                except TimeoutError:
                    self.shell_ready.set()
            try:
                # A keystroke goes straight in; whatever does not fit now (a large paste into a
                # shell that stopped reading) waits in a thread, never on the event loop.
                written = self.session.write_nowait(bytes_data) if self.fd is not None else 0
                if written < len(bytes_data):
                    await asyncio.to_thread(self.session.write, bytes_data[written:])
            except OSError:
                pass  # the shell is gone; the reader reports the end

    async def _resize(self, message: dict) -> None:
        try:
            rows, cols = int(message["rows"]), int(message["cols"])
        except (KeyError, TypeError, ValueError):
            return
        if 0 < rows <= 1000 and 0 < cols <= 1000:
            await asyncio.to_thread(self.session.resize, rows, cols)

    # --- limits and the experiment's end -------------------------------------------------
    async def _watch(self) -> None:
        idle, deadline = settings.TERMINAL_IDLE_SECONDS, self.started + settings.TERMINAL_MAX_SECONDS
        poll = settings.TERMINAL_STATE_POLL_SECONDS
        next_poll = time.monotonic() + poll
        while True:
            await asyncio.sleep(max(0.0, min(next_poll, deadline, self.last_input + idle) - time.monotonic()))
            now = time.monotonic()
            if now >= deadline:
                limit = _duration(settings.TERMINAL_MAX_SECONDS)
                await self._end(CLOSE_DEADLINE, f"session time limit of {limit} reached")
                return
            if now >= self.last_input + idle:
                await self._end(CLOSE_IDLE, f"idle for {_duration(idle)}: session closed")
                return
            if now >= next_poll:
                next_poll = now + poll
                if not await database_sync_to_async(self._experiment_open)():
                    await self._end(1000, await self._ended_message())
                    return

    def _experiment_open(self) -> bool:
        experiment = Experiment.objects.filter(pk=self.experiment.pk).first()
        return bool(experiment and (is_running(experiment) or experiment.is_held))

    async def _ended_message(self, shell_ended: bool = False) -> str:
        experiment = (
            await Experiment.objects.filter(pk=self.experiment.pk).only("status", "current_step", "hold_until").afirst()
        )
        if experiment is None:
            return "the experiment was deleted"
        if shell_ended and (is_running(experiment) or (self.held and experiment.is_held)):
            return "the shell exited"
        if experiment.is_held and not self.held:
            # The process ended and a debug hold began: a new session opens in the held copy.
            return "the process ended; the experiment is held for debugging: reopen the terminal"
        return f"the experiment stopped ({experiment.status})"

    async def _end(self, code: int, message: str) -> None:
        if self.ended:
            return
        self.ended = True
        await self.send(bytes_data=f"\r\n\x1b[1;33m[aichor] {message}\x1b[0m\r\n".encode())
        # The session event is written before the browser hears of the end, never lost after it.
        await self._teardown(message)
        # WebSocket close reasons are capped at 123 bytes.
        await self.close(code=code, reason=message.encode()[:120].decode(errors="ignore"))

    async def disconnect(self, code: int) -> None:
        already_ended, self.ended = self.ended, True
        # A connection that dropped (not one closed on purpose, 1000) may come back for its shell.
        if not already_ended and code != 1000 and self._park():
            return
        await self._teardown("the browser closed the terminal")

    def _park(self) -> bool:
        if not (self.resume_token and self.session and self.fd is not None and not self.torn_down):
            return False
        loop = asyncio.get_running_loop()
        self.torn_down = True  # this consumer is done; the parked entry owns the shell now
        for task in self.tasks:
            task.cancel()
        loop.remove_reader(self.fd)
        parked = Parked(self.session, self.fd, self.session_id, self.opened_at, self.started, self.held)
        while not self.output.empty():
            chunk = self.output.get_nowait()
            if chunk is None:
                return self._unpark_failed(parked)
            parked.buffer += chunk
        key = (self.user.pk, str(self.experiment.pk), self.process, self.resume_token)
        consumer = self

        def on_readable() -> None:
            data = parked.session.read(0)
            if data is None:
                _PARKED.pop(key, None)
                loop.remove_reader(parked.fd)
                _closing(consumer._close_parked(parked, "the shell exited while disconnected"))
            elif data:
                parked.buffer += data
                del parked.buffer[:-PARKED_BYTES]

        def expire(why: str = "the browser went away") -> None:
            if _PARKED.get(key) is parked:
                del _PARKED[key]
                loop.remove_reader(parked.fd)
                _closing(consumer._close_parked(parked, why))

        loop.add_reader(self.fd, on_readable)
        parked.timer = loop.call_later(settings.TERMINAL_REATTACH_SECONDS, expire)
        parked.expire = expire
        _PARKED[key] = parked
        self.session = None
        return True

    def _unpark_failed(self, parked: Parked) -> bool:
        # The shell already ended: nothing to keep.
        self.torn_down = False
        self.session = parked.session
        return False

    async def _close_parked(self, parked: Parked, why: str) -> None:
        self.torn_down = False
        self.session, self.fd, self.session_id, self.started = parked.session, None, parked.session_id, parked.started
        await self._teardown(why)

    async def _teardown(self, why: str) -> None:
        # Set before any await: _end and disconnect can both get here, the event is written once.
        if self.torn_down or not hasattr(self, "session_id"):
            return
        self.torn_down = True
        session, self.session = self.session, None
        self.stop_reading.set()
        if session is not None and self.fd is not None:
            asyncio.get_running_loop().remove_reader(self.fd)
        current = asyncio.current_task()
        for task in self.tasks:
            if task is not current:
                task.cancel()
        if session is not None:
            await asyncio.to_thread(session.close)
        seconds = time.monotonic() - self.started
        await database_sync_to_async(services.record_action)(
            self.experiment.pk,
            f"{self.user.get_username()} closed the terminal on {self.process} after {_duration(seconds)}: {why}",
            actor=self.user,
            data={
                "terminal": "close",
                "session": self.session_id,
                "process": self.process,
                "opened_at": self.opened_at.isoformat(),
                "seconds": round(seconds, 1),
                "reason": why,
            },
        )


@require_POST
def release_hold_view(request: HttpRequest, experiment_id) -> HttpResponse:
    """The page's Release button: end a debug hold now (a held experiment is already Failed, so
    Cancel does not apply). Any member may release, as any member may cancel."""
    experiment, _ = get_experiment(request.user, experiment_id)
    services.release_hold(experiment.pk, actor=request.user)
    return redirect("experiment-detail", experiment.pk)
