import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "aichor.settings")
# Django must be set up before the routing imports the consumers and their models.
django_asgi_app = get_asgi_application()

from channels.auth import AuthMiddlewareStack  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from channels.security.websocket import AllowedHostsOriginValidator  # noqa: E402

from aichor.routing import websocket_urlpatterns  # noqa: E402
from experiments.upload import route_archive_uploads  # noqa: E402

application = ProtocolTypeRouter(
    {
        # Archive uploads stream socket -> storage; Django would spool the whole body first.
        "http": route_archive_uploads(django_asgi_app),
        "websocket": AllowedHostsOriginValidator(AuthMiddlewareStack(URLRouter(websocket_urlpatterns))),
    }
)
