"""The Kubernetes engine behind the researcher's tools: the terminal (the API server's exec),
port-forward (its port-forward), the debug hold, and reconcile finding a run by its labels.
No cluster can run here: the API server is the fake of tests/k8s/, its pods real containers."""

import asyncio

import pytest
from kubernetes import client as k8s

from experiments import logs, services
from experiments.engines import get_engine
from experiments.manifest import parse_manifest
from experiments.models import Experiment, Status, StepName
from experiments.pipeline import reconcile
from experiments.workload import build_workload
from projects.services import create_api_token
from tests.experiments import test_portforward as portforward
from tests.experiments.test_pipeline_kubernetes import k8s_project, namespace_pods, registry  # noqa: F401
from tests.experiments.test_terminal import open_terminal, read_until, start_running_experiment
from tests.experiments.test_terminal import run as run_async
from tests.helpers import TEST_IMAGE, ended, manifest_yaml, push, wait_for
from tests.k8s.conftest import fake_k8s, fake_k8s_server, kube_api, kubeconfig  # noqa: F401 (fixtures)

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.docker]


def all_running(experiment: Experiment) -> bool:
    states = get_engine(experiment.engine).status(experiment.handle)
    return bool(states) and all(state.phase == "running" for state in states)


@pytest.fixture
def on_cluster(k8s_project, fake_k8s):  # noqa: F811
    started = []

    def start(**kwargs) -> Experiment:
        experiment = start_running_experiment(k8s_project, k8s_project.default_engine, **kwargs)
        started.append(experiment)
        wait_for(lambda: all_running(experiment), timeout=60, message="the pods to run")
        return experiment

    yield start
    for experiment in started:
        get_engine(experiment.engine).cleanup_experiment(str(experiment.pk))


def test_the_terminal_opens_a_shell_in_the_pod_of_the_chosen_process(on_cluster, member_user):
    experiment = on_cluster(processes=("worker-0", "worker-1"))

    async def scenario() -> bytes:
        comm = await open_terminal(experiment.pk, member_user, "worker-1")
        # RANK comes from the pod's replica-index label: the shell is in worker 1's pod.
        await comm.send_to(bytes_data=b"echo $((6*7))-rank$RANK\n")
        out = await read_until(comm, rb"42-rank\d")
        await comm.disconnect()
        return out

    assert b"42-rank1" in run_async(scenario)


def test_port_forward_reaches_a_port_of_the_pod(on_cluster, member_user):
    experiment = on_cluster(commands={"worker-0": portforward.SHOUT.format(port=8080), "worker-1": "sleep 600"})
    token = create_api_token(member_user)

    def shouted() -> bytes:
        ws = portforward.communicator(experiment.pk, 8080, token, query="process=worker-0")
        received, _closed = asyncio.run(portforward.exchange(ws, b"through the api server\n", expect=23))
        return received

    # Until nc listens, the tunnel closes as unreachable; then the bytes come back shouted.
    assert wait_for(lambda: shouted() == b"THROUGH THE API SERVER\n", timeout=30, message="the listener")


def test_a_closed_port_of_the_pod_is_reported_unreachable(on_cluster, member_user):
    experiment = on_cluster(processes=("worker-0",))
    ws = portforward.communicator(experiment.pk, 9, create_api_token(member_user))
    received, closed = asyncio.run(portforward.exchange(ws, b"anyone?\n"))
    assert received == b"" and closed["code"] == portforward.CLOSE_UNREACHABLE


