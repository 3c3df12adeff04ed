"""The fake Kubernetes cluster (no cluster can run here) through the REAL `kubernetes` client:
validation like the API server's, CRUD semantics, watches, deletion with owner references, and
the operators' and kubelet's stand-ins running pods as real Docker containers (logs, exec,
port-forward, scheduling)."""

import json
import threading
import time

import pytest
from kubernetes import client, watch
from kubernetes.client.rest import ApiException
from kubernetes.stream import portforward, stream

from tests.helpers import TEST_IMAGE, wait_for
from tests.k8s.kubelet import SERVER_LABEL

NS = "exp"


@pytest.fixture
def api(kube_api):
    core = client.CoreV1Api(kube_api)
    core.create_namespace({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}})
    return kube_api


def container(command: str, name: str = "main", **more) -> dict:
    # The test image is local only: "latest" would mean imagePullPolicy Always, and no registry
    # is reachable (the kubelet would report ErrImagePull, as a real one would).
    return {
        "name": name,
        "image": TEST_IMAGE,
        "imagePullPolicy": "IfNotPresent",
        "command": ["sh", "-c", command],
        **more,
    }


def pod_log(core, name: str, container_name: str | None = None) -> str:
    # `_preload_content=False`: client v36 returns the repr of the bytes otherwise
    # (kubernetes-client/python#2596).
    kwargs = {"container": container_name} if container_name else {}
    return core.read_namespaced_pod_log(name, NS, _preload_content=False, **kwargs).data.decode()


def error_body(exc: ApiException) -> dict:
    return json.loads(exc.body)


def containers_of_cluster(docker_client, fake_k8s) -> list:
    return docker_client.api.containers(all=True, filters={"label": f"{SERVER_LABEL}={fake_k8s.kubelet.server_id}"})


def condition_true(conditions, type_: str) -> bool:
    return any(c.type == type_ and c.status == "True" for c in conditions or [])


def test_an_invalid_object_is_refused_with_the_causes(api):
    batch = client.BatchV1Api(api)
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "Bad_Name"},
        "spec": {
            "template": {
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [{"name": "main", "imagePullPolicy": "IfNotPresent", "bogus": 1}],
                }
            }
        },
    }
    with pytest.raises(ApiException) as refused:
        batch.create_namespaced_job(NS, job)
    assert refused.value.status == 422
    body = error_body(refused.value)
    assert body["kind"] == "Status" and body["reason"] == "Invalid" and body["code"] == 422
    assert body["message"].startswith('Job.batch "Bad_Name" is invalid: ')
    fields = {c["field"] for c in body["details"]["causes"]}
    assert "metadata.name" in fields
    assert any(f.startswith("spec.template.spec.containers") for f in fields)
    assert all(c["message"] for c in body["details"]["causes"])
    # A custom resource against its CRD schema: replicas must be an integer.
    custom = client.CustomObjectsApi(api)
    jobset = {
        "apiVersion": "jobset.x-k8s.io/v1alpha2",
        "kind": "JobSet",
        "metadata": {"name": "js"},
        "spec": {
            "replicatedJobs": [
                {
                    "name": "w",
                    "replicas": "two",
                    "template": {"spec": {"template": {"spec": {"containers": [container("true")]}}}},
                }
            ]
        },
    }
    with pytest.raises(ApiException) as refused:
        custom.create_namespaced_custom_object("jobset.x-k8s.io", "v1alpha2", NS, "jobsets", jobset)
    assert refused.value.status == 422
    assert any(c["field"].startswith("spec.replicatedJobs") for c in error_body(refused.value)["details"]["causes"])
    assert not custom.list_namespaced_custom_object("jobset.x-k8s.io", "v1alpha2", NS, "jobsets")["items"]


def test_not_found_conflicts_and_resource_versions(api):
    core = client.CoreV1Api(api)
    with pytest.raises(ApiException) as missing:
        core.read_namespaced_pod("nope", NS)
    assert missing.value.status == 404
    assert error_body(missing.value) | {"metadata": {}} == {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": 'pods "nope" not found',
        "reason": "NotFound",
        "details": {"name": "nope", "kind": "pods"},
        "code": 404,
    }
    with pytest.raises(ApiException) as missing:
        client.BatchV1Api(api).read_namespaced_job("nope", NS)
    assert error_body(missing.value)["message"] == 'jobs.batch "nope" not found'
    cm = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}, "data": {"a": "1"}}
    first = core.create_namespaced_config_map(NS, cm)
    with pytest.raises(ApiException) as exists:
        core.create_namespaced_config_map(NS, cm)
    assert exists.value.status == 409 and error_body(exists.value)["reason"] == "AlreadyExists"
    second = core.patch_namespaced_config_map("c", NS, {"data": {"b": "2"}})
    assert int(second.metadata.resource_version) > int(first.metadata.resource_version)
    assert second.data == {"a": "1", "b": "2"}
    stale = {**cm, "metadata": {"name": "c", "resourceVersion": first.metadata.resource_version}}
    with pytest.raises(ApiException) as conflict:
        core.replace_namespaced_config_map("c", NS, stale)
    assert conflict.value.status == 409 and error_body(conflict.value)["reason"] == "Conflict"
    fresh = {**cm, "metadata": {"name": "c", "resourceVersion": second.metadata.resource_version}}
    assert core.replace_namespaced_config_map("c", NS, fresh).data == {"a": "1"}
    with pytest.raises(ApiException) as no_namespace:
        core.create_namespaced_config_map("ghost", cm)
    assert no_namespace.value.status == 404
    # A built-in kind's type comes from the URL when the body leaves it out, as a model does.
    typed = client.V1ConfigMap(metadata=client.V1ObjectMeta(name="typed"), data={"k": "v"})
    assert core.create_namespaced_config_map(NS, typed).kind == "ConfigMap"
    with pytest.raises(ApiException) as wrong_kind:
        core.create_namespaced_config_map(NS, {**cm, "kind": "Secret", "metadata": {"name": "x"}})
    assert wrong_kind.value.status == 400


