from django.apps import AppConfig
from django.core.signals import request_started


class MetricsConfig(AppConfig):
    name = "metrics"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        # The first request a process serves starts its spare TensorBoard: only processes that
        # serve requests need one (not workers, not manage.py), and it is warm long before the
        # first TensorBoard view.
        request_started.connect(_prewarm_once, dispatch_uid="metrics-tensorboard-prewarm")


def _prewarm_once(**kwargs) -> None:
    from metrics import tensorboard

    request_started.disconnect(dispatch_uid="metrics-tensorboard-prewarm")
    tensorboard.prewarm()
