"""WebSocket routes (logs, terminal); each consumer authorises through projects.access."""

websocket_urlpatterns: list = []