def test_label_selectors(api):
    core = client.CoreV1Api(api)
    for name, labels in (("a", {"tier": "web", "env": "prod"}), ("b", {"tier": "db"}), ("c", {"env": "dev"})):
        core.create_namespaced_config_map(
            NS, {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, "labels": labels}}
        )

    def names(selector: str) -> list[str]:
        return [i.metadata.name for i in core.list_namespaced_config_map(NS, label_selector=selector).items]

    assert names("tier=web") == ["a"]
    assert names("tier!=web") == ["b", "c"]
    assert names("tier in (web,db)") == ["a", "b"]
    assert names("env notin (prod)") == ["b", "c"]
    assert names("env") == ["a", "c"]
    assert names("!env") == ["b"]
    assert names("tier=web,env=prod") == ["a"]


def test_a_job_runs_its_pod_in_a_container(api, docker_client, fake_k8s):
    core, batch = client.CoreV1Api(api), client.BatchV1Api(api)
    core.create_namespaced_secret(
        NS, {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s3"}, "stringData": {"key": "sekret"}}
    )
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "hello", "labels": {"aichor.io/experiment-id": "e1"}},
        "spec": {
            "backoffLimit": 0,
            "template": {
                "metadata": {"labels": {"aichor.io/experiment-id": "e1"}},
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [
                        container(
                            "echo hi; echo key=$KEY pod=$POD",
                            env=[
                                {"name": "KEY", "valueFrom": {"secretKeyRef": {"name": "s3", "key": "key"}}},
                                {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                            ],
                        )
                    ],
                },
            },
        },
    }
    batch.create_namespaced_job(NS, job)
    done = wait_for(
        lambda: condition_true(batch.read_namespaced_job_status("hello", NS).status.conditions, "Complete"),
        message="Complete",
    )
    assert done
    (pod,) = core.list_namespaced_pod(NS, label_selector="aichor.io/experiment-id=e1").items
    assert pod.metadata.labels["job-name"] == "hello"
    assert pod.metadata.owner_references[0].kind == "Job"
    assert pod.status.phase == "Succeeded"
    assert pod.status.container_statuses[0].state.terminated.exit_code == 0
    assert pod_log(core, pod.metadata.name) == f"hi\nkey=sekret pod={pod.metadata.name}\n"
    status = batch.read_namespaced_job("hello", NS).status
    assert status.succeeded == 1 and status.completion_time is not None
    # A failing pod fails the Job (backoffLimit 0), with the container's exit code on the pod.
    job["metadata"]["name"] = "boom"
    job["spec"]["template"]["spec"]["containers"] = [container("echo failing >&2; exit 3")]
    batch.create_namespaced_job(NS, job)
    wait_for(
        lambda: condition_true(batch.read_namespaced_job("boom", NS).status.conditions, "Failed"), message="Failed"
    )
    (pod,) = core.list_namespaced_pod(NS, label_selector="job-name=boom").items
    assert pod.status.phase == "Failed"
    assert pod.status.container_statuses[0].state.terminated.exit_code == 3
    assert pod_log(core, pod.metadata.name) == "failing\n"
    failed = next(c for c in batch.read_namespaced_job("boom", NS).status.conditions if c.type == "Failed")
    assert failed.reason == "BackoffLimitExceeded"


def test_watch_streams_added_and_modified_from_a_resource_version(api):
    core = client.CoreV1Api(api)
    start = core.list_namespaced_pod(NS).metadata.resource_version
    seen: list[tuple[str, str, str]] = []

    def watching() -> None:
        w = watch.Watch()
        for event in w.stream(
            core.list_namespaced_pod, NS, resource_version=start, label_selector="app=w", timeout_seconds=30
        ):
            seen.append((event["type"], event["object"].metadata.name, event["object"].status.phase))
            if event["type"] == "DELETED":
                w.stop()

    reader = threading.Thread(target=watching, daemon=True)
    reader.start()
    core.create_namespaced_pod(
        NS,
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "other"},
            "spec": {"restartPolicy": "Never", "containers": [container("true")]},
        },
    )
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "w", "labels": {"app": "w"}},
        "spec": {"restartPolicy": "Never", "containers": [container("true")]},
    }
    core.create_namespaced_pod(NS, pod)
    wait_for(lambda: ("MODIFIED", "w", "Succeeded") in seen, message="the watch to see the pod succeed")
    core.delete_namespaced_pod("w", NS)
    reader.join(60)
    assert not reader.is_alive()
    assert seen[0] == ("ADDED", "w", "Pending")
    assert ("MODIFIED", "w", "Running") in seen or seen[1] == ("MODIFIED", "w", "Succeeded")
    assert seen[-1] == ("DELETED", "w", "Succeeded")
    assert all(name == "w" for _, name, _ in seen)
    # The same resourceVersion replays the same changes from the server's history.
    replayed = watch.Watch().stream(
        core.list_namespaced_pod, NS, resource_version=start, label_selector="app=w", timeout_seconds=1
    )
    assert [(e["type"], e["object"].status.phase) for e in replayed] == [(t, phase) for t, _, phase in seen]


