"""Watching at scale (issue 12): N = 100, 300, 500 experiments of `sleep` running at once on the
docker engine (`network: none`, limits raised), one deployment started as scripts/run.sh starts
it (its celery commands are read from the script at run time, flags and all, with
AICHOR_WATCH_STATS=true), PostgreSQL and Redis.

Each round first times a bare `docker run -d` of N containers from the same base image, with as
many at once as the pipeline worker's --concurrency (both then start N containers with the same
parallelism), then delivers N signed pushes to the real webhook endpoint, and once they have
ended and their containers are gone, times the bare run again: the ratio's baseline is the mean
of the two, so a drift of the machine's speed over the round weighs on both sides. Every experiment
sleeps until its own epoch (the delivered message's last word): release + 20..60 s, where the
release leaves time for all N to start, so all N run together in a steady phase before the
first exit. One commit serves every delivery of a round: each body carries its own message, so
the replay check lets each through as it would N commits, and clone, build (cached) and submit
cost the same. Container start and exit times are the Docker daemon's events. Each timed phase
starts once the machine is nearly idle (at most a minute's wait), so neither side pays for the
removal of the containers of the phase before it.

Targets, per N:
- container exit → Succeeded: p99 ≤ 2 s;
- Docker calls and queries per watcher interval (the watcher's stats lines) when nothing
  changes: the median at every N within +2 of the median at the smallest N; an interval with
  changes costs at most one more Docker call per change (+2);
- at the largest N, over the steady phase: the watch worker's CPU ≤ 25 % of one core, and its
  peak RSS ≤ 300 MB;
- submit → last container started, against the bare `docker run -d` of N (the mean of the runs
  before and after): ≤ 1.3×.
Where that time goes is printed beside it, for information: the deliveries, the median wait for a
pipeline thread and median time in each step, and the CPU seconds of each phase (bare run,
pipeline) for the machine and each component (the Docker daemon, the workers, PostgreSQL...): on
a shared machine the gap between the two is other people's work.
BENCH_WATCH_SIZES=10,20 runs smaller rounds (to debug). BENCH_WATCH_KEEP=DIR keeps the workers'
logs there (with AICHOR_WATCH_STATS: a line per watcher interval, and per completion the seconds
it waited for a finisher and took) and times-N.json: each experiment's delivery, container
start, container exit and Succeeded, in epoch seconds."""

import json
import os
import re
import shlex
import shutil
import statistics
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench._common import (  # noqa: E402
    BIN,
    ROOT,
    MiB,
    Processes,
    descendants,
    exit_status,
    figure,
    percentile,
    scratch_dir,
    setup_django,
)

KEEP = Path(os.environ["BENCH_WATCH_KEEP"]) if os.environ.get("BENCH_WATCH_KEEP") else None
SIZES = [int(n) for n in os.environ.get("BENCH_WATCH_SIZES", "100,300,500").split(",")]
LABEL = "aichor.experiment"
BARE_LABEL = "aichor.bench-bare"
COMMAND = "s=$(( ${AICHOR_EXPERIMENT_MESSAGE##* } - $(date +%s) )); if [ $s -gt 0 ]; then sleep $s; fi"
STATS = re.compile(
    r"watch engine=(?P<engine>\S+) experiments=(?P<experiments>\d+) changes=(?P<changes>\d+) "
    r"docker_calls=(?P<docker_calls>\d+) queries=(?P<queries>\d+) seconds=(?P<seconds>[\d.]+)"
)
NOTICE_P99_S = 2.0
CALLS_SLACK = 2
CPU_TARGET = 25.0
RSS_TARGET_MB = 300  # the 300 MB, shown in MiB
RATIO_TARGET = 1.3
CLK_TCK = os.sysconf("SC_CLK_TCK")


