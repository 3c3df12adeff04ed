"""What a manifest becomes on Kubernetes (SPEC §9), through `manage.py k8s_render`, the same path
as submit. No cluster runs here: every object is checked with the strict validator of
tests/k8s/schemas.py (core schemas of one Kubernetes minor, the operators' own CRDs)."""

import ast
import os
import subprocess
import sys
from io import StringIO
from pathlib import Path
from textwrap import dedent

import pytest
import yaml
from django.core.management import CommandError, call_command

from experiments.engines.k8s_objects import OWNER_UID, owned_by
from experiments.manifest import ManifestError, parse_manifest
from projects.models import Engine, PersistentVolumeClaim, ProjectVariable
from projects.services import set_variable
from tests.experiments.test_manifest import EVERY_OPERATOR, PYTORCH_023
from tests.experiments.test_manifest import manifest as spec_manifest
from tests.helpers import manifest_yaml
from tests.k8s.schemas import validate_object

TESTS = Path(__file__).resolve().parents[1]
ROOT = TESTS.parent
HELPERS = {"manifest_yaml": manifest_yaml, "manifest": spec_manifest}


def k8s_render(tmp_path, text: str, *args: str) -> tuple[list[dict], str]:
    path = tmp_path / "manifest.yaml"
    path.write_text(text)
    out = StringIO()
    call_command("k8s_render", str(path), *args, stdout=out)
    return [obj for obj in yaml.safe_load_all(out.getvalue()) if obj], out.getvalue()


def assert_valid(objects: list[dict]) -> None:
    for obj in objects:
        assert validate_object(obj) == [], f"{obj['kind']} {obj['metadata']['name']}"


def pod_templates(top: dict) -> dict[str, dict]:
    """name → pod template of every pod the top object's operator will create from."""
    spec = top["spec"]
    if top["kind"] == "Job":
        return {"job": spec["template"]}
    if top["kind"] == "JobSet":
        return {rj["name"]: rj["template"]["spec"]["template"] for rj in spec["replicatedJobs"]}
    if top["kind"] in ("PyTorchJob", "XGBoostJob", "TFJob"):
        field = {"PyTorchJob": "pytorch", "XGBoostJob": "xgb", "TFJob": "tf"}[top["kind"]] + "ReplicaSpecs"
        return {name: rs["template"] for name, rs in spec[field].items()}
    cluster = spec["rayClusterSpec"]
    templates = {"head": cluster["headGroupSpec"]["template"], "submitter": spec["submitterPodTemplate"]}
    templates |= {g["groupName"]: g["template"] for g in cluster.get("workerGroupSpecs", [])}
    return templates


def env_of(template: dict) -> dict[str, dict]:
    return {e["name"]: e for e in template["spec"]["containers"][0].get("env", [])}


# ------------------------------------------------------------------ every manifest in tests/


