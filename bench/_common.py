"""Shared set-up for benchmarks: a PostgreSQL database of their own, Django configured, and
real server/worker processes (uvicorn, celery) with the same environment."""

import atexit
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def setup_django(db_name: str) -> dict:
    """Create (or reuse) a benchmark database and configure Django against it; returns the env
    that server and worker subprocesses must share."""
    base = os.environ.get("BENCH_DATABASE_SERVER", "postgres://postgres@127.0.0.1:5432")
    subprocess.run(["psql", f"{base}/postgres", "-qc", f"CREATE DATABASE {db_name}"], capture_output=True)
    data = Path(tempfile.mkdtemp(prefix="aichor-bench-"))
    env = {
        "DATABASE_URL": f"{base}/{db_name}",
        "REDIS_URL": os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/13"),
        "AICHOR_DATA_DIR": str(data),
        "AICHOR_SECRET_KEY": "bench-secret-key-not-for-production",
        "AICHOR_WATCH_POLL_SECONDS": "0.05",
        "AICHOR_LOG_LEVEL": "WARNING",
        # The benchmark repositories are file:// URLs.
        "AICHOR_ALLOW_LOCAL_REPOS": "true",
        "PYTHONUNBUFFERED": "1",
    }
    os.environ.update(env)
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "aichor.settings")
    sys.path.insert(0, str(ROOT))
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)
    return {**os.environ, **env}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Processes:
    def __init__(self, env: dict) -> None:
        self.env = env
        self.children: list[subprocess.Popen] = []
        self.web: subprocess.Popen | None = None  # the uvicorn process server() started
        # A benchmark that fails half-way must not leave a worker consuming the next run's queue.
        atexit.register(self.stop_all)

    def start(self, *args: str) -> subprocess.Popen:
        Path(self.env["AICHOR_DATA_DIR"]).mkdir(parents=True, exist_ok=True)
        log = open(Path(self.env["AICHOR_DATA_DIR"]) / f"{Path(args[0]).name}-{len(self.children)}.log", "w")
        child = subprocess.Popen(
            args, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.children.append(child)
        return child

    def worker(self) -> subprocess.Popen:
        return self.start(
            str(BIN / "celery"),
            "-A",
            "aichor",
            "worker",
            "--pool=threads",
            "--concurrency=4",
            "--without-mingle",
            "--without-gossip",
            "--loglevel=WARNING",
        )

    def server(self) -> str:
        import requests

        port = free_port()
        self.web = self.start(
            str(BIN / "uvicorn"),
            "aichor.asgi:application",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--ws",
            os.environ.get("BENCH_WS", "websockets-sansio"),
            "--log-level",
            "warning",
        )
        url = f"http://127.0.0.1:{port}"
        for _ in range(200):
            try:
                requests.get(url + "/webhooks/github/none/", timeout=1)
                return url
            except requests.ConnectionError:
                time.sleep(0.1)
        raise RuntimeError("uvicorn did not start")

    def stop(self, child: subprocess.Popen) -> None:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGTERM)
            try:
                child.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(child.pid, signal.SIGKILL)
                child.wait()

    def stop_all(self) -> None:
        for child in self.children:
            self.stop(child)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (a worker's pool children), from /proc."""
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            try:
                children = [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
            found += children
            todo += children
    return found