def test_a_watch_from_a_version_older_than_the_history_is_gone(api, fake_k8s, monkeypatch):
    from collections import deque

    core = client.CoreV1Api(api)
    old = core.list_namespaced_config_map(NS).metadata.resource_version
    monkeypatch.setattr(fake_k8s.store, "history", deque(maxlen=3))  # the server keeps 3 changes
    for i in range(5):
        core.create_namespaced_config_map(NS, {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": f"c{i}"}})
    with pytest.raises(ApiException) as gone:
        core.list_namespaced_config_map(NS, watch=True, resource_version=old, timeout_seconds=1, _preload_content=False)
    assert gone.value.status == 410 and error_body(gone.value)["reason"] == "Expired"
    # A client lists again and watches from the list's version: the next change, then a
    # bookmark with the version to go on from when the request ends.
    listed = core.list_namespaced_config_map(NS).metadata.resource_version
    core.create_namespaced_config_map(NS, {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c5"}})
    response = core.list_namespaced_config_map(
        NS, watch=True, resource_version=listed, allow_watch_bookmarks=True, timeout_seconds=1, _preload_content=False
    )
    events = [json.loads(line) for line in response.data.splitlines()]
    assert [(e["type"], e["object"]["metadata"].get("name")) for e in events] == [("ADDED", "c5"), ("BOOKMARK", None)]
    assert int(events[-1]["object"]["metadata"]["resourceVersion"]) > int(listed)


def test_pytorchjob_pods_get_ranks_and_world_size(api):
    core, custom = client.CoreV1Api(api), client.CustomObjectsApi(api)
    command = "echo RANK=$RANK WORLD_SIZE=$WORLD_SIZE MASTER_ADDR=$MASTER_ADDR MASTER_PORT=$MASTER_PORT"

    def replica(count: int) -> dict:
        return {
            "replicas": count,
            "restartPolicy": "Never",
            "template": {"spec": {"containers": [container(command, name="pytorch")]}},
        }

    job = {
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "metadata": {"name": "pt"},
        "spec": {"pytorchReplicaSpecs": {"Master": replica(1), "Worker": replica(2)}},
    }
    custom.create_namespaced_custom_object("kubeflow.org", "v1", NS, "pytorchjobs", job)

    def succeeded():
        status = (
            custom.get_namespaced_custom_object_status("kubeflow.org", "v1", NS, "pytorchjobs", "pt").get("status")
            or {}
        )
        return any(c["type"] == "Succeeded" and c["status"] == "True" for c in status.get("conditions") or [])

    wait_for(succeeded, message="the PyTorchJob to succeed")
    # Succeeded once the Master has (as the training operator decides): workers may still run.
    selector = "training.kubeflow.org/job-name=pt"
    wait_for(
        lambda: (
            [p.status.phase for p in core.list_namespaced_pod(NS, label_selector=selector).items] == ["Succeeded"] * 3
        ),
        message="every replica to end",
    )
    pods = {p.metadata.name: p for p in core.list_namespaced_pod(NS, label_selector=selector).items}
    assert sorted(pods) == ["pt-master-0", "pt-worker-0", "pt-worker-1"]
    assert pods["pt-master-0"].metadata.labels["training.kubeflow.org/job-role"] == "master"
    assert pods["pt-worker-1"].metadata.labels["training.kubeflow.org/replica-index"] == "1"
    logs = {name: pod_log(core, name) for name in pods}
    assert logs == {
        "pt-master-0": "RANK=0 WORLD_SIZE=3 MASTER_ADDR=pt-master-0 MASTER_PORT=23456\n",
        "pt-worker-0": "RANK=1 WORLD_SIZE=3 MASTER_ADDR=pt-master-0 MASTER_PORT=23456\n",
        "pt-worker-1": "RANK=2 WORLD_SIZE=3 MASTER_ADDR=pt-master-0 MASTER_PORT=23456\n",
    }
    status = custom.get_namespaced_custom_object("kubeflow.org", "v1", NS, "pytorchjobs", "pt")["status"]
    assert status["replicaStatuses"]["Master"]["succeeded"] == 1
    assert {s.metadata.name for s in core.list_namespaced_service(NS).items} == set(pods)


def jobset(name: str, command: str, groups=(("workers", 1, 2),)) -> dict:
    return {
        "apiVersion": "jobset.x-k8s.io/v1alpha2",
        "kind": "JobSet",
        "metadata": {"name": name, "labels": {"aichor.io/experiment-id": name}},
        "spec": {
            "replicatedJobs": [
                {
                    "name": group,
                    "replicas": replicas,
                    "template": {
                        "spec": {
                            "completions": completions,
                            "parallelism": completions,
                            "completionMode": "Indexed",
                            "backoffLimit": 0,
                            "template": {
                                "spec": {
                                    "restartPolicy": "Never",
                                    "containers": [
                                        container(
                                            command,
                                            env=[
                                                {
                                                    "name": "JOB_GLOBAL_INDEX",
                                                    "valueFrom": {
                                                        "fieldRef": {
                                                            "fieldPath": "metadata.labels['jobset.sigs.k8s.io/job-global-index']"
                                                        }
                                                    },
                                                }
                                            ],
                                        )
                                    ],
                                }
                            },
                        }
                    },
                }
                for group, replicas, completions in groups
            ]
        },
    }


JOBSETS = ("jobset.x-k8s.io", "v1alpha2", NS, "jobsets")


def test_jobset_completes_with_indexes_and_hosts(api):
    core, custom = client.CoreV1Api(api), client.CustomObjectsApi(api)
    # Each pod reaches the first pod by its JobSet hostname (`<jobset>-<job>-<i>-<index>.<subdomain>`),
    # which exists once that pod runs: as real workloads do, the others try until it does (quietly:
    # a "bad address" on stderr may be stamped before the line echoed first).
    command = (
        "echo global=$JOB_GLOBAL_INDEX index=$JOB_COMPLETION_INDEX; "
        "for i in $(seq 100); do ping -c1 -W1 js-a-0-0.js >/dev/null 2>&1 && echo reached && break; sleep 0.2; done"
    )
    custom.create_namespaced_custom_object(*JOBSETS, jobset("js", command, groups=(("a", 1, 2), ("b", 2, 1))))

    def ended():
        status = custom.get_namespaced_custom_object(*JOBSETS, "js").get("status") or {}
        return status.get("terminalState") and status

    status = wait_for(ended, message="the JobSet to end")
    assert status["terminalState"] == "Completed", status
    assert {r["name"]: r["succeeded"] for r in status["replicatedJobsStatus"]} == {"a": 1, "b": 2}
    assert any(c["type"] == "Completed" and c["status"] == "True" for c in status["conditions"])
    jobs = sorted(j.metadata.name for j in client.BatchV1Api(api).list_namespaced_job(NS).items)
    assert jobs == ["js-a-0", "js-b-0", "js-b-1"]
    logs = sorted(
        pod_log(core, p.metadata.name)
        for p in core.list_namespaced_pod(NS, label_selector="jobset.sigs.k8s.io/jobset-name=js").items
    )
    assert logs == [
        "global=0 index=0\nreached\n",
        "global=0 index=1\nreached\n",
        "global=1 index=0\nreached\n",
        "global=2 index=0\nreached\n",
    ]
    assert core.read_namespaced_service("js", NS).spec.cluster_ip == "None"


def test_foreground_delete_of_a_jobset_removes_pods_and_containers(api, docker_client, fake_k8s):
    core, custom = client.CoreV1Api(api), client.CustomObjectsApi(api)
    custom.create_namespaced_custom_object(*JOBSETS, jobset("long", "sleep 600", groups=(("a", 1, 2), ("b", 1, 1))))
    pods = lambda: core.list_namespaced_pod(NS, label_selector="jobset.sigs.k8s.io/jobset-name=long").items  # noqa: E731
    wait_for(lambda: len(pods()) == 3 and all(p.status.phase == "Running" for p in pods()), message="3 running pods")
    assert len(containers_of_cluster(docker_client, fake_k8s)) == 4  # 3 pods and the namespace holder
    custom.delete_namespaced_custom_object(
        *JOBSETS, "long", body=client.V1DeleteOptions(propagation_policy="Foreground")
    )
    # Until its dependents are gone, the JobSet stays, marked for deletion.
    held = custom.get_namespaced_custom_object(*JOBSETS, "long")
    assert held["metadata"]["deletionTimestamp"] and "foregroundDeletion" in held["metadata"]["finalizers"]

    def gone():
        try:
            custom.get_namespaced_custom_object(*JOBSETS, "long")
            return False
        except ApiException as exc:
            return exc.status == 404

    wait_for(gone, message="the JobSet to go")
    assert not pods()
    assert not client.BatchV1Api(api).list_namespaced_job(NS).items
    wait_for(lambda: not containers_of_cluster(docker_client, fake_k8s), message="the containers to go")


def test_exec_runs_in_the_pod_container(api):
    core = client.CoreV1Api(api)
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "shell"},
        "spec": {"containers": [container("echo ready; sleep 600", env=[{"name": "MARKER", "value": "in-the-pod"}])]},
    }
    core.create_namespaced_pod(NS, pod)
    wait_for(lambda: core.read_namespaced_pod("shell", NS).status.phase == "Running", message="Running")
    out = stream(
        core.connect_get_namespaced_pod_exec,
        "shell",
        NS,
        command=["sh", "-c", "echo $MARKER; cat /proc/1/cmdline"],
        stdout=True,
        stderr=True,
    )
    assert out == "in-the-pod\nsleep\x00600\x00"  # the shell exec'd its last command
    session = stream(
        core.connect_get_namespaced_pod_exec,
        "shell",
        NS,
        command=["sh", "-c", "read line; echo got $line; exit 3"],
        stdin=True,
        stdout=True,
        stderr=True,
        _preload_content=False,
    )
    session.write_stdin("typed\n")
    session.run_forever(timeout=20)
    assert session.read_stdout() == "got typed\n"
    assert session.returncode == 3


def test_port_forward_reaches_a_listener_in_the_pod(api):
    core = client.CoreV1Api(api)
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "srv"},
        "spec": {"containers": [container("nc -ll -p 8080 -e tr a-z A-Z")]},
    }
    core.create_namespaced_pod(NS, pod)
    wait_for(lambda: core.read_namespaced_pod("srv", NS).status.phase == "Running", message="Running")

    def listening():
        return ":8080 " in stream(
            core.connect_get_namespaced_pod_exec, "srv", NS, command=["netstat", "-ltn"], stdout=True, stderr=True
        )

    wait_for(listening, message="the listener")
    forward = portforward(core.connect_get_namespaced_pod_portforward, "srv", NS, ports="8080")
    sock = forward.socket(8080)
    sock.settimeout(20)
    sock.sendall(b"hello pod\n")
    received = b""
    while not received.endswith(b"\n"):
        received += sock.recv(1024)
    assert received == b"HELLO POD\n"
    sock.close()


