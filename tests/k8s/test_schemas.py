"""The strict validator the fake API server and k8s_render's tests rely on: if it let invalid
objects through, every "the objects validate" assertion elsewhere would prove nothing."""

import copy

import pytest

from tests.k8s.schemas import SchemasMissing, crd_schema, validate_object


def jobset() -> dict:
    pod = {"restartPolicy": "Never", "containers": [{"name": "main", "image": "busybox:1.36"}]}
    job = {"completions": 2, "parallelism": 2, "completionMode": "Indexed", "template": {"spec": pod}}
    return {
        "apiVersion": "jobset.x-k8s.io/v1alpha2",
        "kind": "JobSet",
        "metadata": {"name": "exp-1a2b3c", "labels": {"aichor.io/project": "demo"}},
        "spec": {"replicatedJobs": [{"name": "workers", "replicas": 2, "template": {"spec": job}}]},
    }


def pod(**container) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "p-0"},
        "spec": {"containers": [{"name": "main", "image": "busybox", **container}]},
    }


def test_a_valid_jobset_passes():
    assert validate_object(jobset()) == []


def test_a_wrong_type_is_reported_at_its_path():
    obj = jobset()
    obj["spec"]["replicatedJobs"][0]["replicas"] = "two"
    causes = validate_object(obj)
    assert len(causes) == 1
    assert causes[0].startswith("spec.replicatedJobs[0].replicas: ")
    assert "'two'" in causes[0]


def test_unknown_fields_fail_even_deep_inside_a_custom_resource():
    obj = jobset()
    obj["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]["containers"][0]["colour"] = "red"
    obj["spec"]["priority"] = 3
    obj["metadata"]["owner"] = "me"
    assert sorted(validate_object(obj)) == [
        'metadata.owner: unknown field "owner"',
        'spec.priority: unknown field "priority"',
        'spec.replicatedJobs[0].template.spec.template.spec.containers[0].colour: unknown field "colour"',
    ]


def test_preserve_unknown_fields_is_honoured():
    # RayJob's rayClusterSpec.headGroupSpec.rayStartParams is a free map; the metadata of an
    # embedded template is not.
    obj = {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": {"name": "ray-1"},
        "spec": {
            "entrypoint": "python -c 'print(1)'",
            "rayClusterSpec": {
                "headGroupSpec": {
                    "rayStartParams": {"num-cpus": "1", "anything": "goes"},
                    "template": {"spec": {"containers": [{"name": "ray-head", "image": "rayproject/ray"}]}},
                }
            },
        },
    }
    assert validate_object(obj) == []
    obj["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["metadata"] = {"colour": "red"}
    assert validate_object(obj) == [
        'spec.rayClusterSpec.headGroupSpec.template.metadata.colour: unknown field "colour"'
    ]


def test_pod_with_a_bad_container_name_fails():
    causes = validate_object(pod(name="Main_Container"))
    assert causes == ["spec.containers[0].name: Invalid value: 'Main_Container': must be a lowercase RFC 1123 label"]


def test_core_kinds_are_strict():
    assert validate_object(pod()) == []
    causes = validate_object(pod(colour="red"))
    assert len(causes) == 1 and causes[0].startswith("spec.containers[0]: ") and "colour" in causes[0]


@pytest.mark.parametrize(
    "name, ok",
    [("exp-1", True), ("1exp", False), ("Exp", False), ("e" * 40, True), ("e" * 64, False), ("exp.1", False)],
)
def test_jobset_names_follow_dns_1035(name, ok):
    obj = jobset()
    obj["metadata"]["name"] = name
    assert (validate_object(obj) == []) is ok


def test_jobset_pod_names_must_fit_a_dns_label():
    # JobSet's webhook: `<jobset>-<replicatedJob>-<job index>-<completion index>-<5 random>`.
    obj = jobset()
    obj["metadata"]["name"] = "e" * 40  # + "-workers-1-1-abcde" = 58
    assert validate_object(obj) == []
    obj["metadata"]["name"] = "e" * 46  # 64
    (cause,) = validate_object(obj)
    assert cause.startswith("spec.replicatedJobs[0].name (pod name eeee")
    assert "must be no more than 63 characters" in cause


@pytest.mark.parametrize(
    "labels, bad",
    [
        ({"aichor.io/experiment-id": "abc-123"}, None),
        ({"aichor.io/experiment-id": "-abc"}, "-abc"),
        ({"Bad Key": "x"}, "Bad Key"),
        ({"aichor.io/x": "v" * 64}, "v" * 64),
        ({"UPPER.example/x": "v"}, "UPPER.example/x"),
    ],
)
def test_label_syntax(labels, bad):
    obj = pod()
    obj["metadata"]["labels"] = labels
    causes = validate_object(obj)
    if bad is None:
        assert causes == []
    else:
        assert causes and all(c.startswith("metadata.labels[") for c in causes)
        assert repr(bad) in causes[0]


def test_volume_mounts_must_name_a_volume():
    obj = pod(volumeMounts=[{"name": "shm", "mountPath": "/dev/shm"}])
    assert validate_object(obj) == ["spec.containers[0].volumeMounts[0].name: Not found: 'shm'"]
    obj["spec"]["volumes"] = [{"name": "shm", "emptyDir": {"medium": "Memory"}}]
    assert validate_object(obj) == []


def test_unknown_kinds_are_refused():
    obj = copy.deepcopy(jobset())
    obj["apiVersion"] = "jobset.x-k8s.io/v1"
    assert validate_object(obj)[0].startswith("apiVersion: Unsupported value")
    assert validate_object({"apiVersion": "v1", "kind": "Gadget", "metadata": {"name": "g"}})[0].startswith("kind: ")


def test_missing_shared_folder_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("AICHOR_K8S_SHARED", str(tmp_path))
    crd_schema.cache_clear()
    try:
        with pytest.raises(SchemasMissing, match="AICHOR_K8S_SHARED"):
            crd_schema("JobSet")
    finally:
        monkeypatch.delenv("AICHOR_K8S_SHARED")
        crd_schema.cache_clear()