def test_hold_on_failure_keeps_the_pods_until_released(
    client,
    k8s_project,  # noqa: F811
    git_repo,
    docker_client,
    celery_worker_thread,
    kube_api,  # noqa: F811
    member_user,
):
    command = 'if [ "$RANK" = 0 ]; then echo crash-report; exit 4; else sleep 600; fi'
    types = "    worker:\n      count: 2\n      resources:\n        cpus: 1\n        ramRatio: 1\n"
    hold = "  debug:\n    holdOnFailure: 10m\n"
    experiment_id = push(client, k8s_project, git_repo, command, operator="pytorch", types=types, extra_spec=hold)
    experiment = wait_for(
        lambda: Experiment.objects.filter(pk=experiment_id, hold_until__isnull=False).first(),
        timeout=180,
        message="the failed experiment to be held",
    )
    assert experiment.status == Status.FAILED and experiment.exit_code == 4
    assert logs.log_text(experiment_id, "process:worker-0") == "crash-report\n"
    # The failed pod stays for kubectl describe/logs; the rank still running opens in the terminal.
    phases = sorted(namespace_pods(kube_api, k8s_project.namespace).values())
    assert phases == ["Failed", "Running"]

    async def inspect() -> bytes:
        comm = await open_terminal(experiment_id, member_user, "worker-1")
        await comm.send_to(bytes_data=b"echo still-$RANK\n")
        out = await read_until(comm, rb"still-1")
        await comm.disconnect()
        return out

    assert b"still-1" in run_async(inspect)
    assert services.release_hold(experiment_id, actor=member_user)
    wait_for(lambda: namespace_pods(kube_api, k8s_project.namespace) == {}, timeout=60, message="the held pods to go")


def test_reconcile_finds_a_run_whose_handle_was_lost_by_its_labels(
    k8s_project,  # noqa: F811
    docker_client,
    kube_api,  # noqa: F811
    request,
):
    engine_model = k8s_project.default_engine
    types = "    worker:\n      count: 2\n      resources:\n        cpus: 1\n        ramRatio: 1\n"
    manifest = parse_manifest(manifest_yaml('echo "found rank $RANK"', operator="pytorch", types=types))
    experiment = services.create_experiment(project=k8s_project, engine=engine_model, manifest_path="m.yaml")
    for step in (StepName.CLONING, StepName.BUILDING, StepName.SUBMITTING):
        assert services.begin_step(experiment.pk, step)
    Experiment.objects.filter(pk=experiment.pk).update(manifest=manifest.to_dict(), image=TEST_IMAGE)
    engine = get_engine(engine_model)
    workload = build_workload(Experiment.objects.get(pk=experiment.pk), path_of=engine.volume_path)
    # The submit task dies right after the engine took the workload: no handle is recorded.
    handle = engine.submit(workload, log=lambda _: None)
    assert services.record_submission(experiment.pk, {}, None, {})
    assert services.begin_step(experiment.pk, StepName.RUNNING)

    assert get_engine(engine_model).find(str(experiment.pk)) == handle
    # The workers start now: the clone task create_experiment enqueued was dropped with the
    # broker's queues, as a crash would have lost it.
    request.getfixturevalue("celery_worker_thread")
    reconcile(stale_seconds=0)
    finished = ended(experiment.pk, timeout=120)
    assert finished.status == Status.SUCCEEDED, finished.failure_reason
    assert finished.handle == handle
    assert logs.log_text(experiment.pk, "process:worker-1") == "found rank 1\n"
    wait_for(lambda: namespace_pods(kube_api, k8s_project.namespace) == {}, timeout=60, message="the pods to go")
    assert k8s.CoreV1Api(kube_api).list_namespaced_service(k8s_project.namespace).items == []


