"""The Kubernetes engine against the fake API server of tests/k8s/ (no cluster can run here):
the real pipeline's Submitting step (experiments.pipeline.run.submit) and the real engine
watcher (experiments.pipeline.watcher.Watcher), driven in this process on their own database,
with the fake server's threads beside them.

1. Submit of a 64-worker jobset (its image prebuilt: the build is not Kubernetes' part), on a
   cluster with the operators but no kubelet (the 64 pods stay Pending): the API calls aichor
   makes, the objects on the cluster once the operator has made its own, and aichor's time.
   aichor's time is the CPU time of the submitting thread (time.thread_time): the fake server
   works on its own threads, so its processing is not counted, nor the wait for it; the wall
   time is printed beside it.
2. N = 1 and N = 10 `batch` experiments of `sleep` (60 s at N = 1, 20 s at N = 10), with kubelet
   and operators (each pod a real Docker container), from submit to Succeeded: the watcher's API
   calls per interval (INTERVAL, AICHOR_WATCH_POLL_SECONDS' default) while nothing changes, the
   pod lists per interval (a list of pods, whichever namespace; the pod watch's requests are
   counted apart, one per reconnect), and every call per experiment per minute at N = 1 (the
   stop task's cleanup is run inline after Succeeded and counted apart: no broker here).
   N = 1 runs a minute, the target's unit: a run of 20 s would be charged its fixed costs (the
   submit's creations, the watch's list and request, the log stream: 5 calls at the least)
   three times over.

Targets: submit ≤ 1 s of aichor time; the submit's calls independent of the worker count
(≤ 5); at most one pod list per interval; the watcher's calls per quiet interval the same at
N = 10 as at N = 1; ≤ 10 calls per experiment per minute at N = 1.
BENCH_K8S_RUN_SECONDS sets how long every workload runs instead."""

import os
import statistics
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench._common import exit_status, figure, scratch_dir, setup_django  # noqa: E402

WORKERS = 64
SIZES = (1, 10)
INTERVAL = 0.5  # settings.WATCH_POLL_SECONDS' default (bench/_common sets 0.05 for the others)
RUN_SECONDS = {1: 60, 10: 20}
if os.environ.get("BENCH_K8S_RUN_SECONDS"):
    RUN_SECONDS = dict.fromkeys(SIZES, int(os.environ["BENCH_K8S_RUN_SECONDS"]))
SUBMIT_CPU_TARGET_S = 1.0
SUBMIT_CALLS_TARGET = 5
CALLS_PER_MINUTE_TARGET = 10.0


def is_pod_list(method: str, path: str, query: str) -> bool:
    return method == "GET" and path.endswith("/pods") and "watch=" not in query


def is_pod_watch(method: str, path: str, query: str) -> bool:
    return method == "GET" and path.endswith("/pods") and "watch=" in query


def engine_for(cluster, tmp: Path):
    from experiments.limits import MAX_RUNNING
    from projects.models import Engine
    from projects.services import create_project

    suffix = uuid.uuid4().hex[:8]
    kubeconfig = cluster.write_kubeconfig(tmp / f"kubeconfig-{suffix}")
    engine = Engine.objects.create(
        name=f"bench-k8s-{suffix}",
        kind=Engine.Kind.KUBERNETES,
        config={"kubeconfig": str(kubeconfig), "registry": "127.0.0.1:5000", MAX_RUNNING: 100},
    )
    project = create_project(name=f"K8s {suffix}", slug=f"k8s-{suffix}", engines=[engine], default_engine=engine)
    return engine, project


def ready_to_submit(project, text: str):
    """An experiment at Submitting, its manifest validated and its image the prebuilt one, moved
    there by the services the clone and build steps call."""
    from experiments import services
    from experiments.manifest import parse_manifest
    from experiments.models import StepName
    from experiments.pipeline.common import enter
    from experiments.services import create_experiment
    from tests.helpers import TEST_IMAGE

    experiment = create_experiment(project=project, manifest_path="manifest.yaml")
    assert services.begin_step(experiment.pk, StepName.CLONING), "no slot"
    services.record_manifest(experiment.pk, parse_manifest(text, known_pvcs=set()), text)
    services.begin_step(experiment.pk, StepName.BUILDING)
    services.record_image(experiment.pk, TEST_IMAGE)
    return enter(experiment.pk, StepName.SUBMITTING)


