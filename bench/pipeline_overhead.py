"""Pipeline overhead and a webhook burst, against the production setup: scripts/run.sh's web server
(uvicorn, one process per core, httptools) and a Celery worker, on PostgreSQL and Redis.

1. Push → container started, against a bare `docker run` of the same cached image, rounds
   alternated. Both sides end at the same event: the container's `start` in the Docker events
   stream (its daemon timestamp), measured from the moment the push is delivered or `docker run`
   is called. Target (issue 2): median ratio ≤ 1.5.
2. A burst (issue 16): 5 000 signed GitHub push deliveries (GitHub's payload shape, distinct
   X-GitHub-Delivery ids), 50 in flight, each on a connection of its own as GitHub sends them;
   250 of them are delivered a second time while the first is in flight (half a redelivery of the
   same body, half the same id with another body). Targets: p99 ≤ 250 ms, ≥ 200 deliveries/s
   accepted, 0 lost and 0 duplicated: afterwards, in the database, every delivery id has exactly
   one experiment and there is no other. No pipeline worker runs then, so 5 000 clones do not
   swamp the machine; the rows and their queued tasks are deleted afterwards.

BENCH_PIPELINE_PARTS=burst (or =pipeline) runs one part only; both by default."""

import asyncio
import hashlib
import hmac
import json
import os
import random
import statistics
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench._common import (  # noqa: E402
    BIN,
    Processes,
    descendants,
    exit_status,
    figure,
    free_port,
    percentile,
    scratch_dir,
    setup_django,
)

RUNS = 10
DELIVERIES = 5000
REDELIVERED = 250
CONCURRENCY = 50
SECRET = "bench"
CORES = len(os.sched_getaffinity(0))
PARTS = os.environ.get("BENCH_PIPELINE_PARTS", "pipeline,burst").split(",")


class StartEvents:
    """The Docker events stream's container `start` events, read in a thread from before the first
    round: the daemon's time of each start, by the container's labels."""

    def __init__(self) -> None:
        import docker

        self._client = docker.from_env()
        self._stream = self._client.events(decode=True, filters={"type": "container", "event": "start"})
        self._seen: list[tuple[dict, float]] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        try:
            for event in self._stream:
                with self._lock:
                    self._seen.append((event.get("Actor", {}).get("Attributes", {}), event["timeNano"] / 1e9))
        except Exception:  # closed at the end of the run
            pass

    def started(self, label: str, value: str, timeout: float = 120) -> float:
        deadline = time.time() + timeout
        while time.time() < deadline:
            with self._lock:
                for attributes, at in self._seen:
                    if attributes.get(label) == value:
                        return at
            time.sleep(0.005)
        raise RuntimeError(f"no container start event with {label}={value}")

    def close(self) -> None:
        self._stream.close()
        self._client.close()


