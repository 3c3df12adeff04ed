"""Every runtime of SPEC §3 on the Kubernetes engine, end to end: a signed push → clone → a real
build pushed to a real registry → the operator's objects through the official `kubernetes`
client → Succeeded. No cluster can run here: the API server is the fake of tests/k8s/ (every
object validated against the upstream schemas, every pod a real Docker container), and its
operators inject what the real ones do (shared/k8s/STATUS.md), no more."""

import pytest
from kubernetes import client as k8s

from experiments import logs
from experiments.models import Status
from tests.experiments.test_pipeline_kubernetes import k8s_project, namespace_pods, registry, run  # noqa: F401
from tests.helpers import wait_for
from tests.k8s.conftest import fake_k8s, fake_k8s_server, kube_api, kubeconfig  # noqa: F401 (fixtures)

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.docker]

RES = "      resources:\n        cpus: 1\n        ramRatio: 1\n"


def text(experiment, process: str) -> str:
    return logs.log_text(experiment.pk, f"process:{process}")


def claims(api, namespace: str) -> list[str]:
    return [c.metadata.name for c in k8s.CoreV1Api(api).list_namespaced_persistent_volume_claim(namespace).items]


def test_jax_workers_reach_one_coordinator_and_get_their_process_ids(
    client,
    k8s_project,  # noqa: F811
    git_repo,
    docker_client,
    celery_worker_thread,
    fake_k8s,  # noqa: F811
):
    # Process 0 listens where every process is told the coordinator is; process 1 reaches it
    # there by name (the JobSet's pod hostname under its headless Service's subdomain).
    command = (
        'echo "$JAXOPERATOR_COORDINATOR_ADDRESS $JAXOPERATOR_PROCESS_ID/$JAXOPERATOR_NUM_PROCESSES"; '
        'port="${JAXOPERATOR_COORDINATOR_ADDRESS##*:}"; '
        'if [ "$JAXOPERATOR_PROCESS_ID" = 0 ]; then '
        'nc -l -p "$port" -e sh -c \'read line; echo "$line" > /tmp/got\'; echo "coordinator got: $(cat /tmp/got)"; '
        'else until echo "hello from $JAXOPERATOR_PROCESS_ID" | nc -w 2 "$JAXOPERATOR_COORDINATOR_HOST" "$port"; '
        "do sleep 0.2; done; fi"
    )
    types = f"    worker:\n      count: 2\n{RES}"
    experiment = run(client, k8s_project, git_repo, command, operator="jax", types=types)
    assert experiment.status == Status.SUCCEEDED, experiment.failure_reason
    first, second = text(experiment, "worker-0").splitlines(), text(experiment, "worker-1").splitlines()
    address = first[0].split()[0]
    assert address.endswith(".exp-" + str(experiment.pk).replace("-", "")[:12] + ":1234"), address
    # Membership, not position: a container's stdout and stderr are copied to its log by two
    # readers, so rank 1's first `nc` refusal (stderr) may be stored before its echo (stdout).
    assert first[0] == f"{address} 0/2" and f"{address} 1/2" in second
    assert "coordinator got: hello from 1" in first


def test_xgboost_worker_form_ranks_worker_0_as_the_master(
    client,
    k8s_project,  # noqa: F811
    git_repo,
    docker_client,
    celery_worker_thread,
    fake_k8s,  # noqa: F811
):
    types = f"    worker:\n      count: 2\n{RES}"
    experiment = run(
        client,
        k8s_project,
        git_repo,
        'echo "rank=$RANK world=$WORLD_SIZE master=${MASTER_ADDR##*-}"',
        operator="xgboost",
        types=types,
    )
    assert experiment.status == Status.SUCCEEDED, experiment.failure_reason
    # The operator injects them: worker 0 is the XGBoostJob's Master replica.
    assert text(experiment, "worker-0").strip() == "rank=0 world=2 master=0"
    assert text(experiment, "worker-1").strip() == "rank=1 world=2 master=0"