def bench_submit(tmp: Path) -> None:
    from experiments import services
    from experiments.pipeline.run import run_submit
    from tests.helpers import manifest_yaml
    from tests.k8s.fake_api import FakeCluster
    from tests.k8s.fake_store import BY_KIND
    from tests.k8s.operators import Operators

    print(f"submit of a {WORKERS}-worker jobset (operators, no kubelet)", flush=True)
    cluster = FakeCluster()
    operators = Operators(cluster.store)
    try:
        engine, project = engine_for(cluster, tmp)
        types = f"    worker:\n      count: {WORKERS}\n      resources:\n        cpus: 1\n        ramRatio: 1\n"
        experiment = ready_to_submit(project, manifest_yaml("true", operator="jobset", types=types))
        # Held, so the submit's ensure_watcher enqueues no watcher (nothing consumes it here).
        services.take_watch(engine.pk, "bench")
        cluster.request_log.clear()
        wall, cpu = time.perf_counter(), time.thread_time()
        run_submit(experiment.pk)
        cpu, wall = time.thread_time() - cpu, time.perf_counter() - wall
        calls = list(cluster.request_log)
        experiment.refresh_from_db()
        assert experiment.current_step == "Running", experiment.failure_reason

        def on_cluster(kind: str) -> int:
            return len(cluster.store.list(BY_KIND[kind], project.namespace)[0])

        deadline = time.monotonic() + 60
        while on_cluster("Pod") < WORKERS and time.monotonic() < deadline:
            time.sleep(0.1)
        kinds = ("JobSet", "Job", "Pod", "Service", "Secret", "PersistentVolumeClaim")
        made = {kind: on_cluster(kind) for kind in kinds}
        posts = [path.rsplit("/", 1)[-1] for method, path, _ in calls if method == "POST"]
        figure("aichor's API calls for the submit", str(len(calls)), f"≤ {SUBMIT_CALLS_TARGET}", len(calls) <= 5)
        figure("  of which creations: " + ", ".join(posts), str(len(posts)), "", None)
        figure(
            "objects in the namespace: " + ", ".join(f"{k} {v}" for k, v in made.items() if v),
            str(sum(made.values())),
            f"{WORKERS} pods",
            made["Pod"] == WORKERS,
        )
        figure("submit, aichor's CPU time (s)", f"{cpu:.3f}", f"≤ {SUBMIT_CPU_TARGET_S}", cpu <= SUBMIT_CPU_TARGET_S)
        figure("submit, wall time with the fake's processing (s)", f"{wall:.3f}", "", None)
        services.release_watch(engine.pk, "bench")
    finally:
        operators.stop()
        cluster.close()


