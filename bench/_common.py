"""Shared set-up for benchmarks: a PostgreSQL database and a Redis database of their own (unique to
the run, removed afterwards), Django configured, real server/worker processes (uvicorn, celery)
with the same environment, and `figure()`: every measured figure printed on one line with its
target and PASS/FAIL, and recorded for `run_all.py`'s summary."""

import atexit
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
MiB = 1024 * 1024

# --- Figures ------------------------------------------------------------------------------------
_verdicts: list[bool] = []


def figure(name: str, value: str, target: str = "", passed: bool | None = None) -> None:
    """Print one figure on one line: its value, its target and PASS or FAIL (INFO when it has no
    target). Figures with a target count towards `make bench`'s summary and this script's exit
    status. Quantities of bytes are in MiB and MiB/s, as everywhere in the benchmarks."""
    verdict = "INFO" if passed is None else ("PASS" if passed else "FAIL")
    shown_target = f"target {target}" if target else ""
    print(f"  {name:<64} {value:>18}   {shown_target:<24} {verdict}", flush=True)
    if passed is None:
        return
    _verdicts.append(bool(passed))
    record = os.environ.get("BENCH_RESULTS")
    if record:
        # run_all.py counts these lines across every script of the run.
        with open(record, "a") as out:
            out.write(json.dumps({"script": Path(sys.argv[0]).stem, "figure": name, "passed": bool(passed)}) + "\n")


def exit_status() -> int:
    """0 when every figure with a target passed (and at least one was measured), else 1."""
    return 0 if _verdicts and all(_verdicts) else 1


# --- Isolation ----------------------------------------------------------------------------------
def _run_suffix() -> str:
    return f"{os.getpid()}_{int(time.time())}"


def _claim_redis_db(server: str) -> str:
    """A Redis database number no other benchmark run uses: the first empty one of 1–15, claimed
    with a marker key, flushed and released when this run ends."""
    import redis

    for number in range(15, 0, -1):
        client = redis.Redis.from_url(f"{server}/{number}")
        if client.set("aichor-bench-claim", os.getpid(), nx=True, ex=6 * 3600):
            if client.dbsize() > 1:  # not empty: someone else's data, leave it alone
                client.delete("aichor-bench-claim")
                continue
            atexit.register(client.flushdb)
            return f"{server}/{number}"
    raise RuntimeError("no free Redis database (1–15) for this benchmark run")


def _drop_database(base: str, name: str) -> None:
    from django.db import connections

    connections.close_all()
    subprocess.run(
        ["psql", f"{base}/postgres", "-qc", f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"], capture_output=True
    )


def scratch_dir(prefix: str) -> Path:
    """A temporary folder removed when the run ends, so nothing is left under /tmp."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, path, True)
    return path


def setup_django(db_name: str) -> dict:
    """Create a database unique to this run (`<db_name>_<pid>_<time>`, dropped at exit), claim a
    Redis database of its own, make a data folder (removed at exit) and configure Django against
    them; returns the env that server and worker subprocesses must share."""
    base = os.environ.get("BENCH_DATABASE_SERVER", "postgres://postgres@127.0.0.1:5432")
    # A run stopped with SIGTERM (or Ctrl-C) still drops its database and folders: atexit runs.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    db_name = f"{db_name}_{_run_suffix()}"
    subprocess.run(["psql", f"{base}/postgres", "-qc", f"CREATE DATABASE {db_name}"], capture_output=True, check=True)
    atexit.register(_drop_database, base, db_name)
    data = scratch_dir("aichor-bench-")
    redis_url = os.environ.get("BENCH_REDIS_URL") or _claim_redis_db(
        os.environ.get("BENCH_REDIS_SERVER", "redis://127.0.0.1:6379")
    )
    env = {
        "DATABASE_URL": f"{base}/{db_name}",
        "REDIS_URL": redis_url,
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
            except (requests.ConnectionError, requests.Timeout):  # a loaded machine: its first answer is slow
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
