"""WebSocket routes (logs, terminal); each consumer authorises through experiments.access."""

from django.urls import path

from experiments.consumers import LogConsumer
from experiments.portforward import PortForwardConsumer
from experiments.terminal import TerminalConsumer

websocket_urlpatterns: list = [
    path("ws/experiments/<uuid:experiment_id>/logs/", LogConsumer.as_asgi()),
    # The process is a query parameter (?process=worker-1); the command is never the client's.
    path("ws/experiments/<uuid:experiment_id>/terminal/", TerminalConsumer.as_asgi(), name="ws-terminal"),
    path("ws/experiments/<uuid:experiment_id>/port-forward/<int:port>/", PortForwardConsumer.as_asgi()),
]