# --- The deployment, as scripts/run.sh starts it -------------------------------------------
def _expand(word: str, env: dict) -> str:
    def value(match: re.Match) -> str:
        name, default = match.group(1) or match.group(3), match.group(2)
        if name == "BIN":
            return str(BIN)
        return env.get(name) or (default if default is not None else "")

    return re.sub(r"\$\{(\w+)(?::-([^}]*))?\}|\$(\w+)", value, word)


def run_sh_celery_commands(env: dict) -> list[list[str]]:
    """Every celery command scripts/run.sh starts (workers, beat), with its variables expanded
    (the environment's, and the script's own top-level `NAME=value` lines)."""
    text = (ROOT / "scripts" / "run.sh").read_text().replace("\\\n", " ")
    commands = []
    env = dict(env)
    for line in text.splitlines():
        assignment = re.fullmatch(r"(\w+)=(\S+)", line)
        if assignment:
            env[assignment[1]] = _expand(shlex.split(assignment[2])[0], env)
            continue
        line = line.strip().removesuffix("&").strip()
        words = shlex.split(line) if "celery" in line and not line.startswith("#") else []
        if words and words[0].endswith("/celery"):
            commands.append([_expand(w, env) for w in words])
    if not commands:
        raise RuntimeError("scripts/run.sh starts no celery command")
    return commands


def queues_of(args: list[str]) -> list[str]:
    for i, arg in enumerate(args):
        if arg in ("-Q", "--queues") and i + 1 < len(args):
            return args[i + 1].split(",")
        if arg.startswith(("-Q", "--queues=")) and arg not in ("-Q",):
            return arg.split("=", 1)[-1].removeprefix("-Q").split(",")
    return ["celery"] if "worker" in args else []


def concurrency_of(args: list[str]) -> int:
    for i, arg in enumerate(args):
        if arg.startswith("--concurrency="):
            return int(arg.split("=", 1)[1])
        if arg in ("-c", "--concurrency") and i + 1 < len(args):
            return int(args[i + 1])
    return os.cpu_count() or 1


# --- /proc --------------------------------------------------------------------------------
def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        for p in [pid, *descendants(pid)]:
            try:
                fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / CLK_TCK


def busy_cpu_seconds() -> float:
    """CPU seconds the whole machine spent busy (every core), from /proc/stat."""
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle, iowait
    return (sum(fields[:8]) - idle) / CLK_TCK


def wait_until_quiet(what: str, limit: float = 60.0) -> None:
    """Wait until the machine is nearly idle (under 15 % of its cores busy over a second), at
    most `limit` seconds: removing hundreds of containers goes on in the daemon and the kernel
    (unmounts, deleted layers, exiting shims) after the API has answered, and a phase timed
    meanwhile would pay for the phase before it."""
    start = time.time()
    while time.time() - start < limit:
        before = busy_cpu_seconds()
        time.sleep(1.0)
        if busy_cpu_seconds() - before < 0.15 * (os.cpu_count() or 1):
            break
    print(f"watch_scale: quiet before {what} after {time.time() - start:.1f} s", file=sys.stderr, flush=True)