def test_a_gpu_pod_stays_pending_with_the_scheduler_message(api, docker_client, fake_k8s):
    core = client.CoreV1Api(api)
    gpu = container("nvidia-smi", resources={"limits": {"nvidia.com/gpu": 1}})
    core.create_namespaced_pod(
        NS, {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "gpu"}, "spec": {"containers": [gpu]}}
    )

    def unschedulable():
        conditions = core.read_namespaced_pod_status("gpu", NS).status.conditions or []
        return next((c for c in conditions if c.type == "PodScheduled" and c.status == "False"), None)

    condition = wait_for(unschedulable, message="the scheduler's verdict")
    assert condition.reason == "Unschedulable"
    assert condition.message.startswith("0/1 nodes are available: 1 Insufficient nvidia.com/gpu.")
    pod = core.read_namespaced_pod("gpu", NS)
    assert pod.status.phase == "Pending" and not pod.spec.node_name
    events = core.list_namespaced_event(NS, field_selector="involvedObject.name=gpu").items
    assert [e.reason for e in events] == ["FailedScheduling"]
    assert not containers_of_cluster(docker_client, fake_k8s)
    with pytest.raises(ApiException) as waiting:
        core.read_namespaced_pod_log("gpu", NS)
    assert waiting.value.status == 400 and "is waiting to start" in error_body(waiting.value)["message"]
    # A GPU product selector the node lacks is reported first, as the scheduler's filters run.
    product = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "a100"}}
    product["spec"] = {"nodeSelector": {"nvidia.com/gpu.product": "A100"}, "containers": [gpu]}
    core.create_namespaced_pod(NS, product)

    def scheduling_message():
        conditions = core.read_namespaced_pod("a100", NS).status.conditions or []
        return next((c.message for c in conditions if c.type == "PodScheduled" and c.status == "False"), None)

    assert "didn't match Pod's node affinity/selector" in wait_for(scheduling_message, message="the verdict")
    fake_k8s.kubelet.node_labels["nvidia.com/gpu.product"] = "A100"
    wait_for(lambda: "Insufficient nvidia.com/gpu" in scheduling_message(), message="the scheduler's retry")


