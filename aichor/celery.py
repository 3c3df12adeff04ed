import os

from celery import Celery
from celery.signals import task_postrun, task_prerun
from django.db import close_old_connections

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "aichor.settings")

app = Celery("aichor")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


# A new PostgreSQL connection for every task (Celery's default, see CELERY_DB_REUSE_MAX) cost its
# server ~6 ms of CPU and the worker ~1 ms: as much as a pipeline step's queries (issue 12). A
# connection is dropped as a request drops it: once older than CONN_MAX_AGE (each time on SQLite)
# or left unusable by an error, and checked before its next use (CONN_HEALTH_CHECKS). Not for a
# task run eagerly: it runs inside its caller's request and transaction.
@task_prerun.connect
@task_postrun.connect
def _recycle_connections(sender=None, **_kwargs) -> None:
    if not getattr(getattr(sender, "request", None), "is_eager", False):
        close_old_connections()
