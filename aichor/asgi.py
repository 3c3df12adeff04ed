import os

import django
from django.core.handlers.asgi import ASGIHandler

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "aichor.settings")
# Django must be set up before the routing imports the consumers and their models.
django.setup(set_prefix=False)


class Handler(ASGIHandler):
    """Django's ASGI handler, except that webhook deliveries skip the per-request thread.

    Django runs each request's sync code in a thread made for that request, so a persistent
    database connection (CONN_MAX_AGE) is never reused: every delivery would pay for a new
    PostgreSQL connection, a third of its accept latency. Webhook views are short (verify,
    insert, enqueue), so they run on asgiref's one shared sync thread instead, whose connection
    lives on. Everything else keeps Django's behaviour."""

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/webhooks/"):
            await self.handle(scope, receive, send)
        else:
            await super().__call__(scope, receive, send)


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