def test_claims_bind_unless_unbound_and_volumes_are_shared(api):
    core = client.CoreV1Api(api)

    def claim(name: str, storage_class: str) -> dict:
        return {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": {"name": name},
            "spec": {
                "accessModes": ["ReadWriteMany"],
                "storageClassName": storage_class,
                "resources": {"requests": {"storage": "1Gi"}},
            },
        }

    core.create_namespaced_persistent_volume_claim(NS, claim("data", "standard"))
    core.create_namespaced_persistent_volume_claim(NS, claim("never", "unbound"))
    wait_for(lambda: core.read_namespaced_persistent_volume_claim("data", NS).status.phase == "Bound", message="Bound")
    assert core.read_namespaced_persistent_volume_claim("never", NS).status.phase == "Pending"

    def pod(name: str, command: str, claim_name: str = "data") -> dict:
        return {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name},
            "spec": {
                "restartPolicy": "Never",
                "volumes": [{"name": "v", "persistentVolumeClaim": {"claimName": claim_name}}],
                "containers": [container(command, volumeMounts=[{"name": "v", "mountPath": "/data"}])],
            },
        }

    core.create_namespaced_pod(NS, pod("writer", "echo shared > /data/file"))
    wait_for(lambda: core.read_namespaced_pod("writer", NS).status.phase == "Succeeded", message="the writer")
    core.create_namespaced_pod(NS, pod("reader", "cat /data/file"))
    wait_for(lambda: core.read_namespaced_pod("reader", NS).status.phase == "Succeeded", message="the reader")
    assert pod_log(core, "reader") == "shared\n"
    core.create_namespaced_pod(NS, pod("stuck", "true", claim_name="never"))

    def waiting_for_claim():
        conditions = core.read_namespaced_pod("stuck", NS).status.conditions or []
        return any("unbound immediate PersistentVolumeClaims" in (c.message or "") for c in conditions)

    wait_for(waiting_for_claim, message="the unbound claim's message")


def test_rayjob_runs_its_entrypoint_on_a_ray_cluster(api):
    core, custom = client.CoreV1Api(api), client.CustomObjectsApi(api)
    node = {"containers": [{"name": "ray", "image": TEST_IMAGE, "imagePullPolicy": "IfNotPresent"}]}
    rayjob = {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": {"name": "rj"},
        "spec": {
            "entrypoint": "echo entrypoint ran; echo $RAY_JOB_SUBMISSION_ID",
            "shutdownAfterJobFinishes": True,
            "rayClusterSpec": {
                "rayVersion": "2.40.0",
                "headGroupSpec": {"rayStartParams": {"dashboard-host": "0.0.0.0"}, "template": {"spec": node}},
                "workerGroupSpecs": [
                    {
                        "groupName": "cpu",
                        "replicas": 2,
                        "minReplicas": 2,
                        "maxReplicas": 2,
                        "rayStartParams": {},
                        "template": {"spec": node},
                    }
                ],
            },
        },
    }
    custom.create_namespaced_custom_object("ray.io", "v1", NS, "rayjobs", rayjob)

    def cluster_ready():
        status = custom.get_namespaced_custom_object("ray.io", "v1", NS, "rayjobs", "rj").get("status") or {}
        return status.get("jobDeploymentStatus") in ("Running", "Complete") and status

    status = wait_for(cluster_ready, message="the Ray cluster")
    cluster = status["rayClusterName"]
    assert cluster.startswith("rj-")

    def finished():
        status = custom.get_namespaced_custom_object("ray.io", "v1", NS, "rayjobs", "rj").get("status") or {}
        return status.get("jobDeploymentStatus") == "Complete" and status

    status = wait_for(finished, message="the RayJob to complete")
    assert status["jobStatus"] == "SUCCEEDED"
    (submitter,) = core.list_namespaced_pod(NS, label_selector="job-name=rj").items
    assert pod_log(core, submitter.metadata.name) == f"entrypoint ran\n{status['jobId']}\n"
    # shutdownAfterJobFinishes: the cluster and its pods go.
    wait_for(
        lambda: not core.list_namespaced_pod(NS, label_selector=f"ray.io/cluster={cluster}").items,
        message="the cluster's pods to go",
    )
    with pytest.raises(ApiException):
        custom.get_namespaced_custom_object("ray.io", "v1", NS, "rayclusters", cluster)


