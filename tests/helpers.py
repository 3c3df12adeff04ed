"""Helpers shared by the tests (not fixtures): waiting, personas' requests, manifests, Git
pushes, the local Docker test image. Import them from here; conftest.py holds only fixtures."""

import fcntl
import hashlib
import hmac
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pytest
from kombu.transport import memory

CI = os.environ.get("CI", "").lower() == "true"
TEST_IMAGE = "aichor-test/busybox:latest"


def unavailable(reason: str) -> None:
    """Skip on a laptop without the component; with CI=true a missing component fails."""
    if CI:
        pytest.fail(f"CI=true but {reason}")
    pytest.skip(reason)


class PromptMemoryTransport(memory.Transport):
    """kombu's in-memory broker, except that a consumer's wait for a message lasts 0.1 s at most
    instead of the worker loop's fixed 2 s: a stopping Celery worker notices the stop only
    between two waits and then waits once more, which cost every worker test 4 s."""

    def drain_events(self, connection, timeout: float | None = None) -> None:
        return super().drain_events(connection, timeout=None if timeout is None else min(timeout, 0.1))


def wait_for(predicate, timeout: float = 60, interval: float = 0.1, message: str = "condition"):
    """Poll a condition the system under test must reach (not a sleep: returns as soon as true)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {message}")


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


# Read before conftest gives each xdist worker its own TMPDIR: one lock for all workers.
_IMAGE_LOCK = Path(tempfile.gettempdir()) / "aichor-test-image.lock"


def ensure_test_image(client) -> None:
    """A busybox image made locally: no registry is reachable. Parallel workers make it once."""
    with _IMAGE_LOCK.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        _make_test_image(client)


def _make_test_image(client) -> None:
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


# --- Docker events ----------------------------------------------------------------------------
class ContainerEvents:
    """When each experiment's process container started and exited, as the daemon saw it: the
    stop task removes a container right after its experiment ends, so inspecting it later races."""

    def __init__(self, client) -> None:
        self.started: dict[str, float] = {}
        self.exited: dict[str, float] = {}
        # `since`: events between the subscription's request and its first read are replayed.
        self._stream = client.events(
            since=int(time.time()) - 1,
            decode=True,
            filters={"type": "container", "label": "aichor.experiment", "event": ["start", "die"]},
        )
        self._thread = threading.Thread(target=self._read, name="docker-events", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for event in self._stream:
                attributes = event.get("Actor", {}).get("Attributes", {})
                experiment_id = attributes.get("aichor.experiment")
                if not experiment_id or "aichor.netns" in attributes:
                    continue
                seen = self.started if event.get("Action") == "start" else self.exited
                seen.setdefault(experiment_id, event["timeNano"] / 1e9)
        except Exception:  # the stream closed under the reader: the test is over
            pass

    def close(self) -> None:
        self._stream.close()
        self._thread.join(5)


# The uvicorn servers of this test process (tests/conftest.py's asgi_server_url), with their loops.
LIVE_SERVERS: list = []


def settle_live_server() -> None:
    """Wait until the live server is done with the test that ends: parked terminal shells closed
    (their events written) and no request or WebSocket handler still running. A handler that
    writes while the test database is flushed deadlocks with the flush's TRUNCATE."""
    import asyncio

    from experiments.terminal import close_parked_sessions

    async def settle(server) -> None:
        await close_parked_sessions()
        deadline = time.monotonic() + 10
        while server.server_state.tasks and time.monotonic() < deadline:
            await asyncio.sleep(0.02)

    for server, loop in LIVE_SERVERS:
        asyncio.run_coroutine_threadsafe(settle(server), loop).result(timeout=30)