def test_pytorch_worker_form_of_three_meets_at_worker_0(
    client,
    k8s_project,  # noqa: F811
    git_repo,
    docker_client,
    celery_worker_thread,
    fake_k8s,  # noqa: F811
):
    # A Worker-only PyTorchJob: the training operator injects only PET_NNODES (and no RANK or
    # MASTER_ADDR, as v1.9.4 does without a Master spec); aichor's variables name worker 0,
    # which every rank really reaches on MASTER_ADDR:MASTER_PORT.
    command = (
        'echo "rank=$RANK world=$WORLD_SIZE nnodes=$PET_NNODES"; '
        'if [ "$RANK" = 0 ]; then '
        'nc -ll -p "$MASTER_PORT" -e sh -c \'read line; echo "$line" >> /tmp/got\' & '
        'until [ "$(cat /tmp/got 2>/dev/null | wc -l)" -ge 2 ]; do sleep 0.1; done; sort /tmp/got; '
        # nc's "connection refused" while worker 0 starts listening goes to stderr, which the
        # runtime copies on a goroutine of its own: it may be stamped before the first echo.
        'else until echo "rank $RANK was here" | nc -w 2 "$MASTER_ADDR" "$MASTER_PORT" 2>/dev/null; do sleep 0.2; done; fi'
    )
    types = f"    worker:\n      count: 3\n{RES}"
    experiment = run(client, k8s_project, git_repo, command, operator="pytorch", types=types)
    assert experiment.status == Status.SUCCEEDED, experiment.failure_reason
    printed = {name: text(experiment, name).splitlines() for name in ("worker-0", "worker-1", "worker-2")}
    assert [lines[0] for lines in printed.values()] == [f"rank={r} world=3 nnodes=3" for r in range(3)]
    assert printed["worker-0"][1:] == ["rank 1 was here", "rank 2 was here"]


def test_kuberay_submitter_runs_the_entrypoint(
    client,
    k8s_project,  # noqa: F811
    git_repo,
    docker_client,
    celery_worker_thread,
    kube_api,  # noqa: F811
):
    types = (
        "    Head:\n      resources:\n        cpus: 1\n        ramRatio: 1\n"
        "      rayStartParams:\n        num-cpus: 0\n"
        "    Workers:\n      - name: small\n        count: 1\n        resources: {cpus: 1, ramRatio: 1}\n"
    )
    experiment = run(
        client, k8s_project, git_repo, "echo entrypoint ran; echo to stderr >&2", operator="kuberay", types=types
    )
    assert experiment.status == Status.SUCCEEDED, experiment.failure_reason
    # Created, hence valid against KubeRay's CRD schema; the submitter's log is the driver's.
    assert "created RayJob" in logs.log_text(experiment.pk, "step:Submitting")
    assert sorted(text(experiment, "submitter").splitlines()) == ["entrypoint ran", "to stderr"]
    wait_for(lambda: namespace_pods(kube_api, k8s_project.namespace) == {}, timeout=60, message="the Ray pods to go")


def test_a_shared_volume_carries_a_file_from_one_group_to_another_then_goes(
    client,
    k8s_project,  # noqa: F811
    git_repo,
    docker_client,
    celery_worker_thread,
    kube_api,  # noqa: F811
):
    types = f"    writer:\n      count: 1\n{RES}    reader:\n      count: 1\n{RES}"
    command = (
        'if [ "$REPLICATED_JOB_NAME" = writer ]; then echo "written by $REPLICATED_JOB_NAME" > /data/shared/f; '
        "else until [ -s /data/shared/f ]; do sleep 0.2; done; cat /data/shared/f; fi"
    )
    storage = "  storage:\n    sharedVolume:\n      mountPoint: /data/shared\n      sizeGB: 1\n"
    experiment = run(client, k8s_project, git_repo, command, operator="jobset", types=types, extra_spec=storage)
    assert experiment.status == Status.SUCCEEDED, experiment.failure_reason
    assert text(experiment, "reader-0-0").strip() == "written by writer"
    # Deleted with the experiment's top object (its owner).
    wait_for(lambda: claims(kube_api, k8s_project.namespace) == [], timeout=60, message="the shared volume to go")


