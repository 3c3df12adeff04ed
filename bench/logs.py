"""Worker memory against a large workload log (issue 10, finding 8): a workload on the docker
engine prints about 200 MB of numbered lines (every 5000th one 46 KB long, which Docker stores
as several messages sharing one timestamp, and an unfinished last line), run through a real
Celery worker process started as scripts/run.sh starts it.
Targets: the worker's peak RSS (VmHWM of the worker process and of any child) <= 300 MB, and the
stored log's line count and SHA-256 equal to what the workload printed, computed here
independently of the workload."""

import hashlib
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
# Its own broker database: a worker of another benchmark must not take this one's tasks.
os.environ.setdefault("BENCH_REDIS_URL", "redis://127.0.0.1:6379/12")
# The benchmark's repository is a local bare one (file://), as `make run`'s demo is.
os.environ.setdefault("AICHOR_ALLOW_LOCAL_REPOS", "true")
from bench._common import Processes, descendants, setup_django  # noqa: E402

LINES = 2_000_000
PEAK_RSS_TARGET_MB = 300
PAD = "0" * 90
LONG = PAD * 512  # 46 080 characters: Docker cuts it into 16 KiB messages


def workload(lines: int) -> str:
    return (
        'awk \'BEGIN { pad = sprintf("%090d", 0); long = pad; while (length(long) < 40000) long = long long; '
        f"for (i = 0; i < {lines}; i++) {{ if (i % 5000 == 7) print i, long; else print i, pad }}; "
        'printf "the end, no newline" }\''
    )


def expected(lines: int) -> tuple[int, int, str]:
    """(lines, bytes, sha256) of what the workload prints, as stored (the last line ended)."""
    digest, size = hashlib.sha256(), 0
    batch = []
    for i in range(lines):
        batch.append(f"{i} {LONG if i % 5000 == 7 else PAD}\n")
        if len(batch) == 10_000:
            data = "".join(batch).encode()
            digest.update(data)
            size += len(data)
            batch = []
    data = ("".join(batch) + "the end, no newline\n").encode()
    digest.update(data)
    return lines + 1, size + len(data), digest.hexdigest()


def kib(pid: int, field: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def main() -> int:
    env = setup_django("aichor_bench_logs")
    import docker
    import redis

    from experiments.logview import iter_text, total_lines
    from experiments.models import Experiment
    from experiments.services import create_experiment
    from projects.models import Engine, Project
    from projects.services import create_project
    from tests.helpers import TEST_IMAGE, GitRepo, ensure_test_image, manifest_yaml

    ensure_test_image(docker.from_env())
    redis.Redis.from_url(env["REDIS_URL"]).flushdb()
    Project.objects.filter(slug="bench-logs").delete()
    repo = GitRepo(Path(tempfile.mkdtemp(prefix="aichor-bench-logs-")))
    # This machine's dockerd may have no bridge network; the workload needs none.
    engine, _ = Engine.objects.update_or_create(
        name="bench-logs-docker", defaults={"kind": Engine.Kind.DOCKER, "config": {"network": "none"}}
    )
    project = create_project(name="Bench logs", slug="bench-logs", repo_clone_url=repo.url, engines=[engine])
    message = "aichor[train.yaml]: print 200 MB"
    sha = repo.commit(
        {
            "aichor_manifests/train.yaml": manifest_yaml(workload(LINES)),
            "Dockerfile": f"FROM {TEST_IMAGE}\nCOPY . /app\n",
            "nonce.txt": uuid.uuid4().hex,
        },
        message,
    )
    want_lines, want_bytes, want_sha = expected(LINES)

    procs = Processes(env)
    worker = procs.worker()
    time.sleep(5)  # the worker's own start-up (imports, broker connection) is its baseline
    baseline_kb = kib(worker.pid, "VmRSS")
    experiment = create_experiment(
        project=project, commit_sha=sha, branch="main", message=message, manifest_path="aichor_manifests/train.yaml"
    )
    started = time.monotonic()
    children_peak_kb = 0
    while not Experiment.objects.filter(pk=experiment.pk, status__in=["Succeeded", "Failed", "Cancelled"]).exists():
        if time.monotonic() - started > 1800:
            print("logs: the experiment did not end within 30 minutes")
            return 1
        if worker.poll() is not None:
            print(f"logs: the worker died (exit code {worker.returncode})")
            return 1
        for child in descendants(worker.pid):
            children_peak_kb = max(children_peak_kb, kib(child, "VmHWM"))
        time.sleep(0.2)
    elapsed = time.monotonic() - started
    worker_peak_kb = kib(worker.pid, "VmHWM")
    procs.stop_all()
    experiment.refresh_from_db()

    digest, size = hashlib.sha256(), 0
    for text in iter_text(experiment.pk, "process:worker-0"):
        data = text.encode()
        digest.update(data)
        size += len(data)
    got_lines = total_lines(experiment.pk, "process:worker-0")
    peak_mb = max(worker_peak_kb, children_peak_kb) / 1024
    ok_status = experiment.status == "Succeeded"
    ok_rss = peak_mb <= PEAK_RSS_TARGET_MB
    ok_log = (got_lines, size, digest.hexdigest()) == (want_lines, want_bytes, want_sha)

    print("logs")
    print(f"  workload printed {want_bytes / 1e6:.0f} MB in {want_lines} lines; experiment {experiment.status}")
    print(f"  end to end {elapsed:.0f} s (clone, build, run, logs stored)")
    print(
        f"  worker RSS: {baseline_kb / 1024:.0f} MB idle, peak {worker_peak_kb / 1024:.0f} MB"
        f" (children peak {children_peak_kb / 1024:.0f} MB)  (target <= {PEAK_RSS_TARGET_MB} MB)"
    )
    print(
        f"  stored log: {got_lines} lines, {size / 1e6:.0f} MB, sha256 {digest.hexdigest()[:16]}…"
        f" {'matches' if ok_log else 'DIFFERS from'} what was printed (sha256 {want_sha[:16]}…)"
    )
    Experiment.objects.filter(pk=experiment.pk).delete()
    if not ok_status:
        print(f"  failed: {experiment.failure_reason}")
    return 0 if ok_status and ok_rss and ok_log else 1


if __name__ == "__main__":
    sys.exit(main())