def server(procs: Processes) -> str:
    """The web server as scripts/run.sh starts it on PostgreSQL: AICHOR_WEB_WORKERS defaults to
    the core count there."""
    import requests

    port = free_port()
    procs.start(
        str(BIN / "uvicorn"),
        "aichor.asgi:application",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        str(CORES),
        "--http",
        "httptools",
        "--ws",
        "websockets-sansio",
        "--lifespan",
        "on",
        "--loop",
        "aichor.asgi:ServerLoop",
        "--log-level",
        "warning",
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            requests.get(url + "/webhooks/github/none/", timeout=5)
            return url
        # The socket is bound before the worker processes have loaded the application.
        except (requests.ConnectionError, requests.Timeout):
            time.sleep(0.1)
    raise RuntimeError("uvicorn did not start")


def github_push(sha: str, before: str, message: str, clone_url: str) -> bytes:
    """A push event as GitHub sends it (https://docs.github.com/webhooks/webhook-events-and-payloads#push)."""
    user = {
        "name": "researcher",
        "email": "researcher@example.com",
        "login": "researcher",
        "id": 583231,
        "node_id": "MDQ6VXNlcjU4MzIzMQ==",
        "avatar_url": "https://avatars.githubusercontent.com/u/583231?v=4",
        "gravatar_id": "",
        "type": "User",
        "site_admin": False,
        **{
            f"{kind}_url": f"https://api.github.com/users/researcher/{kind}"
            for kind in ("followers", "following", "gists", "starred", "subscriptions", "organizations", "repos")
        },
    }
    api = "https://api.github.com/repos/acme/bench"
    repository = {
        "id": 702184733,
        "node_id": "R_kgDOKdqJHQ",
        "name": "bench",
        "full_name": "acme/bench",
        "private": True,
        "owner": user,
        "html_url": "https://github.com/acme/bench",
        "description": "training code",
        "fork": False,
        "url": "https://github.com/acme/bench",
        **{
            f"{kind}_url": f"{api}/{kind}"
            for kind in (
                "forks keys collaborators teams hooks issue_events events assignees branches tags blobs git_tags "
                "git_refs trees statuses languages stargazers contributors subscribers subscription commits "
                "git_commits comments issue_comment contents compare merges archive downloads issues pulls "
                "milestones notifications labels releases deployments"
            ).split()
        },
        "created_at": 1696300000,
        "updated_at": "2026-12-01T10:00:00Z",
        "pushed_at": int(time.time()),
        "git_url": "git://github.com/acme/bench.git",
        "ssh_url": "git@github.com:acme/bench.git",
        "clone_url": clone_url,
        "svn_url": "https://github.com/acme/bench",
        "homepage": None,
        "size": 2048,
        "stargazers_count": 0,
        "watchers_count": 0,
        "language": "Python",
        "has_issues": True,
        "has_projects": True,
        "has_downloads": True,
        "has_wiki": False,
        "has_pages": False,
        "forks_count": 0,
        "archived": False,
        "disabled": False,
        "open_issues_count": 3,
        "license": None,
        "topics": [],
        "visibility": "private",
        "default_branch": "main",
        "master_branch": "main",
    }
    commit = {
        "id": sha,
        "tree_id": hashlib.sha1(sha.encode()).hexdigest(),
        "distinct": True,
        "message": message,
        "timestamp": "2026-12-01T10:00:00+00:00",
        "url": f"https://github.com/acme/bench/commit/{sha}",
        "author": {"name": "Researcher", "email": "researcher@example.com", "username": "researcher"},
        "committer": {"name": "Researcher", "email": "researcher@example.com", "username": "researcher"},
        "added": [],
        "removed": [],
        "modified": ["aichor_manifests/train.yaml", "train.py"],
    }
    payload = {
        "ref": "refs/heads/main",
        "before": before,
        "after": sha,
        "repository": repository,
        "pusher": {"name": "researcher", "email": "researcher@example.com"},
        "sender": user,
        "created": False,
        "deleted": False,
        "forced": False,
        "base_ref": None,
        "compare": f"https://github.com/acme/bench/compare/{before[:12]}...{sha[:12]}",
        "commits": [commit],
        "head_commit": commit,
    }
    return json.dumps(payload).encode()


def request(path: str, body: bytes, delivery_id: str) -> bytes:
    signature = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: GitHub-Hookshot/bench\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nX-GitHub-Event: push\r\n"
        f"X-GitHub-Delivery: {delivery_id}\r\nX-Hub-Signature-256: {signature}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


async def burst(port: int, requests: list[bytes]) -> tuple[list[float], list[int], float]:
    """Send every request, CONCURRENCY at a time, each on a new connection (as GitHub does); the
    latency of each (connect to the whole answer, in ms), its status, and the wall time."""
    latencies: list[float] = [0.0] * len(requests)
    statuses: list[int] = [0] * len(requests)
    pending = iter(range(len(requests)))

    async def sender() -> None:
        for i in pending:
            t0 = time.perf_counter()
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(requests[i])
                answer = await asyncio.wait_for(reader.read(), timeout=30)  # the server closes
                writer.close()
                statuses[i] = int(answer.split(b" ", 2)[1])
            except (TimeoutError, OSError, IndexError, ValueError):
                statuses[i] = -1
            latencies[i] = (time.perf_counter() - t0) * 1000

    started = time.perf_counter()
    await asyncio.gather(*(sender() for _ in range(CONCURRENCY)))
    return latencies, statuses, time.perf_counter() - started


def cpu_seconds(pids: list[int]) -> float:
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / ticks  # utime + stime
    return total


def main() -> None:
    env = setup_django("aichor_bench_pipeline")
    import docker
    import redis
    import requests
    from django.conf import settings

    from experiments.models import Experiment, Step, WebhookDelivery
    from projects.models import Engine
    from projects.services import create_project
    from tests.helpers import TEST_IMAGE, GitRepo, ensure_test_image, manifest_yaml

    client = docker.from_env()
    ensure_test_image(client)
    repo = GitRepo(scratch_dir("aichor-bench-repo-"))
    # No bridge network on the bench host (dockerd --bridge=none): the experiment's own namespace.
    engine, _ = Engine.objects.update_or_create(
        name="bench-docker", defaults={"kind": "docker", "config": {"network": "none"}}
    )
    project = create_project(
        name="Bench", slug="bench", repo_clone_url=repo.url, engines=[engine], webhook_secret=SECRET
    )
    files = {
        "aichor_manifests/train.yaml": manifest_yaml("sleep 2"),
        "Dockerfile": f"FROM {TEST_IMAGE}\nCOPY . /app\n",
    }

    procs = Processes(env)
    worker = procs.worker() if "pipeline" in PARTS else None
    url = server(procs)
    port = int(url.rsplit(":", 1)[1])
    web_pids = [procs.children[-1].pid]
    session = requests.Session()

    def deliver(sha: str, message: str) -> requests.Response:
        body = github_push(sha, "0" * 39 + "1", message, repo.url)
        headers = {
            "X-GitHub-Event": "push",
            "X-GitHub-Delivery": str(uuid.uuid4()),
            "X-Hub-Signature-256": "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest(),
            "Content-Type": "application/json",
        }
        return session.post(f"{url}/webhooks/github/bench/", data=body, headers=headers, timeout=10)

    def wait_done(experiment_id: str) -> None:
        deadline = time.time() + 120
        while not Experiment.objects.filter(pk=experiment_id, status__in=["Succeeded", "Failed", "Cancelled"]).exists():
            if time.time() > deadline:
                raise RuntimeError(f"{experiment_id} did not finish")
            time.sleep(0.05)
        experiment = Experiment.objects.get(pk=experiment_id)
        if experiment.status != "Succeeded":
            raise RuntimeError(f"{experiment_id} ended {experiment.status}: {experiment.failure_reason}")

    def pipeline_round(label: str) -> float:
        sha = repo.commit(files, f"aichor[train.yaml]: {label}")
        t0 = time.time()
        response = deliver(sha, f"aichor[train.yaml]: {label}")
        experiment_id = response.json()["experiment"]
        started = events.started("aichor.experiment", experiment_id) - t0
        wait_done(experiment_id)
        return started

    def bare_round(i: int) -> float:
        marker = f"{os.getpid()}-{i}"
        t0 = time.time()
        subprocess.run(
            [
                "docker",
                "run",
                "--rm",
                "--network",
                "none",
                "--label",
                f"aichor-bench-bare={marker}",
                TEST_IMAGE,
                "true",
            ],
            check=True,
            capture_output=True,
        )
        return events.started("aichor-bench-bare", marker) - t0

    print(f"pipeline_overhead ({CORES} cores, {CORES} web server processes)")
    figure("cores", f"{CORES}")
    if "pipeline" in PARTS:
        events = StartEvents()
        # Warm-up: the first push builds the image; later ones hit the cache, as a bare run does.
        pipeline_round("warm-up")
        bare_round(-1)
        pipeline, bare = [], []
        for i in range(RUNS):
            bare.append(bare_round(i))
            pipeline.append(pipeline_round(f"run {i}"))
        events.close()
        steps: dict[str, list[float]] = {}
        for step in Step.objects.filter(
            experiment__project=project,
            experiment__message__startswith="aichor[train.yaml]: run",
            ended_at__isnull=False,
        ):
            steps.setdefault(step.name, []).append((step.ended_at - step.started_at).total_seconds() * 1000)
        procs.stop(worker)
        # The images the pipeline built and tagged for each run.
        for image in set(Experiment.objects.filter(project=project).exclude(image="").values_list("image", flat=True)):
            try:
                client.images.remove(image)
            except docker.errors.APIError:
                pass
        p_med, b_med = statistics.median(pipeline), statistics.median(bare)
        figure("bare `docker run` -> start event, median", f"{b_med * 1000:.0f} ms")
        figure("webhook POST -> container start event, median", f"{p_med * 1000:.0f} ms")
        figure("push -> started, ratio to bare docker run", f"{p_med / b_med:.2f}", "<= 1.5", p_med / b_med <= 1.5)
        for name, values in steps.items():
            figure(f"step {name}, median", f"{statistics.median(values):.0f} ms")
    if "burst" not in PARTS:
        procs.stop_all()
        return

    # The burst: no worker consumes, so the 5 000 experiments wait in the queue.
    rng = random.Random(16)
    path = "/webhooks/github/bench/"
    ids = [str(uuid.uuid4()) for _ in range(DELIVERIES)]
    bodies = []
    before = "0" * 39 + "1"
    for i in range(DELIVERIES):
        sha = f"{rng.getrandbits(160):040x}"
        bodies.append(github_push(sha, before, f"aichor[train.yaml]: burst {i}", repo.url))
        before = sha
    again = set(rng.sample(range(DELIVERIES), REDELIVERED))
    plan: list[bytes] = []
    for i in range(DELIVERIES):
        plan.append(request(path, bodies[i], ids[i]))
        if i in again:
            # Right behind the original, so both are in flight at once (most likely in two server
            # processes): GitHub's redelivery is the same body; the other half reuses the id only.
            body = bodies[i] if i % 2 else bodies[i].replace(b'"forced": false', b'"forced": false ')
            plan.append(request(path, body, ids[i]))

    def database_pids() -> list[int]:
        from django.db import connection

        with connection.cursor() as cursor:
            cursor.execute("SELECT pid FROM pg_stat_activity WHERE datname = current_database()")
            return [pid for (pid,) in cursor.fetchall()]

    cpu_before = cpu_seconds([*web_pids, *descendants(web_pids[0])])
    database_before = {pid: cpu_seconds([pid]) for pid in database_pids()}
    bench_cpu_before = time.process_time()
    latencies, statuses, wall = asyncio.run(burst(port, plan))
    server_cpu = cpu_seconds([*web_pids, *descendants(web_pids[0])]) - cpu_before
    database_cpu = sum(cpu_seconds([pid]) - database_before.get(pid, 0.0) for pid in database_pids())
    bench_cpu = time.process_time() - bench_cpu_before
    load = os.getloadavg()[0]

    accepted = statuses.count(201)
    with_experiment = set(
        WebhookDelivery.objects.filter(project=project, delivery_id__in=ids, experiment__isnull=False).values_list(
            "delivery_id", flat=True
        )
    )
    experiments = Experiment.objects.filter(project=project, message__startswith="aichor[train.yaml]: burst").count()
    lost = DELIVERIES - len(with_experiment)
    duplicated = experiments - len(with_experiment)
    # The burst's rows and queued clone tasks go: nothing may start them after this run.
    Experiment.objects.filter(project=project).delete()
    WebhookDelivery.objects.filter(project=project).delete()
    broker = redis.Redis.from_url(env["REDIS_URL"])
    broker.delete(*[queue.name for queue in settings.CELERY_TASK_QUEUES])
    procs.stop_all()

    figure(
        f"burst: {len(plan)} deliveries at {CONCURRENCY} in flight, p50",
        f"{percentile(latencies, 50):.0f} ms",
    )
    p99 = percentile(latencies, 99)
    figure(f"burst: {len(plan)} deliveries at {CONCURRENCY} in flight, p99", f"{p99:.0f} ms", "<= 250 ms", p99 <= 250)
    figure(
        "burst: deliveries accepted (201) per second", f"{accepted / wall:.0f} /s", ">= 200 /s", accepted / wall >= 200
    )
    failed = sum(1 for s in statuses if s not in (200, 201))
    figure("burst: deliveries answered with an error, or not at all", f"{failed}", "0", failed == 0)
    figure("burst: delivery ids without an experiment (lost)", f"{lost}", "0", lost == 0)
    figure("burst: experiments beyond one per delivery id (duplicated)", f"{duplicated}", "0", duplicated == 0)
    figure("burst: web server CPU per delivery", f"{server_cpu / len(plan) * 1000:.2f} ms")
    figure("burst: PostgreSQL CPU per delivery", f"{database_cpu / len(plan) * 1000:.2f} ms")
    figure("burst: bench client CPU per delivery", f"{bench_cpu / len(plan) * 1000:.2f} ms")
    # What the cores could accept at this CPU cost, were they all the server's and PostgreSQL's.
    per_delivery = (server_cpu + database_cpu) / len(plan)
    figure("burst: deliveries/s the cores allow at that CPU cost", f"{CORES / per_delivery:.0f} /s")
    figure("burst: load average (1 min) after", f"{load:.1f}")


if __name__ == "__main__":
    main()
    sys.exit(exit_status())
