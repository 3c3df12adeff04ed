"""End to end through real processes: uvicorn serves the webhook, a Celery worker process on the
Redis broker runs the pipeline, and a worker killed mid-Running is repaired by reconcile."""

import os
import signal
import socket
import subprocess
import sys
import uuid

import pytest
import redis
import requests
from django.db import connection

from experiments import logs
from experiments.models import Experiment, Status, StepName
from tests.helpers import TEST_IMAGE, containers_of, github_signature, manifest_yaml, unavailable, wait_for

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.docker]

REDIS_URL = os.environ.get("AICHOR_TEST_REDIS_URL", "redis://127.0.0.1:6379/14")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def process_env(tmp_path, transactional_db):
    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2).flushdb()
    except redis.RedisError as exc:
        unavailable(f"no Redis at {REDIS_URL}: {exc}")
    db = connection.settings_dict
    if db["ENGINE"].endswith("sqlite3"):
        database_url = f"sqlite:///{db['NAME']}"
    else:
        database_url = (
            f"postgres://{db['USER'] or 'postgres'}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/{db['NAME']}"
        )
    from django.conf import settings

    env = {
        **os.environ,
        "DATABASE_URL": database_url,
        "REDIS_URL": REDIS_URL,
        "AICHOR_DATA_DIR": str(tmp_path / "data"),
        "AICHOR_WORK_DIR": str(settings.WORK_DIR),
        "AICHOR_BUCKETS_ROOT": str(settings.BUCKETS_ROOT),
        "AICHOR_SECRET_KEY": settings.SECRET_KEY,  # the webhook secret is encrypted with it
        "AICHOR_WATCH_POLL_SECONDS": "0.1",
        "AICHOR_RECONCILE_SECONDS": "1",
        "AICHOR_RECONCILE_STALE_SECONDS": "2",
        "PYTHONUNBUFFERED": "1",
    }
    children: list[subprocess.Popen] = []

    def start(*args: str) -> subprocess.Popen:
        log = open(tmp_path / f"{args[0]}-{len(children)}.log", "w")
        child = subprocess.Popen(
            [*args], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        children.append(child)
        return child

    yield start
    for child in children:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()


def start_worker(start, *extra: str) -> subprocess.Popen:
    celery = os.path.join(os.path.dirname(sys.executable), "celery")
    return start(
        celery,
        "-A",
        "aichor",
        "worker",
        "--pool=threads",
        "--concurrency=2",
        "--without-mingle",
        "--without-gossip",
        "--loglevel=INFO",
        *extra,
    )


def start_server(start) -> str:
    port = free_port()
    uvicorn = os.path.join(os.path.dirname(sys.executable), "uvicorn")
    start(uvicorn, "aichor.asgi:application", "--host", "127.0.0.1", "--port", str(port), "--ws", "websockets-sansio")
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return requests.get(url + "/webhooks/github/none/", timeout=5).status_code == 405
        except (requests.ConnectionError, requests.Timeout):  # a loaded machine answers its first request late
            return False

    wait_for(up, timeout=30, message="uvicorn to listen")
    return url


def signed_push(url: str, project, sha: str, message: str) -> requests.Response:
    import json

    body = json.dumps(
        {"ref": "refs/heads/main", "head_commit": {"id": sha, "message": message, "author": {"username": "r"}}}
    ).encode()
    signature = github_signature(body)
    headers = {
        "X-GitHub-Event": "push",
        "X-GitHub-Delivery": str(uuid.uuid4()),
        "X-Hub-Signature-256": signature,
        "Content-Type": "application/json",
    }
    return requests.post(f"{url}/webhooks/github/{project.slug}/", data=body, headers=headers, timeout=10)


def commit(git_repo, command: str) -> tuple[str, str]:
    message = "aichor[train.yaml]: through real processes"
    files = {"aichor_manifests/train.yaml": manifest_yaml(command), "Dockerfile": f"FROM {TEST_IMAGE}\n"}
    return git_repo.commit(files, message), message


def test_webhook_through_uvicorn_and_redis_worker_succeeds(process_env, docker_project, git_repo, docker_client):
    start_worker(process_env)
    url = start_server(process_env)
    sha, message = commit(git_repo, "echo hello from $AICHOR_EXPERIMENT_ID")
    response = signed_push(url, docker_project, sha, message)
    assert response.status_code == 201, response.text
    experiment_id = response.json()["experiment"]
    experiment = wait_for(
        lambda: Experiment.objects.filter(pk=experiment_id, status__in=[Status.SUCCEEDED, Status.FAILED]).first(),
        timeout=120,
        message="the worker to finish the experiment",
    )
    assert experiment.status == Status.SUCCEEDED, experiment.failure_reason
    assert f"hello from {experiment_id}" in logs.log_text(experiment_id, "process:worker-0")


def test_worker_killed_while_running_is_repaired_by_reconcile(process_env, docker_project, git_repo, docker_client):
    worker = start_worker(process_env)
    url = start_server(process_env)
    sha, message = commit(git_repo, "echo begun; sleep 3; echo finished after the worker died")
    experiment_id = signed_push(url, docker_project, sha, message).json()["experiment"]
    wait_for(
        lambda: Experiment.objects.filter(pk=experiment_id, current_step=StepName.RUNNING).exists(),
        timeout=120,
        message="Running",
    )
    os.killpg(worker.pid, signal.SIGKILL)
    worker.wait()
    # The workload ends while no worker watches it.
    container = wait_for(lambda: containers_of(docker_client, experiment_id), message="the container")[0]
    docker_client.api.wait(container["Id"], timeout=60)
    assert Experiment.objects.get(pk=experiment_id).status == Status.PROCESSING
    start_worker(process_env, "--beat", f"--schedule=/tmp/aichor-beat-{uuid.uuid4().hex}")
    experiment = wait_for(
        lambda: Experiment.objects.filter(pk=experiment_id, status__in=[Status.SUCCEEDED, Status.FAILED]).first(),
        timeout=120,
        message="reconcile to finish the experiment",
    )
    assert experiment.status == Status.SUCCEEDED, experiment.failure_reason
    assert "finished after the worker died" in logs.log_text(experiment_id, "process:worker-0")
    assert experiment.events.filter(reason__startswith="reconcile resumed").exists()
    wait_for(lambda: containers_of(docker_client, experiment_id) == [], timeout=30, message="containers removed")
