from django.apps import AppConfig


class NotificationsConfig(AppConfig):
    name = "notifications"

    def ready(self) -> None:
        from experiments.signals import experiment_changed
        from notifications.receivers import on_experiment_changed

        experiment_changed.connect(on_experiment_changed, dispatch_uid="notifications.fan_out")
