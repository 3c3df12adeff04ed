"""Shared fixtures: personas (admin, member, outsider), projects, a real Git repository, a
real Docker Engine with a tiny local image, and an in-process Celery worker. Helpers that are
not fixtures live in tests/helpers.py."""

import os
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.helpers import LIVE_SERVERS, GitRepo, ensure_test_image, unavailable, wait_for


def pytest_configure(config):
    from django.conf import settings

    # Each run (each xdist worker) gets its own scratch folders (work dirs, local engine, buckets).
    data = Path(tempfile.mkdtemp(prefix="aichor-test-"))
    _isolate_xdist_worker(data)
    settings.WORK_DIR = data / "work"
    settings.LOCAL_ENGINE_DIR = data / "local-engine"
    settings.BUCKETS_ROOT = data / "buckets"
    # As on a server that has run: tests look into it whichever backend (and worker) ran first.
    settings.BUCKETS_ROOT.mkdir()
    settings.MEDIA_ROOT = data / "media"
    settings.WATCH_POLL_SECONDS = 0.1
    # Hashing a password the production way (PBKDF2, ~1e6 rounds) was most of each database
    # test's setup: every persona is a user with a password.
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    # The `project` fixture runs on the local engine (AICHOR_LOCAL_ENGINE, off by default).
    settings.LOCAL_ENGINE = True
    # Test repositories are file:// URLs; the environment carries it to worker subprocesses.
    settings.ALLOW_LOCAL_REPOS = True
    os.environ["AICHOR_ALLOW_LOCAL_REPOS"] = "true"
    # The fake Git hosts and notification receivers listen on loopback.
    settings.OUTBOUND_ALLOW_NETWORKS = "127.0.0.0/8,::1/128"
    # No spare TensorBoard beside every test server (one test asks for it): it would only add load.
    settings.AICHOR_TENSORBOARD_SPARE = False
    os.environ["AICHOR_TENSORBOARD_SPARE"] = "false"
    # Worker threads must not keep connections open past a test: the test database is
    # flushed or dropped behind them.
    settings.DATABASES["default"]["CONN_MAX_AGE"] = 0
    if settings.DATABASES["default"]["ENGINE"].endswith("sqlite3"):
        # A file, not SQLite's shared in-memory database: worker threads would hit table
        # locks there; a file with WAL and a busy timeout behaves like production.
        settings.DATABASES["default"].setdefault("TEST", {})["NAME"] = str(data / "test.sqlite3")


@pytest.fixture(autouse=True)
def _notifications_unconfigured_until_asked():
    """Whether any notification is configured is kept a few seconds per process: a test must
    not see what an earlier test's (flushed) settings answered."""
    from notifications.services import _settings_changed

    _settings_changed()