def test_namespace_deletion_empties_it(api, docker_client, fake_k8s):
    core = client.CoreV1Api(api)
    core.create_namespaced_pod(
        NS,
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "p"},
            "spec": {"containers": [container("sleep 600")]},
        },
    )
    wait_for(lambda: core.read_namespaced_pod("p", NS).status.phase == "Running", message="Running")
    core.delete_namespace(NS)
    started = time.monotonic()
    wait_for(lambda: NS not in [n.metadata.name for n in core.list_namespace().items], message="the namespace to go")
    assert time.monotonic() - started < 30
    wait_for(lambda: not containers_of_cluster(docker_client, fake_k8s), message="the containers to go")


def test_pod_log_options(api):
    core = client.CoreV1Api(api)
    command = "for i in 1 2 3 4 5; do echo $i; sleep 0.2; done"
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "counter"},
        "spec": {"restartPolicy": "Never", "containers": [container(command)]},
    }
    core.create_namespaced_pod(NS, pod)
    wait_for(
        lambda: core.read_namespaced_pod("counter", NS).status.phase != "Pending", message="the container to start"
    )
    followed = core.read_namespaced_pod_log("counter", NS, follow=True, _preload_content=False)
    assert b"".join(followed.stream()) == b"1\n2\n3\n4\n5\n"  # the stream ends with the process
    wait_for(lambda: core.read_namespaced_pod("counter", NS).status.phase == "Succeeded", message="Succeeded")

    def log(**options) -> str:
        return core.read_namespaced_pod_log("counter", NS, _preload_content=False, **options).data.decode()

    assert log(tail_lines=2) == "4\n5\n"
    assert log(limit_bytes=3) == "1\n2"
    stamped = log(timestamps=True).splitlines()
    assert [line.split(" ", 1)[1] for line in stamped] == ["1", "2", "3", "4", "5"]
    assert all(line[:4].isdigit() and line.split(" ", 1)[0].endswith("Z") for line in stamped)
    assert log(since_seconds=3600) == "1\n2\n3\n4\n5\n"
    # sinceTime: the API's, which the generated client does not offer.
    for since, expected in (("2000-01-01T00:00:00Z", "1\n2\n3\n4\n5\n"), ("2099-01-01T00:00:00Z", "")):
        response = api.call_api(
            f"/api/v1/namespaces/{NS}/pods/counter/log",
            "GET",
            query_params=[("sinceTime", since)],
            auth_settings=["BearerToken"],
            _preload_content=False,
        )
        assert response.data.decode() == expected


def test_status_subresource_and_strategic_merge(api):
    core = client.CoreV1Api(api)
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "svc", "labels": {"a": "1"}},
        "spec": {"selector": {"app": "x"}, "ports": [{"port": 80}]},
    }
    core.create_namespaced_service(NS, service)
    ingress = {"status": {"loadBalancer": {"ingress": [{"ip": "10.0.0.9"}]}}}
    patched = core.patch_namespaced_service_status("svc", NS, ingress)
    assert patched.status.load_balancer.ingress[0].ip == "10.0.0.9"
    # The main resource ignores status; /status ignores everything else.
    relabelled = core.patch_namespaced_service(
        "svc", NS, {"metadata": {"labels": {"b": "2"}}, "status": {"loadBalancer": {}}}
    )
    assert relabelled.metadata.labels == {"a": "1", "b": "2"}
    assert relabelled.status.load_balancer.ingress[0].ip == "10.0.0.9"
    unchanged = core.patch_namespaced_service_status("svc", NS, {"metadata": {"labels": {"c": "3"}}})
    assert unchanged.metadata.labels == {"a": "1", "b": "2"}
    # Strategic merge on a built-in kind merges named lists item by item.
    merged = core.patch_namespaced_service("svc", NS, {"spec": {"ports": [{"port": 443, "name": "https"}]}})
    assert sorted(p.port for p in merged.spec.ports) == [80, 443]
    # A merge patch (what the client sends for custom objects) replaces lists.
    custom = client.CustomObjectsApi(api)
    body = jobset("merge", "sleep 600")
    body["spec"]["suspend"] = True  # no pods: only the object is under test
    custom.create_namespaced_custom_object(*JOBSETS, body)
    patched = custom.patch_namespaced_custom_object(*JOBSETS, "merge", {"metadata": {"labels": {"extra": "yes"}}})
    assert patched["metadata"]["labels"] == {"aichor.io/experiment-id": "merge", "extra": "yes"}