def manifests_in_tests() -> list[tuple[str, str]]:
    """(where, text) of every manifest written out in the test suite: literal strings holding
    an AIchorManifest, and calls of the manifest helpers with literal arguments."""
    found = []
    for path in sorted(TESTS.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            where = f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and "kind: AIchorManifest" in node.value:
                found.append((where, dedent(node.value)))
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in HELPERS:
                try:
                    # The command is text to the objects whatever it says: a variable one
                    # (`manifest_yaml(command)`) still tells the manifest's shape.
                    args = [
                        _literal(a) if i or node.func.id != "manifest_yaml" else _literal(a, "true")
                        for i, a in enumerate(node.args)
                    ]
                    kwargs = {k.arg: _literal(k.value) for k in node.keywords if k.arg}
                except ValueError:
                    continue  # a shape built from variables: the literal cases cover the shapes
                found.append((where, HELPERS[node.func.id](*args, **kwargs)))
    unique = {text: where for where, text in reversed(found)}
    return [(where, text) for text, where in unique.items()]


def _literal(node, default=None):
    try:
        return ast.literal_eval(node)
    except ValueError:
        if default is None:
            raise
        return default


def valid_manifests() -> list[tuple[str, str]]:
    out = []
    for where, text in manifests_in_tests():
        try:
            parse_manifest(text)
        except ManifestError:
            continue  # a test of a refused manifest
        out.append((where, text))
    return out


VALID = valid_manifests()


def test_the_suite_has_manifests_of_every_operator():
    operators = {parse_manifest(text).spec.operator for _, text in VALID}
    assert operators == {"batch", "jobset", "jax", "pytorch", "xgboost", "kuberay", "tf"}
    assert len(VALID) >= 30


@pytest.mark.parametrize("where, text", VALID, ids=[where for where, _ in VALID])
def test_every_manifest_in_the_suite_renders_valid_objects(tmp_path, where, text):
    objects, _ = k8s_render(tmp_path, text)
    assert_valid(objects)
    top = objects[0]
    for obj in objects:
        assert obj["metadata"]["labels"]["aichor.io/experiment-id"] == "00000000-0000-0000-0000-000000000000"
        assert "aichor.io/project" in obj["metadata"]["labels"]
        assert obj["metadata"]["namespace"] == top["metadata"]["namespace"]
    for child in objects[1:]:
        (ref,) = child["metadata"]["ownerReferences"]
        assert (ref["kind"], ref["name"], ref["controller"]) == (top["kind"], top["metadata"]["name"], True)


# ------------------------------------------------------------------ per operator


def test_batch_is_one_job_with_its_deadline(tmp_path):
    (job,), _ = k8s_render(tmp_path, EVERY_OPERATOR["batch"])
    assert (job["apiVersion"], job["kind"]) == ("batch/v1", "Job")
    assert job["spec"]["activeDeadlineSeconds"] == 3600
    assert job["spec"]["backoffLimit"] == 0
    pod = job["spec"]["template"]
    assert pod["spec"]["containers"][0]["command"] == ["/bin/sh", "-c", "python main.py"]
    assert env_of(pod)["A"] == {"name": "A", "value": "b"}
    assert env_of(pod)["AICHOR_EXPERIMENT_ID"]["value"] == "00000000-0000-0000-0000-000000000000"


def test_jobset_has_one_indexed_replicated_job_per_group(tmp_path):
    (jobset,), _ = k8s_render(tmp_path, EVERY_OPERATOR["jobset"])
    assert (jobset["apiVersion"], jobset["kind"]) == ("jobset.x-k8s.io/v1alpha2", "JobSet")
    shapes = {
        rj["name"]: (
            rj["replicas"],
            rj["template"]["spec"]["completions"],
            rj["template"]["spec"]["parallelism"],
            rj["template"]["spec"]["completionMode"],
        )
        for rj in jobset["spec"]["replicatedJobs"]
    }
    assert shapes == {"driver": (1, 1, 1, "Indexed"), "workers": (3, 4, 2, "Indexed")}
    env = env_of(pod_templates(jobset)["workers"])
    for name, label in [
        ("JOB_INDEX", "job-index"),
        ("JOB_GLOBAL_INDEX", "job-global-index"),
        ("GLOBAL_REPLICAS", "global-replicas"),
        ("REPLICATED_JOB_NAME", "replicatedjob-name"),
        ("REPLICATED_JOB_REPLICAS", "replicatedjob-replicas"),
        ("JOBSET_NAME", "jobset-name"),
    ]:
        assert env[name]["valueFrom"]["fieldRef"]["fieldPath"] == f"metadata.labels['jobset.sigs.k8s.io/{label}']"


def test_tpus_are_requested_with_gke_selectors(tmp_path):
    (jobset,), _ = k8s_render(tmp_path, EVERY_OPERATOR["jobset"])
    pod = pod_templates(jobset)["workers"]
    resources = pod["spec"]["containers"][0]["resources"]
    assert resources["limits"]["google.com/tpu"] == "4"
    assert resources["requests"] == {"cpu": "2", "memory": "4Gi", "google.com/tpu": "4"}
    assert resources["limits"]["cpu"] == "4"  # cpuLimitRatio 2 by default
    assert pod["spec"]["nodeSelector"] == {
        "cloud.google.com/gke-tpu-accelerator": "v5e",
        "cloud.google.com/gke-tpu-topology": "2x2",
    }


def test_jax_is_a_jobset_whose_workers_agree_on_the_coordinator(tmp_path):
    (jobset,), _ = k8s_render(tmp_path, EVERY_OPERATOR["jax"])
    name = jobset["metadata"]["name"]
    (rj,) = jobset["spec"]["replicatedJobs"]
    assert (rj["name"], rj["replicas"], rj["template"]["spec"]["completions"]) == ("worker", 2, 1)
    env = env_of(rj["template"]["spec"]["template"])
    assert env["JAXOPERATOR_COORDINATOR_ADDRESS"]["value"] == f"{name}-worker-0-0.{name}:1234"
    assert env["JAXOPERATOR_COORDINATOR_HOST"]["value"] == f"{name}-worker-0-0.{name}"
    assert env["JAXOPERATOR_NUM_PROCESSES"]["value"] == "2"
    assert env["JAXOPERATOR_PROCESS_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == (
        "metadata.labels['jobset.sigs.k8s.io/job-index']"
    )
    # The coordinator's name resolves only with JobSet's DNS hostnames on.
    assert jobset["spec"]["network"]["enableDNSHostnames"] is True


def test_pytorch_0_2_3_worker_form_is_worker_replicas_only(tmp_path):
    objects, _ = k8s_render(tmp_path, PYTORCH_023)
    job = objects[0]
    assert (job["apiVersion"], job["kind"]) == ("kubeflow.org/v1", "PyTorchJob")
    specs = job["spec"]["pytorchReplicaSpecs"]
    assert {t: rs["replicas"] for t, rs in specs.items()} == {"Worker": 4}
    assert job["spec"]["runPolicy"]["activeDeadlineSeconds"] == 6 * 3600
    assert specs["Worker"]["template"]["spec"]["containers"][0]["name"] == "pytorch"


def test_pytorch_master_and_worker_as_given_and_no_distribution_variables(tmp_path):
    text = manifest_yaml(
        "python train.py",
        operator="pytorch",
        types="    Master:\n      resources: {cpus: 2, memory: 4}\n"
        "    Worker:\n      count: 2\n      resources: {cpus: 2, memory: 4}\n",
    )
    (job,), _ = k8s_render(tmp_path, text)
    specs = job["spec"]["pytorchReplicaSpecs"]
    assert {t: rs["replicas"] for t, rs in specs.items()} == {"Master": 1, "Worker": 2}
    for template in pod_templates(job).values():
        # The training operator injects these; a second definition would shadow its values.
        assert not {"MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE"} & set(env_of(template))
        assert template["spec"]["containers"][0]["name"] == "pytorch"


def test_xgboost_keeps_master_and_workers(tmp_path):
    (job,), _ = k8s_render(tmp_path, EVERY_OPERATOR["xgboost"])
    assert (job["apiVersion"], job["kind"]) == ("kubeflow.org/v1", "XGBoostJob")
    specs = job["spec"]["xgbReplicaSpecs"]
    assert {t: rs["replicas"] for t, rs in specs.items()} == {"Master": 1, "Worker": 3}
    worker = specs["Worker"]["template"]["spec"]["containers"][0]
    assert worker["name"] == "xgboost"
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "2"


def test_xgboost_0_2_3_worker_form_makes_worker_0_the_master(tmp_path):
    text = manifest_yaml(
        "python train.py", operator="xgboost", types="    worker:\n      count: 3\n      resources: {memory: 1}\n"
    )
    (job,), _ = k8s_render(tmp_path, text)
    assert {t: rs["replicas"] for t, rs in job["spec"]["xgbReplicaSpecs"].items()} == {"Master": 1, "Worker": 2}


def test_kuberay_is_a_rayjob_with_head_worker_groups_and_entrypoint(tmp_path):
    (job,), _ = k8s_render(tmp_path, EVERY_OPERATOR["kuberay"])
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    spec = job["spec"]
    assert spec["entrypoint"] == "python main.py"
    assert spec["submissionMode"] == "K8sJobMode"
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == "2.23.0"
    assert cluster["headGroupSpec"]["rayStartParams"] == {"num-cpus": "0"}
    groups = {g["groupName"]: (g["replicas"], g["minReplicas"], g["maxReplicas"]) for g in cluster["workerGroupSpecs"]}
    assert groups == {"cpu": (3, 3, 3), "gpu": (2, 2, 2)}
    gpu = next(g for g in cluster["workerGroupSpecs"] if g["groupName"] == "gpu")
    assert gpu["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "4"
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    # KubeRay writes `ray start`; the workload's environment is on the head, where the driver runs.
    assert "command" not in head
    assert "AICHOR_OUTPUT_PATH" in env_of(cluster["headGroupSpec"]["template"])
    submitter = spec["submitterPodTemplate"]["spec"]
    assert submitter["restartPolicy"] == "Never"
    assert "nvidia.com/gpu" not in submitter["containers"][0]["resources"]["limits"]


def test_gpus_shm_selectors_tolerations_and_shared_volume(tmp_path):
    objects, _ = k8s_render(tmp_path, PYTORCH_023)
    job, pvc = objects[0], objects[1]
    pod = pod_templates(job)["Worker"]
    container = pod["spec"]["containers"][0]
    assert container["resources"] == {
        "requests": {"cpu": "8", "memory": "32Gi", "nvidia.com/gpu": "1"},
        "limits": {"cpu": "8", "memory": "32Gi", "nvidia.com/gpu": "1"},
    }
    assert pod["spec"]["nodeSelector"] == {"nvidia.com/gpu.product": "A100-SXM4-80GB", "pool": "a100"}
    assert pod["spec"]["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert volumes[mounts["/dev/shm"]]["emptyDir"] == {"medium": "Memory", "sizeLimit": "16Gi"}
    assert volumes[mounts["/mnt/datasets"]]["persistentVolumeClaim"] == {"claimName": "datasets"}
    claim = volumes[mounts["/mnt/shared"]]["persistentVolumeClaim"]["claimName"]
    assert (pvc["kind"], pvc["metadata"]["name"]) == ("PersistentVolumeClaim", claim)
    assert pvc["spec"] == {
        "accessModes": ["ReadWriteMany"],
        "resources": {"requests": {"storage": "16Gi"}},
        "storageClassName": "standard-rwo",
    }


def test_children_are_owned_by_the_top_object_once_created(tmp_path):
    objects, _ = k8s_render(tmp_path, PYTORCH_023)
    assert objects[1]["metadata"]["ownerReferences"][0]["uid"] == OWNER_UID
    created = owned_by(objects[1:], "5f0e7c1a-0000-4000-8000-000000000001")
    assert created[0]["metadata"]["ownerReferences"][0]["uid"] == "5f0e7c1a-0000-4000-8000-000000000001"
    assert objects[1]["metadata"]["ownerReferences"][0]["uid"] == OWNER_UID  # the input is left alone


def test_long_group_names_still_make_valid_pod_names(tmp_path):
    long = "a" + "-very-long-group-name" * 3
    text = manifest_yaml(
        "true",
        operator="jobset",
        types=f"    {long}:\n      count: 100\n      completions: 1000\n      resources: {{memory: 1}}\n"
        f"    {long}x:\n      count: 1\n      resources: {{memory: 1}}\n",
    )
    objects, _ = k8s_render(tmp_path, text)
    assert_valid(objects)
    names = [rj["name"] for rj in objects[0]["spec"]["replicatedJobs"]]
    assert len(set(names)) == 2


def test_s3_credentials_come_from_the_project_secret(tmp_path, settings):
    settings.AICHOR_STORAGE = "s3"
    settings.AICHOR_S3_ACCESS_KEY = "AKIAEXAMPLEKEY"
    settings.AICHOR_S3_SECRET_KEY = "never-in-a-pod-spec"
    objects, text = k8s_render(tmp_path, EVERY_OPERATOR["batch"])
    assert_valid(objects)
    assert "never-in-a-pod-spec" not in text and "AKIAEXAMPLEKEY" not in text
    env = env_of(pod_templates(objects[0])["job"])
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert env[key]["valueFrom"]["secretKeyRef"] == {"name": "aichor-s3", "key": key}
    assert env["AICHOR_OUTPUT_PATH"]["value"].startswith("s3://")


# ------------------------------------------------------------------ the command, with a project


@pytest.fixture
def k8s_project(project):
    engine = Engine.objects.create(
        name="gke",
        kind=Engine.Kind.KUBERNETES,
        config={"registry": "127.0.0.1:5000", "image_pull_secret": "regcred", "storage_class": "fast"},
    )
    project.engines.add(engine)
    project.default_engine = engine
    project.save()
    PersistentVolumeClaim.objects.create(project=project, engine=engine, name="datasets", size_mib=1024)
    set_variable(project, name="HF_TOKEN", kind=ProjectVariable.Kind.RUNTIME, value="hf_secret_value", sensitive=True)
    set_variable(project, name="LOG_LEVEL", kind=ProjectVariable.Kind.RUNTIME, value="debug", sensitive=False)
    return project


def test_project_variables_engine_registry_and_pvcs(tmp_path, k8s_project):
    text = manifest_yaml(
        "python main.py",
        extra_spec="  storage:\n    sharedVolume: {sizeGB: 2, mountPoint: /scratch}\n"
        "    attachExistingPVCs:\n      - {name: datasets, mountPoint: /data}\n",
    )
    objects, out = k8s_render(tmp_path, text, "--project", "vision")
    assert_valid(objects)
    job, pvc, secret = objects
    assert job["metadata"]["namespace"] == k8s_project.namespace
    assert job["metadata"]["labels"]["aichor.io/project"] == str(k8s_project.pk)
    pod = job["spec"]["template"]
    assert pod["spec"]["containers"][0]["image"].startswith(f"127.0.0.1:5000/{k8s_project.namespace}/demo@sha256:")
    assert pod["spec"]["imagePullSecrets"] == [{"name": "regcred"}]
    assert pvc["spec"]["storageClassName"] == "fast"
    env = env_of(pod)
    assert env["LOG_LEVEL"] == {"name": "LOG_LEVEL", "value": "debug"}
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": secret["metadata"]["name"], "key": "HF_TOKEN"}
    assert secret["kind"] == "Secret" and list(secret["stringData"]) == ["HF_TOKEN"]
    assert "hf_secret_value" not in out


def test_unknown_pvc_is_refused_by_name(tmp_path, k8s_project):
    text = manifest_yaml(
        "true", extra_spec="  storage:\n    attachExistingPVCs:\n      - {name: nope, mountPoint: /x}\n"
    )
    with pytest.raises(CommandError) as info:
        k8s_render(tmp_path, text, "--project", "vision", "--engine", "gke")
    assert info.value.returncode == 2


def test_a_non_kubernetes_engine_is_refused(tmp_path, k8s_project, local_engine):
    with pytest.raises(CommandError, match="not kubernetes"):
        k8s_render(tmp_path, EVERY_OPERATOR["batch"], "--engine", local_engine.name)


def test_invalid_manifest_prints_the_errors_and_exits_2(tmp_path):
    path = tmp_path / "manifest.yaml"
    path.write_text(manifest_yaml("true", operator="jobset", types="    Bad_Group:\n      count: -1\n"))
    result = subprocess.run(
        [sys.executable, "manage.py", "k8s_render", str(path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert "spec.types.Bad_Group" in result.stderr
    assert result.stdout == ""


def test_output_is_yaml_kubectl_can_read_in_one_go(tmp_path):
    objects, out = k8s_render(tmp_path, PYTORCH_023)
    assert out.startswith("# k8s_render ")
    assert [o["kind"] for o in objects] == ["PyTorchJob", "PersistentVolumeClaim"]
    assert out.count("\n---\n") == 1


# Shapes from AIchor's public demo guides (instadeepai jobset examples): users' manifests must
# render unchanged.
AICHOR_DEMO_JOBSETS = [
    """
    kind: AIchorManifest
    apiVersion: 0.2.1
    builder:
      image: jobset-multi-jobs
      dockerfile: ./Dockerfile
      context: .
    spec:
      operator: jobset
      image: jobset-multi-jobs
      command: "python -u src/main.10-2-10.py"
      types:
        worker:
          count: 10
          completions: 10   # optional, defaults to 1
          parallelisms: 2   # optional, defaults to 1
          resources:
            cpus: 2
            ramRatio: 2
            shmSizeGB: 0
    """,
    """
    kind: AIchorManifest
    apiVersion: 0.2.1
    builder:
      image: jobset-multi-jobs
      dockerfile: ./Dockerfile
      context: .
    spec:
      operator: jobset
      image: jobset-multi-jobs
      command: "python -u src/main.py"
      types:
        worker-heavy:
          count: 1
          resources:
            cpus: 60
            ramRatio: 2
            shmSizeGB: 0
        worker:
          count: 7
          resources:
            cpus: 20
            ramRatio: 2
            shmSizeGB: 0
    """,
]


@pytest.mark.parametrize("text", AICHOR_DEMO_JOBSETS)
def test_aichor_demo_jobsets_render_unchanged(tmp_path, text):
    (jobset,), _ = k8s_render(tmp_path, dedent(text))
    assert_valid([jobset])
    by_name = {rj["name"]: rj for rj in jobset["spec"]["replicatedJobs"]}
    for rj in by_name.values():
        pod = rj["template"]["spec"]["template"]["spec"]
        assert "volumes" not in pod  # shmSizeGB: 0 asks for no /dev/shm volume
    if "worker-heavy" in by_name:
        assert by_name["worker-heavy"]["template"]["spec"]["template"]["spec"]["containers"][0]["resources"][
            "requests"
        ] == {"cpu": "60", "memory": "120Gi"}
    else:
        job = by_name["worker"]["template"]["spec"]
        assert (by_name["worker"]["replicas"], job["completions"], job["parallelism"]) == (10, 10, 2)


def test_without_engine_the_projects_kubernetes_engine_is_used(tmp_path, k8s_project, local_engine):
    k8s_project.default_engine = local_engine
    k8s_project.save()
    objects, _ = k8s_render(tmp_path, EVERY_OPERATOR["batch"], "--project", "vision")
    job = objects[0]
    assert job["spec"]["template"]["spec"]["containers"][0]["image"].startswith("127.0.0.1:5000/")
