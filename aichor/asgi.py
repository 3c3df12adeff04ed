import asyncio
import errno
import gc
import logging
import os
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from importlib import import_module

import django
import uvloop
from asgiref.sync import sync_to_async
from django.core import signals
from django.core.exceptions import RequestAborted
from django.core.handlers.asgi import ASGIHandler, get_script_prefix
from django.core.handlers.exception import convert_exception_to_response
from django.db import connections
from django.http import HttpRequest, HttpResponse
from django.template.loader import get_template
from django.urls import get_resolver, set_script_prefix

from aichor.lib.memory import limit_malloc_arenas

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "aichor.settings")
# Before any thread of the web process allocates (see there).
limit_malloc_arenas()
# Django must be set up before the routing imports the consumers and their models.
django.setup(set_prefix=False)


# Webhook deliveries in flight at once per server process. Each thread keeps its own database
# connection (CONN_MAX_AGE); more threads than this only queue on the GIL.
WEBHOOK_THREADS = 4
_webhook_pool = ThreadPoolExecutor(max_workers=WEBHOOK_THREADS, thread_name_prefix="webhook")
# Deliveries a server process takes on at once (running, or read and waiting for a thread) before
# it leaves new connections to the other processes (ServerLoop); two beyond the threads keep each
# thread fed while the next delivery is read.
WEBHOOK_ADMITTED = WEBHOOK_THREADS + 2

log = logging.getLogger(__name__)


class WebhookHandler(ASGIHandler):
    """Webhook deliveries served as Django's WSGI handler serves a request, on a thread of a pool.

    Under ASGI, Django runs a sync view and each middleware hop on one thread shared by every
    request (or on a fresh thread per request, which opens a new database connection each
    time: a third of a delivery's latency). A push storm then queues behind that one thread:
    1 000 deliveries 50 at a time had a p99 of 1.8 s. Here the whole request (view, insert and
    enqueue) runs on one pool thread, so deliveries proceed in parallel, several server processes
    use every core (scripts/run.sh), and each thread's connection lives on. The body is read in
    the event loop; the answer, a short JSON document, is sent from it."""

    def __init__(self) -> None:
        # No middleware: a delivery has no session, user, CSRF token or static file to look up,
        # its signature is its authentication, and the chain cost a tenth of its CPU time.
        self._view_middleware, self._template_response_middleware, self._exception_middleware = [], [], []
        self._middleware_chain = convert_exception_to_response(self._get_response)

    def _get_response(self, request: HttpRequest) -> HttpResponse:
        # ALLOWED_HOSTS still holds (a 400 otherwise), as CommonMiddleware checks it elsewhere.
        request.get_host()
        return super()._get_response(request)

    async def handle(self, scope, receive, send) -> None:
        _admission.taken += 1
        try:
            try:
                body_file = await self.read_body(receive)
            except RequestAborted:
                return
            try:
                respond = sync_to_async(self._respond, thread_sensitive=False, executor=_webhook_pool)
                response = await respond(scope, body_file)
                await self.send_response(response, send)
            finally:
                body_file.close()
        finally:
            _admission.release()

    def _respond(self, scope, body_file) -> HttpResponse:
        set_script_prefix(get_script_prefix(scope))
        # request_started and request_finished (sent by close()) are where Django drops this
        # thread's connection once too old or broken, as at the start and end of a WSGI request.
        signals.request_started.send(sender=self.__class__, scope=scope)
        request, response = self.create_request(scope, body_file)
        if request is not None:
            response = self.get_response(request)
        # What SecurityMiddleware would add to a JSON answer; the rest of its headers concern pages.
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        # Closed on this thread, where the connection lives; never streamed, so nothing is lost.
        response.close()
        return response


def close_webhook_connections() -> None:
    """Close the database connection of every webhook thread (a test database cannot be dropped
    while they are open). A barrier holds each call until all have started: one per thread."""
    barrier = threading.Barrier(WEBHOOK_THREADS)

    def close() -> None:
        connections.close_all()
        barrier.wait(timeout=10)

    for future in [_webhook_pool.submit(close) for _ in range(WEBHOOK_THREADS)]:
        future.result(timeout=20)


