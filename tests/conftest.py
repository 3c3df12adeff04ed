"""Shared fixtures: personas (admin, member, outsider), projects, a real Git repository, a
real Docker Engine with a tiny local image, and an in-process Celery worker."""

import hashlib
import hmac
import json
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest

CI = os.environ.get("CI", "").lower() == "true"
TEST_IMAGE = "aichor-test/busybox:latest"


def unavailable(reason: str) -> None:
    """Skip on a laptop without the component; with CI=true a missing component fails."""
    if CI:
        pytest.fail(f"CI=true but {reason}")
    pytest.skip(reason)


def wait_for(predicate, timeout: float = 60, interval: float = 0.1, message: str = "condition"):
    """Poll a condition the system under test must reach (not a sleep: returns as soon as true)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {message}")


def pytest_configure(config):
    from django.conf import settings

    # Each run gets its own scratch folders (work dirs, local engine, buckets).
    data = Path(tempfile.mkdtemp(prefix="aichor-test-"))
    settings.WORK_DIR = data / "work"
    settings.LOCAL_ENGINE_DIR = data / "local-engine"
    settings.BUCKETS_ROOT = data / "buckets"
    settings.MEDIA_ROOT = data / "media"
    settings.WATCH_POLL_SECONDS = 0.1
    # The `project` fixture runs on the local engine (AICHOR_LOCAL_ENGINE, off by default).
    settings.LOCAL_ENGINE = True
    # Test repositories are file:// URLs; the environment carries it to worker subprocesses.
    settings.ALLOW_LOCAL_REPOS = True
    os.environ["AICHOR_ALLOW_LOCAL_REPOS"] = "true"
    # Worker threads must not keep connections open past a test: the test database is
    # flushed or dropped behind them.
    settings.DATABASES["default"]["CONN_MAX_AGE"] = 0
    if settings.DATABASES["default"]["ENGINE"].endswith("sqlite3"):
        # A file, not SQLite's shared in-memory database: worker threads would hit table
        # locks there; a file with WAL and a busy timeout behaves like production.
        settings.DATABASES["default"].setdefault("TEST", {})["NAME"] = str(data / "test.sqlite3")


def pytest_collection_modifyitems(config, items):
    # Browser tests last: Playwright's sync API keeps an asyncio loop running in the main thread
    # for the rest of the session, and async tests (channels' communicators) cannot run after it.
    items.sort(key=lambda item: item.nodeid.startswith("tests/browser/"))


@pytest.fixture(scope="session", autouse=True)
def _celery_memory_broker():
    from aichor.celery import app

    # Tests never touch the embedded filesystem broker; a test wanting a worker starts one.
    app.conf.broker_url = "memory://"
    app.conf.broker_transport_options = {}
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
    from experiments import services

    # A fresh outage record: the error is logged on the first refusal of this test.
    monkeypatch.setattr(services, "_broker_outage", services._BrokerOutage())
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


class GitRepo:
    """A bare repository reachable by file:// and a working copy to commit into."""

    def __init__(self, root: Path) -> None:
        self.bare = root / "origin.git"
        self.work = root / "work"
        self._git("init", "-q", "--bare", "-b", "main", str(self.bare), cwd=root)
        self._git("clone", "-q", str(self.bare), str(self.work), cwd=root)
        self._git("config", "user.email", "researcher@example.com")
        self._git("config", "user.name", "Researcher")
        self._git("checkout", "-q", "-b", "main")

    @property
    def url(self) -> str:
        return f"file://{self.bare}"

    def _git(self, *args, cwd=None) -> str:
        return subprocess.run(
            ["git", *args], cwd=cwd or self.work, check=True, capture_output=True, text=True
        ).stdout.strip()

    def commit(self, files: dict[str, str], message: str, branch: str = "main") -> str:
        for name, content in files.items():
            path = self.work / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(content)
        self._git("add", "-A")
        self._git("commit", "-q", "--allow-empty", "-m", message)
        self._git("push", "-q", "origin", f"HEAD:{branch}")
        return self._git("rev-parse", "HEAD")


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


def manifest_yaml(
    command: str, *, operator: str = "batch", types: str | None = None, extra_spec: str = "", builder_extra: str = ""
) -> str:
    types = types or "    worker:\n      count: 1\n      resources:\n        cpus: 1\n        ramRatio: 1\n"
    return (
        "kind: AIchorManifest\napiVersion: 0.2.3\n"
        f"builder:\n  image: demo\n  dockerfile: ./Dockerfile\n  context: .\n{builder_extra}"
        f"spec:\n  operator: {operator}\n  image: demo\n  command: {json.dumps(command)}\n{extra_spec}"
        f"  types:\n{types}"
    )


def github_push(
    client,
    project,
    *,
    sha: str,
    message: str,
    delivery: str | None = None,
    secret: str = "s3cret-webhook",
    branch: str = "main",
):
    body = json.dumps(
        {
            "ref": f"refs/heads/{branch}",
            "after": sha,
            "head_commit": {
                "id": sha,
                "message": message,
                "author": {"email": "researcher@example.com", "username": "researcher"},
            },
            "repository": {"clone_url": project.repo_clone_url},
        }
    ).encode()
    return post_github(client, project, body, delivery=delivery, secret=secret)