@pytest.mark.parametrize(
    ("kind", "plural", "field", "types", "expected"),
    [
        (
            "XGBoostJob",
            "xgboostjobs",
            "xgbReplicaSpecs",
            {"Master": 1, "Worker": 2},
            {
                "xg-master-0": "RANK=0 WORLD_SIZE=3 MASTER=xg-master-0:9999 WORKERS=xg-worker-0,xg-worker-1",
                "xg-worker-0": "RANK=1 WORLD_SIZE=3 MASTER=xg-master-0:9999 WORKERS=xg-worker-0,xg-worker-1",
                "xg-worker-1": "RANK=2 WORLD_SIZE=3 MASTER=xg-master-0:9999 WORKERS=xg-worker-0,xg-worker-1",
            },
        ),
        (
            "JAXJob",
            "jaxjobs",
            "jaxReplicaSpecs",
            {"Worker": 2},
            {
                "xg-worker-0": "PROCESS_ID=0 NUM_PROCESSES=2 COORDINATOR=xg-worker-0:6666",
                "xg-worker-1": "PROCESS_ID=1 NUM_PROCESSES=2 COORDINATOR=xg-worker-0:6666",
            },
        ),
        (
            "TFJob",
            "tfjobs",
            "tfReplicaSpecs",
            {"Worker": 2},
            {
                f"xg-worker-{i}": json.dumps(
                    {
                        "cluster": {"worker": [f"xg-worker-0.{NS}.svc:2222", f"xg-worker-1.{NS}.svc:2222"]},
                        "task": {"type": "worker", "index": i},
                        "environment": "cloud",
                    }
                )
                for i in (0, 1)
            },
        ),
    ],
)
def test_kubeflow_jobs_inject_their_variables(api, kind, plural, field, types, expected):
    core, custom = client.CoreV1Api(api), client.CustomObjectsApi(api)
    if kind == "XGBoostJob":
        command, name = (
            "echo RANK=$RANK WORLD_SIZE=$WORLD_SIZE MASTER=$MASTER_ADDR:$MASTER_PORT WORKERS=$WORKER_ADDRS",
            "xgboost",
        )
    elif kind == "TFJob":
        command, name = "echo $TF_CONFIG", "tensorflow"
    else:
        command, name = (
            "echo PROCESS_ID=$PROCESS_ID NUM_PROCESSES=$NUM_PROCESSES COORDINATOR=$COORDINATOR_ADDRESS:$COORDINATOR_PORT",
            "jax",
        )
    specs = {
        rtype: {
            "replicas": n,
            "restartPolicy": "Never",
            "template": {"spec": {"containers": [container(command, name=name)]}},
        }
        for rtype, n in types.items()
    }
    custom.create_namespaced_custom_object(
        "kubeflow.org",
        "v1",
        NS,
        plural,
        {"apiVersion": "kubeflow.org/v1", "kind": kind, "metadata": {"name": "xg"}, "spec": {field: specs}},
    )
    selector = "training.kubeflow.org/job-name=xg"
    wait_for(
        lambda: (
            [p.status.phase for p in core.list_namespaced_pod(NS, label_selector=selector).items]
            == ["Succeeded"] * len(expected)
        ),
        message="every replica to end",
    )
    assert {name: pod_log(core, name).strip() for name in expected} == expected

    def succeeded():
        status = custom.get_namespaced_custom_object("kubeflow.org", "v1", NS, plural, "xg").get("status") or {}
        return any(c["type"] == "Succeeded" and c["status"] == "True" for c in status.get("conditions") or [])

    wait_for(succeeded, message=f"the {kind} to succeed")


def test_pods_that_cannot_start_say_why(api):
    core = client.CoreV1Api(api)

    def pod(name: str, spec_container: dict) -> dict:
        return {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name},
            "spec": {"restartPolicy": "Never", "containers": [spec_container]},
        }

    # Nothing listens on port 1: the pull fails as from an unreachable registry.
    core.create_namespaced_pod(
        NS, pod("nopull", {"name": "main", "image": "127.0.0.1:1/absent/image:v1", "command": ["true"]})
    )
    missing_secret = container(
        "true", env=[{"name": "K", "valueFrom": {"secretKeyRef": {"name": "absent", "key": "k"}}}]
    )
    core.create_namespaced_pod(NS, pod("nosecret", missing_secret))

    def waiting(name: str):
        statuses = core.read_namespaced_pod(name, NS).status.container_statuses or []
        return (
            statuses
            and statuses[0].state.waiting
            and statuses[0].state.waiting.reason not in ("ContainerCreating",)
            and statuses[0].state.waiting
        )

    pull = wait_for(lambda: waiting("nopull"), message="the pull failure")
    assert pull.reason in ("ErrImagePull", "ImagePullBackOff")
    assert "127.0.0.1:1/absent/image:v1" in pull.message
    config = wait_for(lambda: waiting("nosecret"), message="the missing secret")
    assert (config.reason, config.message) == ("CreateContainerConfigError", 'secret "absent" not found')
    assert core.read_namespaced_pod("nosecret", NS).status.phase == "Pending"
    # `$(VAR)` in command and values is expanded from the container's variables.
    expanded = container(
        "echo $(GREETING) $(MISSING)",
        env=[{"name": "NAME", "value": "pod"}, {"name": "GREETING", "value": "hi-$(NAME)"}],
    )
    expanded["command"] = ["sh", "-c", "echo $(GREETING) '$(MISSING)' $$(echo escaped)"]
    core.create_namespaced_pod(NS, pod("expand", expanded))
    wait_for(lambda: core.read_namespaced_pod("expand", NS).status.phase == "Succeeded", message="Succeeded")
    assert pod_log(core, "expand") == "hi-pod $(MISSING) escaped\n"


def test_discovery_serves_the_dynamic_client(api):
    from kubernetes.dynamic import DynamicClient

    assert client.VersionApi(api).get_code().git_version.startswith("v1.")
    groups = {g.name for g in client.ApisApi(api).get_api_versions().groups}
    assert {"batch", "jobset.x-k8s.io", "kubeflow.org", "ray.io"} <= groups
    dynamic = DynamicClient(api)
    jobsets = dynamic.resources.get(api_version="jobset.x-k8s.io/v1alpha2", kind="JobSet")
    body = jobset("dyn", "true")
    body["spec"]["suspend"] = True
    jobsets.create(body=body, namespace=NS)
    assert [i.metadata.name for i in jobsets.get(namespace=NS, label_selector="aichor.io/experiment-id=dyn").items] == [
        "dyn"
    ]
    pods = dynamic.resources.get(api_version="v1", kind="Pod")
    assert pods.get(namespace=NS).items == []


def test_a_failing_jobset_ends_failed_with_the_exit_code(api):
    core, custom = client.CoreV1Api(api), client.CustomObjectsApi(api)
    custom.create_namespaced_custom_object(*JOBSETS, jobset("bad", "echo dying; exit 4", groups=(("w", 1, 1),)))

    def failed():
        status = custom.get_namespaced_custom_object(*JOBSETS, "bad").get("status") or {}
        return status.get("terminalState") == "Failed" and status

    status = wait_for(failed, message="the JobSet to fail")
    (condition,) = [c for c in status["conditions"] if c["type"] == "Failed"]
    assert condition["reason"] == "FailedJobs" and "bad-w-0" in condition["message"]
    (pod,) = core.list_namespaced_pod(NS, label_selector="jobset.sigs.k8s.io/jobset-name=bad").items
    assert pod.status.container_statuses[0].state.terminated.exit_code == 4
    assert pod_log(core, pod.metadata.name) == "dying\n"


