"""Live logs at scale (issue 16 part 3) and the worker's memory against a large log (issue 10,
finding 8), on the real processes as scripts/run.sh starts them (uvicorn, a pipeline worker and
a watch worker) on PostgreSQL and Redis.

A workload on the docker engine prints 2 000 000 numbered lines (about 200 MiB) as fast as it
can: every 5000th one 46 KB long (Docker stores it as several messages sharing one timestamp),
and an unfinished last line. A WebSocket client follows the log from the moment the experiment
is created, as the experiment page's log viewer does (the same endpoint, session cookie and
messages), and checks every line's number as it arrives. Meanwhile the experiment page is
fetched again and again, as a member opening it would.

Targets:
- lines delivered live over the WebSocket >= 5 000 lines/s (all of them, first to last)
- 0 lines lost or reordered (each message starts where the previous one ended, each line holds
  its own number)
- the stored log complete (line count and SHA-256 equal to what the workload printed, computed
  here independently of the workload)
- search of the whole stored log through the dashboard's search URL <= 1 s (a line's number
  near the end, and text that is nowhere: both read every chunk)
- the experiment page's render while the workload's lines stream in <= 200 ms (p95)
- the workers' peak RSS (VmHWM of each worker process and of any child) <= 300 MiB"""

import hashlib
import json
import os
import select
import socket
import statistics
import sys
import threading
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench._common import MiB, Processes, descendants, exit_status, figure, percentile, scratch_dir, setup_django  # noqa: E402

LINES = 2_000_000
PEAK_RSS_TARGET_MIB = 300
RATE_TARGET = 5_000  # lines/s
SEARCH_TARGET_S = 1.0
RENDER_TARGET_MS = 200.0
# A member opening the page now and then; more often, the bench's own requests would be the load.
RENDER_EVERY_S = 2.0
PAD = "0" * 90
LONG = PAD * 512  # 46 080 characters: Docker cuts it into 16 KiB messages
LAST = "the end, no newline"