def _open_webhook_connections() -> None:
    """Connect every webhook thread to the database, and the task queue's producer to the broker,
    as the server starts (~5 ms of PostgreSQL's per connection, ~30 ms for the broker's), not
    while the first deliveries of a storm, and all queued behind them, wait. In the background;
    what fails here is retried by the first delivery, as without it."""
    barrier = threading.Barrier(WEBHOOK_THREADS)

    def connect() -> None:
        try:
            connections["default"].ensure_connection()
            if barrier.wait(timeout=10) == 0:
                queue.connect()
        except Exception as exc:  # the database or the broker is not there yet
            log.info("connecting before the first webhook delivery failed: %s", exc)

    for _ in range(WEBHOOK_THREADS):
        _webhook_pool.submit(connect)


class _Admission:
    """Webhook deliveries this process has taken on (and connections it accepted that have sent
    nothing yet: most are deliveries about to start), and the listeners that wait for a free
    place. Used from the event loop's thread only."""

    def __init__(self) -> None:
        self.taken = 0
        self.waiting: list[_Listener] = []

    @property
    def full(self) -> bool:
        return self.taken >= WEBHOOK_ADMITTED

    def release(self) -> None:
        self.taken -= 1
        if not self.full:
            for listener in self.waiting:
                listener.resume()
            self.waiting.clear()


_admission = _Admission()


class _Listener(asyncio.AbstractServer):
    """A listening socket shared by the server processes, accepted from only while this process
    has room for another delivery (_admission), one connection per wake-up. Otherwise a push storm
    piles up unevenly: each process took every connection it could, the one that took more
    queued them behind its threads, and a delivery there waited three times as long as in the
    other (p99 2.5 times the mean). Left in the kernel's queue, a connection goes to whichever
    process frees a place first, in the order they came."""

    # As asyncio's own server, when the process runs out of file descriptors or memory.
    RETRY_SECONDS = 1.0

    def __init__(self, loop: asyncio.AbstractEventLoop, protocol_factory, sock: socket.socket) -> None:
        self._loop, self._protocol_factory, self._sock = loop, protocol_factory, sock
        self._reading = self._closed = False
        self.resume()

    def resume(self) -> None:
        if not self._reading and not self._closed:
            self._loop.add_reader(self._sock.fileno(), self._accept)
            self._reading = True

    def _pause(self) -> None:
        if self._reading:
            self._loop.remove_reader(self._sock.fileno())
            self._reading = False

    def _accept(self) -> None:
        if _admission.full:
            self._pause()
            _admission.waiting.append(self)
            return
        try:
            conn, _ = self._sock.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return  # another process took it
        except OSError as exc:
            if exc.errno not in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                raise
            log.error("accepting a connection failed (%s): trying again in %s s", exc, self.RETRY_SECONDS)
            self._pause()
            self._loop.call_later(self.RETRY_SECONDS, self.resume)
            return
        conn.setblocking(False)
        _admission.taken += 1
        self._loop.create_task(self._serve(conn))

    async def _serve(self, conn: socket.socket) -> None:
        arriving = _Arriving(self._protocol_factory(), self._loop)
        try:
            await self._loop.connect_accepted_socket(lambda: arriving, conn)
        except OSError:  # the client went away at once
            arriving.arrived()
            conn.close()

    def close(self) -> None:
        self._closed = True
        self._pause()

    async def wait_closed(self) -> None:
        pass

    def is_serving(self) -> bool:
        return not self._closed

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        return (self._sock,)