def cpu_by_process() -> dict[int, tuple[str, float]]:
    """{pid: (command name, CPU seconds incl. its reaped children)} of every process."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        name = text[text.index("(") + 1 : text.rindex(")")]
        fields = text.rsplit(")", 1)[1].split()
        found[int(stat.parent.name)] = (name, sum(int(f) for f in fields[11:15]) / CLK_TCK)
    return found


class CpuMeter:
    """Where a phase's CPU went: the machine's busy CPU, and its share per component (the
    Docker daemon with containerd and its shims, the pipeline worker with its git children,
    the watch worker, the web server, PostgreSQL, Redis). Other engineers' work on a shared
    machine shows as the gap between the machine's figure and the sum of ours."""

    GROUPS = {
        "docker daemon": ("dockerd", "containerd", "containerd-shim", "containerd-shim-runc-v2", "runc", "docker-init"),
        "postgres": ("postgres",),
        "redis": ("redis-server",),
    }

    def __init__(self, roles: dict[str, list[int]]) -> None:
        self.roles = roles  # {"pipeline worker": [pid], ...}: a process and its descendants
        self.busy = busy_cpu_seconds()
        self.start = cpu_by_process()
        self.wall = time.time()

    def stop(self) -> dict[str, float]:
        end, busy, wall = cpu_by_process(), busy_cpu_seconds(), time.time()
        used = {pid: cpu - self.start.get(pid, (name, 0.0))[1] for pid, (name, cpu) in end.items()}
        shares: dict[str, float] = {"machine": busy - self.busy, "wall": wall - self.wall}
        trees = {role: {p for pid in pids for p in [pid, *descendants(pid)]} for role, pids in self.roles.items()}
        mine = set().union(*trees.values())
        for role, tree in trees.items():
            # A role's descendants that are another role's (this script's workers and web server)
            # count there only, not twice.
            nested = [trees[other] for other in trees if other != role and set(self.roles[other]) <= tree]
            shares[role] = sum(used.get(p, 0.0) for p in tree.difference(*nested))
        for group, names in self.GROUPS.items():
            shares[group] = sum(cpu for pid, cpu in used.items() if pid not in mine and end[pid][0] in names)
        return shares


def peak_rss_mib(pids: list[int]) -> float:
    peak = 0
    for pid in pids:
        for p in [pid, *descendants(pid)]:
            try:
                for line in Path(f"/proc/{p}/status").read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        peak = max(peak, int(line.split()[1]))
            except OSError:
                continue
    return peak * 1024 / MiB  # VmHWM is in kB


# --- Docker -------------------------------------------------------------------------------
def remove_containers(client, label: str, keep=lambda labels: True) -> None:
    found = [c for c in client.api.containers(all=True, filters={"label": label}) if keep(c["Labels"])]

    def remove(container: dict) -> None:
        try:
            client.api.remove_container(container["Id"], force=True)
        except Exception:  # already gone
            pass

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(remove, found))


def remove_tags(client, prefix: str) -> None:
    """The run's image tags (one per experiment): left behind, they would make the next run's
    daemon slower at tagging (it rewrites its whole list of tags on each)."""
    tags = [tag for image in client.api.images() for tag in image.get("RepoTags") or [] if tag.startswith(prefix)]

    def remove(tag: str) -> None:
        try:
            client.api.remove_image(tag)
        except Exception:  # already gone
            pass

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(remove, tags))


def bare_run(image: str, n: int, at_once: int) -> float:
    """Seconds for `docker run -d` of n containers, `at_once` commands in flight."""
    import subprocess

    def run(_i: int) -> None:
        subprocess.run(
            ["docker", "run", "-d", "--network", "none", "--label", f"{BARE_LABEL}=1", image, "sleep", "600"],
            check=True,
            capture_output=True,
        )

    t0 = time.time()
    with ThreadPoolExecutor(at_once) as pool:
        list(pool.map(run, range(n)))
    return time.time() - t0


# --- Stats lines --------------------------------------------------------------------------
class WorkerLogs:
    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def offsets(self) -> dict[Path, int]:
        return {p: p.stat().st_size for p in self.folder.glob("celery-*.log")}

    def stats_since(self, start: dict[Path, int], end: dict[Path, int] | None, engine_id: int) -> list[dict]:
        found = []
        for path in self.folder.glob("celery-*.log"):
            with path.open("rb") as fh:
                fh.seek(start.get(path, 0))
                data = fh.read((end or {}).get(path, path.stat().st_size) - start.get(path, 0))
            for match in STATS.finditer(data.decode(errors="replace")):
                if match["engine"] == str(engine_id):
                    found.append({k: float(v) for k, v in match.groupdict().items() if k != "engine"})
        return found


def median_of(lines: list[dict], key: str) -> float | None:
    return statistics.median(line[key] for line in lines) if lines else None