def _isolate_xdist_worker(data: Path) -> None:
    """What parallel workers (`pytest -n N`) would otherwise share besides the database, which
    pytest-django already suffixes per worker."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if not worker:
        return
    n = int(worker.removeprefix("gw"))
    # Tests look for files the code under test leaves in the temporary folder (build secrets):
    # another worker's files must not be seen there. Children inherit TMPDIR.
    tmp = data / "tmp"
    tmp.mkdir()
    os.environ["TMPDIR"] = tempfile.tempdir = str(tmp)
    # Tests flush the Redis database their worker processes use.
    base = os.environ.get("AICHOR_TEST_REDIS_URL", "redis://127.0.0.1:6379/14")
    os.environ["AICHOR_TEST_REDIS_URL"] = urlsplit(base)._replace(path=f"/{14 - n % 14}").geturl()


def pytest_collection_modifyitems(config, items):
    # Browser tests last: Playwright's sync API keeps an asyncio loop running in the main thread
    # for the rest of the session, and async tests (channels' communicators) cannot run after it.
    # Browser tests outside tests/browser/ (an app's own page) carry the `browser` marker.
    items.sort(
        key=lambda item: item.nodeid.startswith("tests/browser/") or item.get_closest_marker("browser") is not None
    )


@pytest.fixture(scope="session", autouse=True)
def _celery_memory_broker():
    from kombu.transport import TRANSPORT_ALIASES

    from aichor.celery import app

    # Tests never touch the embedded filesystem broker; a test wanting a worker starts one.
    TRANSPORT_ALIASES["memory-prompt"] = "tests.helpers:PromptMemoryTransport"
    app.conf.broker_url = "memory-prompt://"
    # kombu's in-memory transport polls its queues, once a second by default: every hop of a
    # chained pipeline and every worker shutdown waited up to that long.
    app.conf.broker_transport_options = {"polling_interval": 0.01}
    yield


class BrokerDown:
    """The Celery app's producers pointed at a port that refuses connections (bound, never
    listening) until restore(); a worker already consuming keeps its own connection."""

    def __init__(self) -> None:
        import socket

        from aichor.celery import app

        self.app = app
        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.saved = app.conf.broker_url
        self._switch(f"redis://127.0.0.1:{self.socket.getsockname()[1]}/0")

    def _switch(self, url: str) -> None:
        # The producer pool is built once from broker_url: forget it so the next send connects
        # to `url`. Not closed: kombu keeps pools per URL and would hand the closed one back.
        self.app._pool = None
        self.app.amqp._producer_pool = None
        self.app.conf.broker_url = url

    def restore(self) -> None:
        if self.socket is not None:
            self._switch(self.saved)
            self.socket.close()
            self.socket = None


@pytest.fixture
def broker_down(monkeypatch):
    """Request it after celery_worker_thread: the worker must connect before the broker goes."""
    from experiments import queue

    # A fresh outage record: the error is logged on the first refusal of this test.
    monkeypatch.setattr(queue, "_broker_outage", queue._BrokerOutage())
    down = BrokerDown()
    yield down
    down.restore()


@pytest.fixture
def admin_user(django_user_model):
    return django_user_model.objects.create_user("admin@example.com", "admin@example.com", "pw-admin-123")


@pytest.fixture
def member_user(django_user_model):
    return django_user_model.objects.create_user("member@example.com", "member@example.com", "pw-member-123")


@pytest.fixture
def outsider_user(django_user_model):
    return django_user_model.objects.create_user("outsider@example.com", "outsider@example.com", "pw-out-123")


@pytest.fixture
def local_engine(db):
    from projects.models import Engine

    return Engine.objects.create(name="local", kind=Engine.Kind.LOCAL)


@pytest.fixture
def docker_engine(db, docker_client):
    from projects.models import Engine

    # This machine's dockerd runs without a bridge network (dockerd --bridge=none).
    return Engine.objects.create(name="docker", kind=Engine.Kind.DOCKER, config={"network": "none"})


@pytest.fixture
def docker_project(docker_engine, admin_user, member_user, git_repo):
    """A project on the docker engine (the `project` fixture runs on the local engine)."""
    from projects.services import create_project

    return create_project(
        name="Docker",
        slug="dock",
        repo_clone_url=git_repo.url,
        engines=[docker_engine],
        admins=[admin_user],
        members=[member_user],
        webhook_secret="s3cret-webhook",
    )


@pytest.fixture
def git_repo(tmp_path) -> GitRepo:
    return GitRepo(tmp_path)


@pytest.fixture
def project(db, admin_user, member_user, local_engine, git_repo):
    from projects.services import create_project

    return create_project(
        name="Vision",
        slug="vision",
        repo_clone_url=git_repo.url,
        repo_web_url="https://github.com/acme/vision",
        engines=[local_engine],
        default_engine=local_engine,
        admins=[admin_user],
        members=[member_user],
        webhook_secret="s3cret-webhook",
    )


# --- Docker -------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def docker_client():
    try:
        import docker

        client = docker.from_env(timeout=120)
        client.ping()
    except Exception as exc:  # no socket, no daemon, no permission
        unavailable(f"no Docker Engine reachable: {exc}")
    ensure_test_image(client)
    return client


# --- Django admin ----------------------------------------------------------------------------
# --- Celery -------------------------------------------------------------------------------
@pytest.fixture
def celery_worker_thread(transactional_db):
    """A real Celery worker in this process (threads pool, in-memory broker): the pipeline runs
    concurrently with the test, as it would in production. It consumes both queues (pipeline
    and watch), as a worker started without -Q does."""
    from celery.contrib.testing.worker import start_worker
    from celery.worker import state
    from django.conf import settings

    from aichor.celery import app

    queues = [queue.name for queue in settings.CELERY_TASK_QUEUES]
    with start_worker(app, pool="threads", concurrency=4, perform_ping_check=False, shutdown_timeout=30, queues=queues):
        yield
        # Let tasks under way finish while the test database is still open: the thread pool
        # does not wait for them at shutdown, and a chained pipeline (clone → build → submit)
        # can still be running when the test's own condition is met.
        deadline = time.monotonic() + 10
        while (state.active_requests or state.reserved_requests) and time.monotonic() < deadline:
            time.sleep(0.05)


@pytest.fixture(scope="session", autouse=True)
def close_shared_sync_thread_connections(django_db_setup):
    """Webhook views and Channels' database_sync_to_async run on asgiref's one shared sync
    thread, whose connection persists (CONN_MAX_AGE): closed before the test database is
    dropped, or PostgreSQL refuses to drop it."""
    yield
    from asgiref.sync import SyncToAsync
    from django.db import connections

    SyncToAsync.single_thread_executor.submit(connections.close_all).result(timeout=10)
    # Webhook deliveries through aichor.asgi run on its own thread pool, one connection each.
    from aichor.asgi import close_webhook_connections

    close_webhook_connections()


# --- A live server ------------------------------------------------------------------------
@pytest.fixture(scope="session")
def asgi_server_url():
    """The real ASGI application served over HTTP and WebSockets by uvicorn, as scripts/run.sh
    serves it (httptools, the websockets library), in a thread of the test process so that it
    shares the test database and the in-memory Celery broker. Users need a transactional DB."""
    import threading

    import uvicorn

    from aichor.asgi import application

    config = uvicorn.Config(
        application,
        host="127.0.0.1",
        port=0,
        http="httptools",
        ws="websockets-sansio",
        lifespan="off",
        log_level="warning",
    )
    server = uvicorn.Server(config)
    # Not in the main thread, uvicorn installs no signal handlers.
    thread = threading.Thread(target=server.run, name="uvicorn-live-server", daemon=True)
    thread.start()
    wait_for(lambda: server.started, timeout=20, message="uvicorn to listen")
    host, port = server.servers[0].sockets[0].getsockname()[:2]
    LIVE_SERVERS.append((server, server.servers[0].get_loop()))
    yield f"http://{host}:{port}"
    LIVE_SERVERS.remove((server, server.servers[0].get_loop()))
    server.should_exit = True
    thread.join(10)