def workload(lines: int) -> str:
    return (
        'awk \'BEGIN { pad = sprintf("%090d", 0); long = pad; while (length(long) < 40000) long = long long; '
        f"for (i = 0; i < {lines}; i++) {{ if (i % 5000 == 7) print i, long; else print i, pad }}; "
        f'printf "{LAST}" }}\''
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
    data = ("".join(batch) + LAST + "\n").encode()
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


def cpu_seconds(pid: int) -> float:
    """CPU time of a process and of its waited-for children (git, docker build), in seconds."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def backend_cpu() -> dict[int, float]:
    """CPU time of each PostgreSQL backend connected to this run's database."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        return {pid: cpu_seconds(pid) for (pid,) in cursor.fetchall()}


class LogFollower:
    """The log viewer's side of the WebSocket (static/logview.js): messages of lines, each
    starting at `first`; a `first` beyond the lines held is a gap (the page would reset there).
    websockets' sans-I/O protocol over a blocking socket, so the client adds no event loop."""

    def __init__(self, url: str, path: str, headers: dict[str, str]) -> None:
        from urllib.parse import urlsplit

        from websockets.client import ClientProtocol
        from websockets.extensions.permessage_deflate import ClientPerMessageDeflateFactory
        from websockets.uri import parse_uri

        host, port = urlsplit(url).hostname, urlsplit(url).port
        self.sock = socket.create_connection((host, port))
        # A browser offers compression (permessage-deflate) on every WebSocket: so does this client.
        self.protocol = ClientProtocol(
            parse_uri(f"ws://{host}:{port}{path}"),
            extensions=[ClientPerMessageDeflateFactory(client_max_window_bits=True)],
            max_size=None,
        )
        request = self.protocol.connect()
        for name, value in headers.items():
            request.headers[name] = value
        self.protocol.send_request(request)
        self._flush()
        while self.protocol.handshake_exc is None and self.protocol.state.name == "CONNECTING":
            self.protocol.receive_data(self.sock.recv(65536))
        if self.protocol.handshake_exc is not None:
            raise self.protocol.handshake_exc
        self.next = 0  # the number of the next line expected
        self.received = 0
        self.messages = 0
        self.problems: list[str] = []
        self.first_at: float | None = None
        self.last_at: float | None = None
        self.status: str | None = None
        self.last_line = ""

    def _flush(self) -> None:
        for data in self.protocol.data_to_send():
            self.sock.sendall(data)

    def run(self, deadline: float) -> None:
        pending = list(self.protocol.events_received())
        while self.status is None:
            for event in pending:
                opcode = getattr(event, "opcode", None)  # the handshake's answer is no frame
                if opcode is None:
                    continue
                if opcode.name == "TEXT":
                    self._message(json.loads(event.data))
                elif opcode.name == "CLOSE":
                    self.problems.append("the server closed the WebSocket before the end")
                    return
            self._flush()
            if self.status is not None:
                break
            left = deadline - time.monotonic()
            if left <= 0:
                self.problems.append("the end did not come within the deadline")
                return
            if select.select([self.sock], [], [], min(left, 1.0))[0]:
                data = self.sock.recv(1 << 20)
                if not data:
                    self.problems.append("the connection dropped")
                    return
                self.protocol.receive_data(data)
            pending = list(self.protocol.events_received())

    def _message(self, msg: dict) -> None:
        self.messages += 1
        if msg["type"] == "end":
            self.status = msg["status"]
            return
        if msg["type"] != "lines" or not msg["lines"]:
            return
        now = time.monotonic()
        first, lines = msg["first"], msg["lines"]
        if first != self.next and len(self.problems) < 10:
            self.problems.append(f"a message starts at line {first}, {self.next} expected")
        self.first_at = self.first_at or now
        self.last_at = now
        self.last_wall = time.time()
        for offset, line in enumerate(lines):
            number = first + offset
            if number < LINES and line.partition(" ")[0] != str(number) and len(self.problems) < 10:
                self.problems.append(f"line {number} reads {line[:30]!r}")
        self.received += len(lines)
        self.next = first + len(lines)
        self.last_line = lines[-1]

    def close(self) -> None:
        self.sock.close()


class Sampler(threading.Thread):
    """While the workload's lines stream in: the workers' peak memory, the experiment page
    fetched as a member opens it (every RENDER_EVERY_S), and each second the lines stored
    against the lines delivered (which stage a slow delivery waits for)."""

    def __init__(self, workers, page_url: str, cookie: str, experiment_id, follower) -> None:
        super().__init__(daemon=True)
        self.workers, self.page_url, self.cookie = workers, page_url, cookie
        self.experiment_id, self.follower = experiment_id, follower
        self.progress: list[tuple[float, int, int]] = []  # (time, lines stored, lines delivered)
        self.children_peak_kb = 0
        self.renders_ms: list[float] = []
        self.render_errors: list[str] = []
        self.rendering = threading.Event()  # set while lines stream in
        self.done = threading.Event()
        self.backends: dict[int, tuple[float, float]] = {}  # this run's PostgreSQL backends: CPU first, last seen

    def run(self) -> None:
        import requests

        session = requests.Session()
        session.headers["Cookie"] = self.cookie
        next_render = next_backends = 0.0
        while not self.done.is_set():
            if time.monotonic() >= next_backends:
                next_backends = time.monotonic() + 1.0
                self.sample_backends()
                from experiments.logview import total_lines

                stored = total_lines(self.experiment_id, "process:worker-0")
                self.progress.append((time.monotonic(), stored, self.follower.received))
            for worker in self.workers:
                for child in descendants(worker.pid):
                    self.children_peak_kb = max(self.children_peak_kb, kib(child, "VmHWM"))
            if self.rendering.is_set() and time.monotonic() >= next_render:
                next_render = time.monotonic() + RENDER_EVERY_S
                started = time.perf_counter()
                response = session.get(self.page_url, timeout=30)
                elapsed = (time.perf_counter() - started) * 1000
                if response.status_code == 200 and 'id="logviewer"' in response.text:
                    self.renders_ms.append(elapsed)
                else:
                    self.render_errors.append(f"HTTP {response.status_code}")
            self.done.wait(0.1)
        self.sample_backends()

    def sample_backends(self) -> None:
        for pid, now in backend_cpu().items():
            first = self.backends.get(pid, (now, now))[0]
            self.backends[pid] = (first, now)

    def postgres_seconds(self) -> float:
        return sum(last - first for first, last in self.backends.values())


def main() -> None:
    env = setup_django("aichor_bench_logs")
    import docker
    import requests
    from django.conf import settings
    from django.contrib.auth import get_user_model
    from django.test import Client

    from experiments.logview import iter_text, total_lines
    from experiments.models import Experiment
    from experiments.services import create_experiment
    from projects.models import Engine
    from projects.services import create_project
    from tests.helpers import TEST_IMAGE, GitRepo, ensure_test_image, manifest_yaml

    client = docker.from_env()
    ensure_test_image(client)
    repo = GitRepo(scratch_dir("aichor-bench-logs-"))
    # This machine's dockerd may have no bridge network; the workload needs none.
    engine, _ = Engine.objects.update_or_create(
        name="bench-logs-docker", defaults={"kind": Engine.Kind.DOCKER, "config": {"network": "none"}}
    )
    user, _ = get_user_model().objects.get_or_create(username="bench-logs@example.com")
    project = create_project(
        name="Bench logs", slug="bench-logs", repo_clone_url=repo.url, engines=[engine], members=[user]
    )
    login = Client()
    login.force_login(user)
    cookie = f"{settings.SESSION_COOKIE_NAME}={login.cookies[settings.SESSION_COOKIE_NAME].value}"
    message = "aichor[train.yaml]: print 200 MiB"
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
    # As scripts/run.sh starts them: one worker for the pipeline queue, one for watching.
    common = ["--concurrency=4", "--pool=threads", "--without-mingle", "--without-gossip", "--loglevel=WARNING"]
    celery = str(Path(sys.executable).parent / "celery")
    pipeline = procs.start(celery, "-A", "aichor", "worker", "-n", "pipeline@%h", "-Q", "celery", *common)
    watch = procs.start(celery, "-A", "aichor", "worker", "-n", "watch@%h", "-Q", "watch,notify", *common)
    url = procs.server()
    requests.get(url + "/login/", timeout=10)  # the server's own first request (imports) is not a figure
    experiment = create_experiment(
        project=project, commit_sha=sha, branch="main", message=message, manifest_path="aichor_manifests/train.yaml"
    )
    page_url = f"{url}/experiments/{experiment.pk}/"
    # The workload's own start and exit, from Docker's events stream.
    events = client.events(
        decode=True,
        filters={"type": "container", "event": ["start", "die"], "label": f"aichor.experiment={experiment.pk}"},
    )
    workload_events: dict[str, int] = {}

    def watch_events() -> None:
        try:
            for event in events:
                if event.get("Actor", {}).get("Attributes", {}).get("aichor.process") == "worker-0":
                    workload_events.setdefault(event["status"], int(event["timeNano"]))
        except Exception:  # closed at the end
            pass

    threading.Thread(target=watch_events, daemon=True).start()
    follower = LogFollower(
        url, f"/ws/experiments/{experiment.pk}/logs/?stream=process:worker-0", {"Cookie": cookie, "Origin": url}
    )
    sampler = Sampler([pipeline, watch], page_url, cookie, experiment.pk, follower)
    sampler.start()
    started = time.monotonic()
    dockerd = [int(pid) for pid in os.popen("pgrep -x dockerd").read().split()]
    roles = {"uvicorn": procs.web.pid, "watch worker": watch.pid, "pipeline worker": pipeline.pid}
    if dockerd:
        roles["dockerd (whole machine)"] = dockerd[0]
    cpu_before = {role: cpu_seconds(pid) for role, pid in roles.items()}
    client_before = time.process_time()

    # The page renders are sampled from the first line on, until the last one arrived.
    def on_lines_start() -> None:
        while not sampler.done.is_set() and follower.first_at is None:
            time.sleep(0.05)
        sampler.rendering.set()

    threading.Thread(target=on_lines_start, daemon=True).start()
    try:
        follower.run(deadline=started + 1800)
    finally:
        sampler.rendering.clear()
        sampler.done.set()
        sampler.join()
        follower.close()
    elapsed = time.monotonic() - started
    cpu_used = {role: cpu_seconds(pid) - cpu_before[role] for role, pid in roles.items()}
    cpu_used["this client (follower, page fetches)"] = time.process_time() - client_before
    cpu_used["PostgreSQL (this run's backends)"] = sampler.postgres_seconds()
    experiment.refresh_from_db()

    # The dashboard's search URL, as the page's search form asks it: a line near the end, and
    # text that is nowhere (both read the whole log).
    session = requests.Session()
    session.headers["Cookie"] = cookie
    searches = {}
    wanted = f'data-line="{LINES - 3}"'
    for label, query, hit, target in (
        ("a line's number, near the end", f"{LINES - 3} ", True, True),
        ("text that is nowhere", "no such text", False, True),
        # The log is 90 zeros a line: a needle ending in zeros makes every substring search
        # (PostgreSQL's strpos, Python's str.find) try each position. For information.
        ("a needle ending in the filler's zeros", f"{LINES - 3} 000", True, False),
    ):
        walls, cpus, right = [], [], True
        for _ in range(3 if target else 1):
            before = (cpu_seconds(procs.web.pid), backend_cpu())
            t0 = time.perf_counter()
            response = session.get(
                f"{url}/experiments/{experiment.pk}/log/search/",
                params={"stream": "process:worker-0", "q": query},
                timeout=60,
            )
            walls.append(time.perf_counter() - t0)
            after = (cpu_seconds(procs.web.pid), backend_cpu())
            cpus.append(after[0] - before[0] + sum(v - before[1].get(k, 0.0) for k, v in after[1].items()))
            right = right and response.status_code == 200 and (wanted in response.text) == hit
        searches[label] = (statistics.median(walls), statistics.mean(cpus), right, target)

    events.close()
    printing_s = lag_s = None
    if "start" in workload_events and "die" in workload_events:
        printing_s = (workload_events["die"] - workload_events["start"]) / 1e9
        if follower.last_at is not None:
            # The last line's arrival after the workload exited, on the wall clock.
            lag_s = follower.last_wall - workload_events["die"] / 1e9
    # The same page once nothing streams (the log complete): the baseline of the figure above.
    idle_ms = []
    for _ in range(10):
        t0 = time.perf_counter()
        session.get(page_url, timeout=30)
        idle_ms.append((time.perf_counter() - t0) * 1000)
    worker_peak_kb = max(kib(pipeline.pid, "VmHWM"), kib(watch.pid, "VmHWM"))
    server_peak_kb = kib(procs.web.pid, "VmHWM")
    procs.stop_all()

    digest, size = hashlib.sha256(), 0
    for text in iter_text(experiment.pk, "process:worker-0"):
        data = text.encode()
        digest.update(data)
        size += len(data)
    got_lines = total_lines(experiment.pk, "process:worker-0")
    ok_log = (got_lines, size, digest.hexdigest()) == (want_lines, want_bytes, want_sha)

    print("logs")
    figure("machine cores", f"{os.cpu_count()} (load average {os.getloadavg()[0]:.1f})")
    figure("workload printed", f"{want_lines} lines, {want_bytes / MiB:.0f} MiB")
    figure("experiment", experiment.status, "Succeeded", experiment.status == "Succeeded")
    if experiment.status != "Succeeded":
        print(f"  failed: {experiment.failure_reason}")
    if printing_s is not None:
        figure("the workload's own run (container start to exit)", f"{printing_s:.1f} s")
    if lag_s is not None:
        figure("last line delivered after the workload exited", f"{lag_s:.1f} s")
    figure("end to end (clone, build, run, every line delivered)", f"{elapsed:.0f} s")
    span = (follower.last_at - follower.first_at) if follower.first_at and follower.last_at else 0
    rate = follower.received / span if span > 0 else 0
    figure("lines delivered over the WebSocket", f"{follower.received} in {span:.1f} s")
    figure(
        "delivered live, first line to last",
        f"{rate:,.0f} lines/s",
        f">= {RATE_TARGET:,} lines/s",
        rate >= RATE_TARGET and follower.received == want_lines,
    )
    lost = want_lines - follower.received
    complete = not follower.problems and follower.received == want_lines and follower.last_line == LAST
    figure("lines lost or out of order", f"{max(lost, 0)} lost", "0", complete)
    for problem in follower.problems:
        print(f"    {problem}")
    if follower.problems:
        for log in sorted(Path(env["AICHOR_DATA_DIR"]).glob("*.log")):
            tail = log.read_text(errors="replace").splitlines()[-15:]
            print(f"    --- {log.name}\n" + "\n".join(f"    {line}" for line in tail))
    figure(
        "stored log: lines, size, sha256 equal to what was printed",
        f"{got_lines} lines, {size / MiB:.0f} MiB",
        "complete",
        ok_log,
    )
    for label, (wall, cpu, right, target) in searches.items():
        figure(
            f"search of the whole stored log: {label} (median of 3)" if target else f"search: {label}",
            f"{wall:.3f} s",
            f"<= {SEARCH_TARGET_S:.0f} s" if target else "",
            (right and wall <= SEARCH_TARGET_S) if target else None,
        )
        figure("  its CPU time (uvicorn + PostgreSQL)", f"{cpu:.3f} s")
        if not right:
            print("    the search's answer was wrong")
    renders = sampler.renders_ms
    if renders:
        p95 = percentile(renders, 95)
        figure(
            f"experiment page render while lines stream in, p50 / p95 ({len(renders)} renders)",
            f"{percentile(renders, 50):.0f} / {p95:.0f} ms",
            f"p95 <= {RENDER_TARGET_MS:.0f} ms",
            p95 <= RENDER_TARGET_MS and not sampler.render_errors,
        )
    else:
        figure("experiment page render while lines stream in", "no render", f"<= {RENDER_TARGET_MS:.0f} ms", False)
    for error in sampler.render_errors[:5]:
        print(f"    page render failed: {error}")
    figure(
        "the same page once the log is complete, p50 / p95 (baseline)",
        f"{percentile(idle_ms, 50):.0f} / {percentile(idle_ms, 95):.0f} ms",
    )
    # Where the lines waited: stored by the watch worker, then sent by uvicorn.
    stored_all = next((t for t, stored, _ in sampler.progress if stored >= want_lines), None)
    if follower.first_at and stored_all:
        figure("every line stored, after the first line arrived", f"{stored_all - follower.first_at:.0f} s")
        figure("every line delivered, after the first line arrived", f"{span:.0f} s")
    behind = max((stored - sent for _, stored, sent in sampler.progress), default=0)
    figure("most lines stored but not yet delivered, at any second", f"{behind}")
    for role, seconds in cpu_used.items():
        figure(f"CPU time while following: {role}", f"{seconds:.1f} s")
    figure("uvicorn peak RSS", f"{server_peak_kb / 1024:.0f} MiB")
    peak_mib = max(worker_peak_kb, sampler.children_peak_kb) / 1024
    figure(
        "workers' peak RSS (incl. children)",
        f"{peak_mib:.0f} MiB",
        f"<= {PEAK_RSS_TARGET_MIB} MiB",
        peak_mib <= PEAK_RSS_TARGET_MIB,
    )
    Experiment.objects.filter(pk=experiment.pk).delete()
    sys.exit(exit_status())


if __name__ == "__main__":
    main()
