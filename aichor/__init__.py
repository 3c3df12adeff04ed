# Loaded on first use, not with the package: the `aichor` CLI lives in aichor.cli and must start
# without Celery and Django (every enqueue goes through aichor.celery's app explicitly).
__all__ = ["celery_app"]


def __getattr__(name: str):
    if name == "celery_app":
        from aichor.celery import app

        return app
    raise AttributeError(f"module 'aichor' has no attribute {name!r}")