def github_signature(body: bytes, secret: str = "s3cret-webhook") -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def post_github(client, project, body: bytes, *, event: str = "push", delivery=None, secret="s3cret-webhook"):
    """`body` as GitHub delivers it, signed with the project's webhook secret."""
    return client.post(
        f"/webhooks/github/{project.slug}/",
        data=body,
        content_type="application/json",
        headers={
            "X-GitHub-Event": event,
            "X-GitHub-Delivery": delivery or str(uuid.uuid4()),
            "X-Hub-Signature-256": github_signature(body, secret),
        },
    )


DOCKERFILE = f"FROM {TEST_IMAGE}\nWORKDIR /app\nCOPY . /app\n"


def push(client, project, git_repo, command: str, *, dockerfile: str = DOCKERFILE, **manifest_kwargs) -> str:
    """Commit a manifest running `command` and deliver the signed push; the experiment's id."""
    message = "aichor[train.yaml]: docker run"
    files = {"aichor_manifests/train.yaml": manifest_yaml(command, **manifest_kwargs), "Dockerfile": dockerfile}
    # Fresh content per test: identical code would (rightly) reuse an image built earlier.
    files["nonce.txt"] = uuid.uuid4().hex
    sha = git_repo.commit(files, message)
    response = github_push(client, project, sha=sha, message=message)
    assert response.status_code == 201, response.content
    return response.json()["experiment"]


def ended(experiment_id, timeout: float = 120):
    """The experiment once it is Succeeded, Failed or Cancelled."""
    from experiments.models import Experiment, Status

    return wait_for(
        lambda: Experiment.objects.filter(
            pk=experiment_id, status__in=[Status.SUCCEEDED, Status.FAILED, Status.CANCELLED]
        ).first(),
        timeout=timeout,
        message="the experiment to end",
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


def ensure_test_image(client) -> None:
    """A busybox image made locally: no registry is reachable."""
    from docker.errors import ImageNotFound

    try:
        client.images.get(TEST_IMAGE)
        return
    except ImageNotFound:
        pass
    busybox = shutil.which("busybox")
    if not busybox:
        unavailable("busybox-static is not installed (apt-get install busybox-static)")
    with tempfile.TemporaryDirectory() as root:
        bin_dir = Path(root, "bin")
        bin_dir.mkdir()
        shutil.copy(busybox, bin_dir / "busybox")
        applets = subprocess.run([busybox, "--list"], check=True, capture_output=True, text=True).stdout.split()
        for applet in applets:
            if applet != "busybox":
                (bin_dir / applet).symlink_to("busybox")  # relative: valid inside the image
        for d in ("tmp", "etc", "root", "proc", "sys", "dev"):
            Path(root, d).mkdir(exist_ok=True)
        Path(root, "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
        tar = subprocess.run(["tar", "-C", root, "-c", "."], check=True, capture_output=True).stdout
        subprocess.run(["docker", "import", "-", TEST_IMAGE], input=tar, check=True, capture_output=True)


def containers_of(client, experiment_id) -> list:
    # The low-level list: the high-level one inspects each container and fails on one removed
    # between listing and inspection.
    return client.api.containers(all=True, filters={"label": f"aichor.experiment={experiment_id}"})


# --- Django admin ----------------------------------------------------------------------------
def project_change_form(project, *, new_member: str | None = None, **fields) -> dict:
    """The admin's project change form as its page posts it: the project's fields (`fields`
    override them), every membership row by e-mail, and one new member row when asked."""
    memberships = list(project.memberships.select_related("user").order_by("pk"))
    rows = len(memberships) + (1 if new_member else 0)
    data = {
        "name": project.name,
        "repo_clone_url": project.repo_clone_url,
        "repo_web_url": project.repo_web_url,
        "engines": [project.default_engine_id],
        "default_engine": project.default_engine_id,
        "memberships-TOTAL_FORMS": str(rows),
        "memberships-INITIAL_FORMS": str(len(memberships)),
        "memberships-MIN_NUM_FORMS": "0",
        "memberships-MAX_NUM_FORMS": "1000",
        **fields,
    }
    for i, m in enumerate(memberships):
        data |= {
            f"memberships-{i}-id": m.pk,
            f"memberships-{i}-project": project.pk,
            f"memberships-{i}-email": m.user.email,
            f"memberships-{i}-role": m.role,
        }
    if new_member:
        n = len(memberships)
        data |= {
            f"memberships-{n}-project": project.pk,
            f"memberships-{n}-email": new_member,
            f"memberships-{n}-role": "member",
        }
    return data


# --- Celery -------------------------------------------------------------------------------
@pytest.fixture
def celery_worker_thread(transactional_db):
    """A real Celery worker in this process (threads pool, in-memory broker): the pipeline runs
    concurrently with the test, as it would in production."""
    from celery.contrib.testing.worker import start_worker
    from celery.worker import state

    from aichor.celery import app

    with start_worker(app, pool="threads", concurrency=4, perform_ping_check=False, shutdown_timeout=30):
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
    yield f"http://{host}:{port}"
    server.should_exit = True
    thread.join(10)