# --- One round ----------------------------------------------------------------------------
def main() -> None:
    env = setup_django("aichor_bench_watch")
    # The production watch interval, not _common's fast poll for latency benchmarks.
    env.pop("AICHOR_WATCH_POLL_SECONDS", None)
    # PYTHONPATH: the workers import this checkout's code (also when run from a copy of it).
    env |= {
        "AICHOR_WATCH_STATS": "true",
        "AICHOR_LOG_LEVEL": "INFO",
        "AICHOR_WORKER_LOG_LEVEL": "INFO",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    import docker
    import redis
    import requests

    from experiments.limits import MAX_PROCESSES, MAX_RUNNING
    from experiments.models import Experiment
    from experiments.services import cancel_experiment
    from projects.models import Engine, Project
    from projects.services import create_project
    from tests.helpers import (
        DOCKERFILE,
        TEST_IMAGE,
        ContainerEvents,
        GitRepo,
        ensure_test_image,
        github_signature,
        manifest_yaml,
    )

    client = docker.from_env(timeout=300)
    ensure_test_image(client)
    Project.objects.filter(slug="bench-watch").delete()
    repo = GitRepo(scratch_dir("aichor-bench-watch-"))
    limit = 10 * max(SIZES)
    engine, _ = Engine.objects.update_or_create(
        name="bench-watch-docker",
        defaults={"kind": "docker", "config": {"network": "none", MAX_RUNNING: limit, MAX_PROCESSES: limit}},
    )
    project = create_project(
        name="Bench watch", slug="bench-watch", repo_clone_url=repo.url, engines=[engine], webhook_secret="bench"
    )
    sha = repo.commit(
        {"aichor_manifests/train.yaml": manifest_yaml(COMMAND), "Dockerfile": DOCKERFILE, "nonce": uuid.uuid4().hex},
        "aichor[train.yaml]: watch scale",
    )

    commands = run_sh_celery_commands(env)
    procs = Processes(env)
    started = [(args, procs.start(*args)) for args in commands]
    workers = [(args, child) for args, child in started if "worker" in args]
    watchers = [child.pid for args, child in workers if "watch" in queues_of(args)] or [c.pid for _a, c in workers]
    pipeline_concurrency = next(
        (concurrency_of(args) for args, _c in workers if "celery" in queues_of(args)), concurrency_of(workers[0][0])
    )
    url = procs.server()
    roles = {
        "pipeline worker": [c.pid for args, c in workers if "celery" in queues_of(args)],
        "watch worker": watchers,
        "web server": [procs.web.pid],
        # The bare run's `docker run` commands are its children: their CPU counts here once reaped.
        "this script": [os.getpid()],
    }
    session = requests.Session()
    logs = WorkerLogs(Path(env["AICHOR_DATA_DIR"]))
    events = ContainerEvents(client)
    ids: list[str] = []

    def deliver(message: str) -> str:
        body = json.dumps({"ref": "refs/heads/main", "head_commit": {"id": sha, "message": message}}).encode()
        headers = {
            "X-GitHub-Event": "push",
            "X-GitHub-Delivery": str(uuid.uuid4()),
            "X-Hub-Signature-256": github_signature(body, "bench"),
            "Content-Type": "application/json",
        }
        response = session.post(f"{url}/webhooks/github/bench-watch/", data=body, headers=headers, timeout=30)
        response.raise_for_status()
        ids.append(response.json()["experiment"])
        return ids[-1]

    results: dict[int, dict] = {}
    if KEEP:
        KEEP.mkdir(parents=True, exist_ok=True)
    try:
        warm = deliver(f"aichor[train.yaml]: warm-up ends {int(time.time())}")
        deadline = time.time() + 180
        while not Experiment.objects.filter(pk=warm, status="Succeeded").exists():
            if time.time() > deadline:
                raise RuntimeError("the warm-up experiment did not succeed within 180 s")
            time.sleep(0.2)
        for n in SIZES:
            results[n] = one_round(
                n,
                client,
                deliver,
                events,
                logs,
                engine.pk,
                watchers,
                roles,
                pipeline_concurrency,
                TEST_IMAGE,
                cancel_experiment,
            )
    finally:
        events.close()
        procs.stop_all()
        remove_containers(client, BARE_LABEL)
        ours = set(ids)
        remove_containers(client, LABEL, keep=lambda labels: labels.get(LABEL) in ours)
        remove_tags(client, f"aichor/{project.namespace}/")
        redis.Redis.from_url(env["REDIS_URL"]).flushdb()
        if KEEP:
            for path in Path(env["AICHOR_DATA_DIR"]).glob("*.log"):
                shutil.copy(path, KEEP)
    report(results)


def one_round(n, client, deliver, events, logs, engine_id, watchers, roles, at_once, image, cancel) -> dict:
    from experiments.models import Experiment

    wait_until_quiet(f"the bare run of {n}")
    print(f"watch_scale: N={n}: bare docker run -d ({at_once} at once)", file=sys.stderr, flush=True)
    meter = CpuMeter(roles)
    bare = bare_run(image, n, at_once)
    bare_cpu = meter.stop()
    remove_containers(client, BARE_LABEL)
    wait_until_quiet(f"the {n} deliveries")

    # Time for all n to start before the first ends: twice the bare figure, at least 20 s.
    release = int(time.time() + max(20.0, 2 * bare) + 5)
    print(f"watch_scale: N={n}: delivering (bare took {bare:.1f} s)", file=sys.stderr, flush=True)
    sent: dict[str, float] = {}
    meter = CpuMeter(roles)
    t0 = time.time()
    for i in range(n):
        t = time.time()
        sent[deliver(f"aichor[train.yaml]: N={n} run {i} ends {release + 20 + i % 41}")] = t
    delivered = time.time() - t0
    batch = list(sent)

    def all_started() -> bool:
        return all(e in events.started for e in batch)

    while not all_started() and time.time() < release + 19:
        time.sleep(0.2)
    pipeline_cpu = meter.stop()
    last_start = max((events.started[e] for e in batch if e in events.started), default=None)
    steady = None
    if all_started() and time.time() < release + 12:
        # Nothing changes between here and the first exit (release + 20).
        steady_from = time.time() + 1
        while time.time() < steady_from:
            time.sleep(0.1)
        offsets, cpu0 = logs.offsets(), cpu_seconds(watchers)
        while time.time() < release + 19:
            time.sleep(0.2)
        steady = {
            "seconds": time.time() - steady_from,
            "cpu_percent": 100 * (cpu_seconds(watchers) - cpu0) / (time.time() - steady_from),
            "lines": logs.stats_since(offsets, logs.offsets(), engine_id),
            "end": logs.offsets(),
        }
    print(f"watch_scale: N={n}: waiting for the exits", file=sys.stderr, flush=True)
    last_end = release + 20 + min(n - 1, 40)
    while time.time() < last_end + 30:
        if Experiment.objects.filter(pk__in=batch, status__in=["Succeeded", "Failed", "Cancelled"]).count() == n:
            break
        time.sleep(0.5)
    rows = {
        str(pk): (status, fin)
        for pk, status, fin in Experiment.objects.filter(pk__in=batch).values_list("pk", "status", "finished_at")
    }
    now = time.time()
    lags = []
    for e in batch:
        status, finished = rows[e]
        if e in events.exited:
            lags.append((finished.timestamp() if status == "Succeeded" else now) - events.exited[e])
    if KEEP:
        times = {
            e: {
                "sent": sent[e],
                "started": events.started.get(e),
                "exited": events.exited.get(e),
                "finished": rows[e][1] and rows[e][1].timestamp(),
            }
            for e in batch
        }
        (KEEP / f"times-{n}.json").write_text(json.dumps(times))
    unfinished = [e for e in batch if rows[e][0] not in ("Succeeded", "Failed", "Cancelled")]
    for e in unfinished:
        try:
            cancel(Experiment.objects.get(pk=e))
        except Exception:  # it ended meanwhile
            pass
    changed = logs.stats_since(steady["end"], None, engine_id) if steady else []
    # The bare run again once the round's containers are gone: the pipeline phase is timed
    # between two bare runs, so a machine whose speed drifts over minutes (a shared VM) weighs on
    # both sides alike, not on whichever phase it happened to slow.
    deadline = time.time() + 60
    while client.api.containers(all=True, filters={"label": LABEL}) and time.time() < deadline:
        time.sleep(0.5)
    wait_until_quiet(f"the second bare run of {n}")
    print(f"watch_scale: N={n}: bare docker run -d again", file=sys.stderr, flush=True)
    bare_after = bare_run(image, n, at_once)
    remove_containers(client, BARE_LABEL)
    starts = [events.started[e] - sent[e] for e in batch if e in events.started]
    return {
        "bare_s": bare,
        "bare_after_s": bare_after,
        "bare_cpu": bare_cpu,
        "pipeline_cpu": pipeline_cpu,
        "delivered_s": delivered,
        "steps": step_times(batch, sent, events.started),
        "pipeline_s": (last_start - t0) if last_start and len(starts) == n else None,
        "started": len(starts),
        "submit_to_start_median_s": statistics.median(starts) if starts else None,
        "exit_to_succeeded_p99_s": percentile(lags, 99) if lags else None,
        "exit_to_succeeded_max_s": max(lags) if lags else None,
        "exits_seen": len(lags),
        "not_succeeded": sum(1 for e in batch if rows[e][0] != "Succeeded"),
        "steady": steady,
        "changed": [line for line in changed if line["changes"] > 0],
        "rss_mib": peak_rss_mib(watchers),
    }


def step_times(batch: list[str], sent: dict[str, float], started: dict[str, float]) -> dict[str, float]:
    """Median seconds per experiment: waiting for a pipeline thread (delivery → Cloning), each
    step, and Submitting's start → the container's start (the daemon's event)."""
    from experiments.models import Step

    steps: dict[str, dict[str, tuple]] = {}
    for pk, name, began, ended in Step.objects.filter(
        experiment_id__in=batch, name__in=["Cloning", "Building", "Submitting"]
    ).values_list("experiment_id", "name", "started_at", "ended_at"):
        steps.setdefault(str(pk), {})[name] = (began and began.timestamp(), ended and ended.timestamp())
    spans: dict[str, list[float]] = {"queued": [], "Cloning": [], "Building": [], "Submitting": []}
    for e in batch:
        mine = steps.get(e, {})
        if mine.get("Cloning", (None,))[0]:
            spans["queued"].append(mine["Cloning"][0] - sent[e])
        for name in ("Cloning", "Building"):
            began, ended = mine.get(name, (None, None))
            if began and ended:
                spans[name].append(ended - began)
        began = mine.get("Submitting", (None,))[0]
        if began and e in started:
            spans["Submitting"].append(started[e] - began)
    return {name: statistics.median(values) for name, values in spans.items() if values}


# --- Report -------------------------------------------------------------------------------
def report(results: dict[int, dict]) -> None:
    def fmt(value, unit: str = " s") -> str:
        return "n/a" if value is None else f"{value:.2f}{unit}"

    print("watch_scale")
    sizes = sorted(results)
    idle = {}
    for n in sizes:
        r = results[n]
        print(f" N={n}: {r['started']} of {n} started, {n - r['not_succeeded']} Succeeded")
        p99 = r["exit_to_succeeded_p99_s"]
        figure(
            f"N={n} exit -> Succeeded p99 (max {fmt(r['exit_to_succeeded_max_s'])}, {r['exits_seen']} exits)",
            fmt(p99),
            f"<= {NOTICE_P99_S} s",
            p99 is not None and p99 <= NOTICE_P99_S and r["exits_seen"] == n and r["not_succeeded"] == 0,
        )
        bare = (r["bare_s"] + r["bare_after_s"]) / 2
        figure(
            f"N={n} bare docker run -d of N, before / after the pipeline",
            f"{r['bare_s']:.2f} / {r['bare_after_s']:.2f} s",
        )
        figure(f"N={n} submit -> last container started", fmt(r["pipeline_s"]))
        pipeline = r["pipeline_s"]
        ratio, ratio_before = (pipeline / bare, pipeline / r["bare_s"]) if pipeline else (None, None)
        figure(
            f"N={n} submit -> last start, ratio to bare (mean of before and after)",
            fmt(ratio, "x"),
            f"<= {RATIO_TARGET}x",
            ratio is not None and ratio <= RATIO_TARGET,
        )
        figure(f"N={n}   ratio to the bare run before alone", fmt(ratio_before, "x"))
        # Where the time goes (information: read it when the ratio misses).
        figure(f"N={n} webhook deliveries of N, one after another", fmt(r["delivered_s"]))
        figure(f"N={n} submit -> container start, median per experiment", fmt(r["submit_to_start_median_s"]))
        for name, seconds in r["steps"].items():
            figure(f"N={n} median {'waiting for a pipeline thread' if name == 'queued' else name}", fmt(seconds))
        for phase in ("bare_cpu", "pipeline_cpu"):
            shares = r[phase]
            wall = shares.pop("wall")
            parts = ", ".join(f"{role} {cpu:.1f}" for role, cpu in shares.items() if role != "machine")
            figure(
                f"N={n} CPU s, {'bare run' if phase == 'bare_cpu' else 'pipeline'} ({wall:.0f} s): machine",
                f"{shares['machine']:.1f}",
            )
            print(f"    of which {parts}")
        steady = r["steady"]
        quiet = [line for line in (steady or {}).get("lines", []) if line["changes"] == 0]
        idle[n] = (median_of(quiet, "docker_calls"), median_of(quiet, "queries"))
        print(
            f"  steady phase: {fmt(steady and steady['seconds'])}, {len(quiet)} quiet intervals, median "
            f"docker_calls {idle[n][0]}, queries {idle[n][1]}, "
            f"experiments {median_of(quiet, 'experiments')}, seconds {median_of(quiet, 'seconds')}"
        )
        figure(f"N={n} watcher intervals with no change", str(len(quiet)), ">= 1", bool(quiet))
        calls = idle[n][0]
        extra = [line["docker_calls"] - calls - line["changes"] for line in r["changed"]] if calls is not None else []
        per_change_queries = (
            max((line["queries"] - idle[n][1]) / line["changes"] for line in r["changed"]) if extra else None
        )
        figure(f"N={n} max extra queries per change ({len(r['changed'])} intervals)", fmt(per_change_queries, ""))
        figure(
            f"N={n} Docker calls beyond one per change",
            fmt(max(extra) if extra else None, ""),
            f"<= {CALLS_SLACK}",
            bool(extra) and max(extra) <= CALLS_SLACK,
        )
    first = sizes[0]
    for n in sizes[1:]:
        for k, name in enumerate(("docker_calls", "queries")):
            a, b = idle[first][k], idle[n][k]
            figure(
                f"N={n} {name} per quiet interval vs N={first}",
                f"{b} vs {a}",
                f"<= +{CALLS_SLACK}",
                a is not None and b is not None and b <= a + CALLS_SLACK,
            )
    top = results[sizes[-1]]
    cpu = top["steady"]["cpu_percent"] if top["steady"] else None
    figure(
        f"N={sizes[-1]} watch worker CPU, steady phase",
        fmt(cpu, " %"),
        f"<= {CPU_TARGET} %",
        cpu is not None and cpu <= CPU_TARGET,
    )
    figure(
        f"N={sizes[-1]} watch worker peak RSS",
        fmt(top["rss_mib"], " MiB"),
        f"<= {RSS_TARGET_MB * 1e6 / MiB:.0f} MiB",
        top["rss_mib"] * MiB <= RSS_TARGET_MB * 1e6,
    )


if __name__ == "__main__":
    main()
    sys.exit(exit_status())