def bench_watch(n: int, tmp: Path, docker_client) -> dict:
    from experiments import services
    from experiments.models import Experiment, Status
    from experiments.pipeline import complete
    from experiments.pipeline.run import run_submit
    from experiments.pipeline.watcher import Watcher
    from tests.helpers import manifest_yaml
    from tests.k8s.fake_api import FakeCluster

    seconds = RUN_SECONDS[n]
    print(f"N = {n}: batch experiments of sleep {seconds}, submit to Succeeded", flush=True)
    cluster = FakeCluster(docker_client)
    stops: list = []
    enqueue = complete.enqueue
    complete.enqueue = lambda name, pk: stops.append(pk)  # the stop task, run inline below
    try:
        engine, project = engine_for(cluster, tmp)
        experiments = [ready_to_submit(project, manifest_yaml(f"sleep {seconds}")) for _ in range(n)]
        watcher = Watcher(engine)
        assert services.take_watch(engine.pk, watcher.owner)
        cluster.request_log.clear()
        started = time.monotonic()
        for experiment in experiments:
            run_submit(experiment.pk)
        submit_calls = len(cluster.request_log)
        quiet, pod_lists, intervals = [], [], 0
        while True:
            begun, mark, before = time.monotonic(), len(cluster.request_log), watcher.engine.calls()
            done = watcher.interval()
            intervals += 1
            window = cluster.request_log[mark:]
            pod_lists.append(sum(1 for call in window if is_pod_list(*call)))
            # Quiet: every experiment watched, nothing ended, no finisher calling meanwhile.
            if done.experiments == n and not done.changes and not watcher.finishing:
                quiet.append(watcher.engine.calls() - before)
            if not done.experiments:
                break
            if time.monotonic() - started > seconds + 180:
                raise RuntimeError("the experiments did not end")
            time.sleep(max(0.0, INTERVAL - (time.monotonic() - begun)))
        watcher.settle()
        elapsed = time.monotonic() - started
        to_succeeded = len(cluster.request_log)
        services.release_watch(engine.pk, watcher.owner)
        for experiment_id in stops:
            complete.stop(experiment_id)
        stop_calls = len(cluster.request_log) - to_succeeded
        statuses = set(Experiment.objects.filter(pk__in=[e.pk for e in experiments]).values_list("status", flat=True))
        watched = cluster.request_log[submit_calls:to_succeeded]
        log_reads = sum(1 for _, path, _ in watched if path.endswith("/log"))
        lists = sum(1 for call in watched if is_pod_list(*call))
        watches = sum(1 for call in watched if is_pod_watch(*call))
        figure("ended Succeeded", ",".join(sorted(statuses)), "Succeeded", statuses == {Status.SUCCEEDED})
        figure("pod lists per interval (max)", str(max(pod_lists)), "≤ 1", max(pod_lists) <= 1)
        figure("watcher's calls per quiet interval (median)", f"{statistics.median(quiet):g}", "", None)
        others = len(watched) - lists - watches - log_reads
        figure(
            "after the submit: pod lists, pod watches, log requests, others",
            f"{lists}, {watches}, {log_reads}, {others}",
            "",
            None,
        )
        per_experiment = to_succeeded / n
        per_minute = per_experiment / (elapsed / 60)
        figure("API calls per experiment, submit to Succeeded", f"{per_experiment:.0f}", "", None)
        figure(
            f"  over {elapsed:.0f} s, {intervals} intervals: per experiment per minute", f"{per_minute:.0f}", "", None
        )
        figure("stop task's cleanup calls per experiment", f"{stop_calls / n:.0f}", "", None)
        return {"quiet": statistics.median(quiet), "per_minute": per_minute}
    finally:
        complete.enqueue = enqueue
        cluster.reset()
        cluster.close()


def main() -> int:
    import docker

    from tests.helpers import ensure_test_image

    setup_django("aichor_bench_k8s")
    docker_client = docker.from_env()
    ensure_test_image(docker_client)
    tmp = scratch_dir("aichor-bench-k8s-")
    bench_submit(tmp)
    rounds = {n: bench_watch(n, tmp, docker_client) for n in SIZES}
    print("watch scale", flush=True)
    small, large = rounds[SIZES[0]], rounds[SIZES[-1]]
    figure(
        f"watcher's calls per quiet interval, N = {SIZES[-1]} vs N = {SIZES[0]}",
        f"{large['quiet']:g} vs {small['quiet']:g}",
        "equal",
        large["quiet"] == small["quiet"],
    )
    figure(
        f"API calls per experiment per minute at N = {SIZES[0]}",
        f"{small['per_minute']:.0f}",
        f"≤ {CALLS_PER_MINUTE_TARGET:g}",
        small["per_minute"] <= CALLS_PER_MINUTE_TARGET,
    )
    return exit_status()


if __name__ == "__main__":
    sys.exit(main())
