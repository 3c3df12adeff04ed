import os
import threading
from concurrent.futures import ThreadPoolExecutor

import django
from asgiref.sync import sync_to_async
from django.core import signals
from django.core.exceptions import RequestAborted
from django.core.handlers.asgi import ASGIHandler, get_script_prefix
from django.core.handlers.exception import convert_exception_to_response
from django.db import connections
from django.http import HttpRequest, HttpResponse
from django.urls import set_script_prefix

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "aichor.settings")
# Django must be set up before the routing imports the consumers and their models.
django.setup(set_prefix=False)


# Webhook deliveries in flight at once per server process. Each thread keeps its own database
# connection (CONN_MAX_AGE); more threads than this only queue on the GIL.
WEBHOOK_THREADS = 4
_webhook_pool = ThreadPoolExecutor(max_workers=WEBHOOK_THREADS, thread_name_prefix="webhook")


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
from experiments.upload import route_archive_uploads  # noqa: E402

application = ProtocolTypeRouter(
    {
        # Body limits and the anonymous check come first, from the headers alone; archive
        # uploads stream socket -> storage (Django would spool the whole body first).
        "http": limit_requests(route_archive_uploads(django_asgi_app)),
        "websocket": AllowedHostsOriginValidator(AuthMiddlewareStack(URLRouter(websocket_urlpatterns))),
    }
)