class _Arriving(asyncio.Protocol):
    """The protocol of a connection just accepted, until its first bytes: the place it holds in
    _admission is freed then (a delivery takes its own as it starts), when it closes, or after
    WAIT seconds of silence, and the server's protocol is left alone with the transport. Counted
    from the accept: counted from the start of a delivery, the first of a storm all came in
    before any had started."""

    # A client silent for longer holds no place: a handful of idle connections must not stop a
    # server process from accepting.
    WAIT = 1.0

    def __init__(self, protocol: asyncio.Protocol, loop: asyncio.AbstractEventLoop) -> None:
        self._protocol = protocol
        self._holding = True
        self._timer = loop.call_later(self.WAIT, self.arrived)

    def arrived(self) -> None:
        if self._holding:
            self._holding = False
            self._timer.cancel()
            _admission.release()

    def connection_made(self, transport) -> None:
        self._transport = transport
        self._protocol.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self.arrived()
        self._transport.set_protocol(self._protocol)
        self._protocol.data_received(data)

    def eof_received(self):
        self.arrived()
        return self._protocol.eof_received()

    def connection_lost(self, exc) -> None:
        self.arrived()
        self._protocol.connection_lost(exc)

    def pause_writing(self) -> None:
        self._protocol.pause_writing()

    def resume_writing(self) -> None:
        self._protocol.resume_writing()


class ServerLoop(uvloop.Loop):
    """uvloop, whose servers on a socket shared by several processes (uvicorn --workers) accept
    through _Listener. scripts/run.sh passes it as uvicorn's --loop."""

    async def create_server(
        self, protocol_factory, host=None, port=None, *, sock=None, ssl=None, backlog=100, **kwargs
    ):
        if sock is None or ssl is not None:
            return await super().create_server(
                protocol_factory, host, port, sock=sock, ssl=ssl, backlog=backlog, **kwargs
            )
        sock.listen(backlog)
        _open_webhook_connections()
        return _Listener(self, protocol_factory, sock)


class Handler(ASGIHandler):
    """Django's ASGI handler, except that webhook deliveries go to WebhookHandler."""

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/webhooks/"):
            await webhook_handler.handle(scope, receive, send)
        else:
            await super().__call__(scope, receive, send)


webhook_handler = WebhookHandler()
django_asgi_app = Handler()

from channels.auth import AuthMiddlewareStack  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from channels.security.websocket import AllowedHostsOriginValidator  # noqa: E402

from aichor.limits import limit_requests  # noqa: E402
from aichor.routing import websocket_urlpatterns  # noqa: E402
from experiments import queue  # noqa: E402
from experiments.upload import route_archive_uploads  # noqa: E402


async def lifespan(scope, receive, send) -> None:
    """The server's start and stop (uvicorn --lifespan on). At the stop, once uvicorn has
    closed the connections and their handlers are done, the terminal shells they parked are
    closed and recorded: the timeline of each session ends, instead of the process going
    with the shells and no close event."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            from experiments.terminal import close_parked_sessions

            await close_parked_sessions("the server stopped")
            await send({"type": "lifespan.shutdown.complete"})
            return


application = ProtocolTypeRouter(
    {
        "lifespan": lifespan,
        # Body limits and the anonymous check come first, from the headers alone; archive
        # uploads stream socket -> storage (Django would spool the whole body first).
        "http": limit_requests(route_archive_uploads(django_asgi_app)),
        "websocket": AllowedHostsOriginValidator(AuthMiddlewareStack(URLRouter(websocket_urlpatterns))),
    }
)

# What is loaded by now lives as long as the process: out of the collector's sight, a full
# collection in a push storm no longer walks its ~150 000 objects, a 0.1 s pause of every delivery
# in the process (issue 16). The URLconf, with every view module, loads first for that, and so
# does what the first views of the busiest pages would otherwise load while a member waits
# (0.1-0.4 s on a busy machine): their compiled templates and the docker engine's module.
get_resolver().url_patterns  # noqa: B018
# (Includes compile as they first render: named here too.)
for _name in (
    "experiments/detail.html",
    "experiments/_live.html",
    "experiments/_terminal.html",
    "experiments/list.html",
    "experiments/_list_rows.html",
):
    get_template(_name)
import_module("experiments.engines.docker")
gc.freeze()