def test_a_pod_waiting_for_gpus_reports_the_schedulers_reason(k8s_project, fake_k8s):  # noqa: F811
    # The engine's side of the Running step's explanation (the watcher writes it there).
    fake_k8s.kubelet.node_labels["nvidia.com/gpu.product"] = "NVIDIA-A100-SXM4-80GB"
    types = (
        "    worker:\n      count: 1\n      resources:\n        cpus: 1\n        ramRatio: 1\n"
        "        accelerators:\n          gpu:\n            count: 1\n            type: gpu\n"
        "            product: NVIDIA-A100-SXM4-80GB\n"
    )
    manifest = parse_manifest(manifest_yaml("nvidia-smi", types=types))
    experiment = services.create_experiment(project=k8s_project, engine=k8s_project.default_engine, manifest_path="m")
    Experiment.objects.filter(pk=experiment.pk).update(manifest=manifest.to_dict(), image=TEST_IMAGE)
    engine = get_engine(k8s_project.default_engine)
    workload = build_workload(Experiment.objects.get(pk=experiment.pk), path_of=engine.volume_path)
    handle = engine.submit(workload, log=lambda _: None)
    try:
        waiting = wait_for(
            lambda: [s for s in engine.states({experiment.pk: handle})[experiment.pk] if s.reason],
            timeout=30,
            message="the pod's waiting reason",
        )
        assert waiting[0].phase == "pending"
        assert waiting[0].reason.startswith("unschedulable: ") and "Insufficient nvidia.com/gpu" in waiting[0].reason
    finally:
        engine.cleanup(handle)


def test_log_reads_are_bounded_per_second_and_reach_every_process(on_cluster, fake_k8s):  # noqa: F811
    import time

    from experiments.engines.kubernetes import KubernetesEngine

    names = [f"worker-{rank}" for rank in range(4)]
    experiment = on_cluster(commands={name: "while :; do echo tick; sleep 0.05; done" for name in names})
    # The watcher's visits, every 0.1 s for 2 s, of four processes that always have output,
    # read by polling (no streams allowed: as past MAX_LOG_STREAMS open ones).
    engine = KubernetesEngine({**experiment.engine.config, "log_reads_per_second": 5, "log_streams": 0})
    handle, cursors, got = experiment.handle, {}, dict.fromkeys(names, 0)
    fake_k8s.request_log.clear()
    started = time.monotonic()
    while time.monotonic() - started < 2:
        engine.states({experiment.pk: handle})
        for name in names:
            lines, cursors[name] = engine.follow(handle, name, cursors.get(name))
            got[name] += len(lines)
        time.sleep(0.1)  # the poll interval being simulated, not a wait for a condition
    reads = [r for r in fake_k8s.request_log if r[1].endswith("/log")]
    # Unbounded, that is 4 reads per visit (80); bounded, 5 per second after a burst of 10.
    assert len(reads) <= 10 + 5 * 2 + 1, len(reads)
    assert all(got.values()), got


def test_each_running_process_is_followed_through_one_log_request(on_cluster, fake_k8s):  # noqa: F811
    import time

    names = [f"worker-{rank}" for rank in range(3)]
    counter = "i=0; while :; do i=$((i+1)); echo tick $i; sleep 0.02; done"
    experiment = on_cluster(commands={name: counter for name in names})
    engine = get_engine(experiment.engine)
    handle, cursors, got = experiment.handle, {}, {name: [] for name in names}

    def visit_for(seconds: float) -> None:
        """The watcher's visits, every 0.1 s: states, then each process's new lines."""
        started = time.monotonic()
        while time.monotonic() - started < seconds:
            engine.states({experiment.pk: handle})
            for name in names:
                lines, cursors[name] = engine.follow(handle, name, cursors.get(name))
                got[name] += lines
            time.sleep(0.1)  # the poll interval being simulated, not a wait for a condition

    fake_k8s.request_log.clear()
    visit_for(2)
    reads = [r for r in fake_k8s.request_log if r[1].endswith("/log")]
    # Twenty visits of three processes printing 50 lines a second: one followed request each.
    assert len(reads) == 3 and all("follow=true" in query for _, _, query in reads), reads
    # The watcher stops following (its slice ended) and a later one goes on from the cursors:
    # a new request from the cursor's second, which repeats none of the stored lines.
    engine.unfollow(handle)
    visit_for(1.5)
    for name in names:
        ticks = [int(line.split()[1]) for line in got[name]]
        assert len(ticks) > 50 and ticks == list(range(1, len(ticks) + 1)), (name, ticks[:5], len(ticks))
    assert len([r for r in fake_k8s.request_log if r[1].endswith("/log")]) == 6