def test_an_attached_pvc_is_mounted_at_its_mount_point_and_outlives_the_run(
    client,
    admin_user,
    k8s_project,  # noqa: F811
    git_repo,
    docker_client,
    celery_worker_thread,
    kube_api,  # noqa: F811
):
    from django.test import Client

    # The project's claim, made as an admin makes it: the PVC page creates it on the cluster.
    admin = Client()
    admin.force_login(admin_user)
    form = {
        "name": "datasets",
        "size_mib": 1024,
        "engine": k8s_project.default_engine.pk,
        "access_mode": "ReadWriteOnce",
    }
    response = admin.post(f"/p/{k8s_project.slug}/pvcs/", form)
    assert response.status_code == 302, response.content.decode()[-2000:]
    assert claims(kube_api, k8s_project.namespace) == ["datasets"]
    storage = "  storage:\n    attachExistingPVCs:\n      - name: datasets\n        mountPoint: /mnt/datasets\n"
    first = run(client, k8s_project, git_repo, "echo kept > /mnt/datasets/f && echo wrote", extra_spec=storage)
    assert first.status == Status.SUCCEEDED, first.failure_reason
    second = run(client, k8s_project, git_repo, "cat /mnt/datasets/f", extra_spec=storage)
    assert second.status == Status.SUCCEEDED, second.failure_reason
    assert text(second, "worker-0").strip() == "kept"
    assert claims(kube_api, k8s_project.namespace) == ["datasets"]  # the project's, not the run's


def test_quiet_processes_cost_no_log_request_per_poll(
    client,
    k8s_project,  # noqa: F811
    git_repo,
    docker_client,
    celery_worker_thread,
    fake_k8s,  # noqa: F811
    settings,
):
    from experiments.models import StepName

    # Four processes print, stay quiet for 6 s, print again: the watcher polls every 0.1 s.
    types = f"    trainer:\n      count: 4\n{RES}"
    command = "echo start $JOB_INDEX; sleep 6; echo end $JOB_INDEX"
    experiment = run(client, k8s_project, git_repo, command, operator="jobset", types=types)
    assert experiment.status == Status.SUCCEEDED, experiment.failure_reason
    for index in range(4):
        assert text(experiment, f"trainer-{index}-0") == f"start {index}\nend {index}\n"
    step = experiment.steps.get(name=StepName.RUNNING)
    seconds = (step.ended_at - step.started_at).total_seconds()
    requests = list(fake_k8s.request_log)
    log_reads = [r for r in requests if r[0] == "GET" and r[1].endswith("/log")]
    pod_lists = [r for r in requests if r[0] == "GET" and r[1] == "/api/v1/pods" and "watch=" not in r[2]]
    pod_watches = [r for r in requests if r[0] == "GET" and r[1] == "/api/v1/pods" and "watch=true" in r[2]]
    polls = seconds / settings.WATCH_POLL_SECONDS
    assert polls > 50
    # The states of every poll come from one watch of the labelled pods (its list, then its
    # request), not a list per poll; each process's log is one followed request for its whole
    # run (read every poll, they would be 4 per poll), and at most one final read each.
    assert len(pod_lists) == 1 and len(pod_watches) == 1, (pod_lists, pod_watches)
    assert len(log_reads) <= 4 * 2, (log_reads, polls, seconds)


def test_a_burst_and_an_unfinished_last_line_are_stored_whole(
    client,
    k8s_project,  # noqa: F811
    git_repo,
    docker_client,
    celery_worker_thread,
    fake_k8s,  # noqa: F811
):
    # Read through the followed log stream while it runs (several reads' worth at once), then
    # the last line, which has no line break, by the final read.
    command = "sleep 2; seq 1 40000; sleep 2; printf tail"
    experiment = run(client, k8s_project, git_repo, command)
    assert experiment.status == Status.SUCCEEDED, experiment.failure_reason
    expected = "".join(f"{i}\n" for i in range(1, 40001)) + "tail"
    assert text(experiment, "worker-0") == expected


def test_legacy_tf_replicas_get_their_tf_config_from_the_operator(
    client,
    k8s_project,  # noqa: F811
    git_repo,
    docker_client,
    celery_worker_thread,
    fake_k8s,  # noqa: F811
):
    import json

    types = f"    Chief:\n      count: 1\n{RES}    Worker:\n      count: 2\n{RES}"
    experiment = run(client, k8s_project, git_repo, 'echo "$TF_CONFIG"', operator="tf", types=types)
    assert experiment.status == Status.SUCCEEDED, experiment.failure_reason
    configs = {name: json.loads(text(experiment, name)) for name in ("chief-0", "worker-0", "worker-1")}
    for name, config in configs.items():
        kind, index = name.split("-")
        assert config["task"] == {"type": kind, "index": int(index)}
        assert [len(config["cluster"][t]) for t in ("chief", "worker")] == [1, 2]
    assert configs["worker-1"]["cluster"]["worker"][1].startswith(f"exp-{str(experiment.pk).replace('-', '')[:12]}-")