def test_pod_configuration_reaches_the_container(api):
    core = client.CoreV1Api(api)
    core.create_namespaced_config_map(
        NS, {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "cfg"}, "data": {"MODE": "fast"}}
    )
    core.create_namespaced_secret(
        NS, {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "creds"}, "stringData": {"token": "t0ken"}}
    )
    command = (
        "echo mode=$CFG_MODE; cat /secrets/token; echo; "
        "df -k /dev/shm | tail -1 | awk '{print \"shm=\" $2}'; echo scratch > /scratch/f && cat /scratch/f"
    )
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "conf"},
        "spec": {
            "restartPolicy": "Never",
            "volumes": [
                {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": "256Mi"}},
                {"name": "secrets", "secret": {"secretName": "creds"}},
                {"name": "scratch", "emptyDir": {}},
            ],
            "containers": [
                container(
                    command,
                    envFrom=[{"configMapRef": {"name": "cfg"}, "prefix": "CFG_"}],
                    volumeMounts=[
                        {"name": "shm", "mountPath": "/dev/shm"},
                        {"name": "secrets", "mountPath": "/secrets", "readOnly": True},
                        {"name": "scratch", "mountPath": "/scratch"},
                    ],
                )
            ],
        },
    }
    core.create_namespaced_pod(NS, pod)
    wait_for(
        lambda: core.read_namespaced_pod("conf", NS).status.phase in ("Succeeded", "Failed"), message="the pod to end"
    )
    assert pod_log(core, "conf") == "mode=fast\nt0ken\nshm=262144\nscratch\n"


def test_exec_over_v4_reports_the_exit_code(api):
    core = client.CoreV1Api(api)
    core.create_namespaced_pod(
        NS,
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "v4"},
            "spec": {"containers": [container("sleep 600")]},
        },
    )
    wait_for(lambda: core.read_namespaced_pod("v4", NS).status.phase == "Running", message="Running")
    session = stream(
        core.connect_get_namespaced_pod_exec,
        "v4",
        NS,
        command=["sh", "-c", "echo v4; exit 5"],
        stdout=True,
        stderr=True,
        _preload_content=False,
        _headers={"sec-websocket-protocol": "v4.channel.k8s.io"},
    )
    assert session.subprotocol == "v4.channel.k8s.io"
    session.run_forever(timeout=20)
    assert session.read_stdout() == "v4\n"
    assert session.returncode == 5


def test_deadlines_fail_jobs_and_stop_their_pods(api, docker_client, fake_k8s):
    core, batch, custom = client.CoreV1Api(api), client.BatchV1Api(api), client.CustomObjectsApi(api)
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "slow"},
        "spec": {
            "activeDeadlineSeconds": 1,
            "template": {"spec": {"restartPolicy": "Never", "containers": [container("sleep 600")]}},
        },
    }
    batch.create_namespaced_job(NS, job)
    replica = {
        "replicas": 1,
        "restartPolicy": "Never",
        "template": {"spec": {"containers": [container("sleep 600", name="pytorch")]}},
    }
    pytorch = {
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "metadata": {"name": "slowpt"},
        "spec": {"runPolicy": {"activeDeadlineSeconds": 1}, "pytorchReplicaSpecs": {"Master": replica}},
    }
    custom.create_namespaced_custom_object("kubeflow.org", "v1", NS, "pytorchjobs", pytorch)

    def job_failed():
        conditions = batch.read_namespaced_job("slow", NS).status.conditions or []
        return next((c for c in conditions if c.type == "Failed" and c.status == "True"), None)

    assert wait_for(job_failed, message="the Job's deadline").reason == "DeadlineExceeded"

    def pytorch_failed():
        status = (
            custom.get_namespaced_custom_object("kubeflow.org", "v1", NS, "pytorchjobs", "slowpt").get("status") or {}
        )
        return next(
            (c for c in status.get("conditions") or [] if c["type"] == "Failed" and c["status"] == "True"), None
        )

    assert (
        "active longer than specified deadline"
        in wait_for(pytorch_failed, message="the PyTorchJob's deadline")["message"]
    )
    wait_for(lambda: not core.list_namespaced_pod(NS).items, message="the pods to go")
    wait_for(lambda: not containers_of_cluster(docker_client, fake_k8s), message="the containers to go")


def test_a_failing_rayjob_entrypoint_fails_the_rayjob(api):
    custom = client.CustomObjectsApi(api)
    node = {"containers": [{"name": "ray", "image": TEST_IMAGE, "imagePullPolicy": "IfNotPresent"}]}
    rayjob = {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": {"name": "rjbad"},
        "spec": {
            "entrypoint": "exit 7",
            "submitterConfig": {"backoffLimit": 0},
            "rayClusterSpec": {"headGroupSpec": {"rayStartParams": {}, "template": {"spec": node}}},
        },
    }
    custom.create_namespaced_custom_object("ray.io", "v1", NS, "rayjobs", rayjob)

    def failed():
        status = custom.get_namespaced_custom_object("ray.io", "v1", NS, "rayjobs", "rjbad").get("status") or {}
        return status.get("jobDeploymentStatus") == "Failed" and status

    status = wait_for(failed, message="the RayJob to fail")
    assert (status["jobStatus"], status["reason"]) == ("FAILED", "AppFailed")
    assert status["message"] == "Job entrypoint command failed with exit code 7"
    # Without shutdownAfterJobFinishes the cluster stays.
    assert custom.get_namespaced_custom_object("ray.io", "v1", NS, "rayclusters", status["rayClusterName"])
