"""Pipeline overhead: webhook POST → workload container started, against a bare `docker run`
of the same cached image in the same run; and webhook accept latency over 1 000 deliveries.
Targets (issue 2): ratio ≤ 1.5; accept p99 ≤ 25 ms."""

import hashlib
import hmac
import json
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench._common import Processes, percentile, setup_django  # noqa: E402

RUNS = 10
DELIVERIES = 1000


def main() -> None:
    env = setup_django("aichor_bench_pipeline")
    import docker
    import redis
    import requests

    from experiments.models import Experiment, Step
    from projects.models import Engine, Project
    from projects.services import create_project
    from tests.helpers import TEST_IMAGE, GitRepo, ensure_test_image, manifest_yaml

    client = docker.from_env()
    ensure_test_image(client)
    redis.Redis.from_url(env["REDIS_URL"]).flushdb()
    Experiment.objects.all().delete()
    Project.objects.filter(slug="bench").delete()
    repo = GitRepo(Path(tempfile.mkdtemp(prefix="aichor-bench-repo-")))
    # No bridge network on the bench host (dockerd --bridge=none): the experiment's own namespace.
    engine, _ = Engine.objects.update_or_create(
        name="bench-docker", defaults={"kind": "docker", "config": {"network": "none"}}
    )
    project = create_project(
        name="Bench", slug="bench", repo_clone_url=repo.url, engines=[engine], webhook_secret="bench"
    )
    files = {
        "aichor_manifests/train.yaml": manifest_yaml("sleep 2"),
        "Dockerfile": f"FROM {TEST_IMAGE}\nCOPY . /app\n",
    }

    procs = Processes(env)
    worker = procs.worker()
    url = procs.server()
    session = requests.Session()

    def deliver(sha: str, message: str) -> requests.Response:
        body = json.dumps({"ref": "refs/heads/main", "head_commit": {"id": sha, "message": message}}).encode()
        headers = {
            "X-GitHub-Event": "push",
            "X-GitHub-Delivery": str(uuid.uuid4()),
            "X-Hub-Signature-256": "sha256=" + hmac.new(b"bench", body, hashlib.sha256).hexdigest(),
            "Content-Type": "application/json",
        }
        return session.post(f"{url}/webhooks/github/bench/", data=body, headers=headers, timeout=10)

    def push(message: str) -> tuple[float, requests.Response]:
        sha = repo.commit(files, message)
        t0 = time.time()
        return t0, deliver(sha, message)

    def started_at(experiment_id: str) -> float:
        deadline = time.time() + 120
        while time.time() < deadline:
            found = client.api.containers(all=True, filters={"label": f"aichor.experiment={experiment_id}"})
            if found:
                try:
                    stamp = client.api.inspect_container(found[0]["Id"])["State"]["StartedAt"]
                except docker.errors.NotFound:
                    continue  # listed, then removed before inspection: look again
                if not stamp.startswith("0001"):
                    main_part, _, frac = stamp.rstrip("Z").partition(".")
                    return datetime.fromisoformat(main_part + "+00:00").timestamp() + float("0." + (frac or "0"))
            time.sleep(0.01)
        raise RuntimeError(f"no container for {experiment_id}")

    def wait_done(experiment_id: str) -> None:
        deadline = time.time() + 120
        while not Experiment.objects.filter(pk=experiment_id, status__in=["Succeeded", "Failed", "Cancelled"]).exists():
            if time.time() > deadline:
                raise RuntimeError(f"{experiment_id} did not finish")
            time.sleep(0.05)
        status = Experiment.objects.get(pk=experiment_id).status
        if status != "Succeeded":
            raise RuntimeError(
                f"{experiment_id} ended {status}: {Experiment.objects.get(pk=experiment_id).failure_reason}"
            )

    # Warm-up: the first push builds the image; later ones hit the cache like a bare run does.
    _, response = push("aichor[train.yaml]: warm-up")
    wait_done(response.json()["experiment"])

    pipeline = []
    for i in range(RUNS):
        t0, response = push(f"aichor[train.yaml]: run {i}")
        experiment_id = response.json()["experiment"]
        pipeline.append(started_at(experiment_id) - t0)
        wait_done(experiment_id)

    steps = {}
    for step in Step.objects.filter(
        experiment__project=project, experiment__message__startswith="aichor[train.yaml]: run", ended_at__isnull=False
    ):
        steps.setdefault(step.name, []).append((step.ended_at - step.started_at).total_seconds() * 1000)

    bare = []
    for _ in range(RUNS):
        t0 = time.time()
        subprocess.run(
            ["docker", "run", "--rm", "--network", "none", TEST_IMAGE, "true"], check=True, capture_output=True
        )
        bare.append(time.time() - t0)

    # Accept latency: no worker consumes, so only the endpoint's own work is measured.
    procs.stop(worker)
    latencies = []
    for i in range(DELIVERIES):
        t0 = time.perf_counter()
        r = deliver(f"{i:040x}", f"aichor[train.yaml]: latency {i}")
        latencies.append((time.perf_counter() - t0) * 1000)
        assert r.status_code == 201, r.text
    procs.stop_all()
    redis.Redis.from_url(env["REDIS_URL"]).flushdb()
    Experiment.objects.filter(project=project).delete()

    p_med, b_med = statistics.median(pipeline), statistics.median(bare)
    print("pipeline_overhead")
    print(
        f"  webhook POST -> container started: median {p_med * 1000:.0f} ms (min {min(pipeline) * 1000:.0f}, max {max(pipeline) * 1000:.0f}) over {RUNS} runs"
    )
    print(
        f"  bare `docker run --rm {TEST_IMAGE} true`: median {b_med * 1000:.0f} ms (min {min(bare) * 1000:.0f}, max {max(bare) * 1000:.0f})"
    )
    print(f"  ratio: {p_med / b_med:.2f}  (target <= 1.5)")
    print("  median step durations: " + ", ".join(f"{name} {statistics.median(v):.0f} ms" for name, v in steps.items()))
    print(
        f"  webhook accept latency over {DELIVERIES} deliveries: p50 {percentile(latencies, 50):.1f} ms, p99 {percentile(latencies, 99):.1f} ms  (target p99 <= 25 ms)"
    )


if __name__ == "__main__":
    main()
