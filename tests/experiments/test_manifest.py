"""Manifest validation: what a user sees when their manifest.yaml is accepted or refused."""

import pickle
from textwrap import dedent

import pytest

from experiments.manifest import (
    OPERATORS,
    Manifest,
    ManifestError,
    parse_duration,
    parse_manifest,
)
from experiments.manifest.types import Clone, Gpu, PvcMount, SharedVolume
from tests.helpers import manifest_yaml


def errors_of(text: str, **kwargs) -> list[str]:
    with pytest.raises(ManifestError) as info:
        parse_manifest(dedent(text), **kwargs)
    return info.value.errors


def manifest(spec_body: str, *, head: str = "", api_version: str = "0.2.3") -> str:
    """A valid preamble plus an indented spec body, to keep each test about one thing."""
    return (
        f"kind: AIchorManifest\napiVersion: {api_version}\n{dedent(head)}"
        "builder:\n  image: img\nspec:\n  image: img\n  command: python main.py\n"
        + "".join(f"  {line}\n" for line in dedent(spec_body).strip("\n").splitlines())
    )


# ------------------------------------------------------------------ valid manifests


PYTORCH_023 = """
# yaml-language-server: $schema=https://example.invalid/manifest.schema.json
kind: AIchorManifest
apiVersion: 0.2.3

builder:
  image: llm-finetune
  dockerfile: ./Dockerfile
  context: .
  buildArgs:
    USE_CUDA: true
    PYTHON_VERSION: 3.11
    BASE: nvcr.io/nvidia/pytorch:24.01-py3
  target: train

clone:
  depth: 5
  includeDotGit: true
  submodules: recursive

spec:
  operator: pytorch
  image: llm-finetune
  command: "torchrun src/train.py --lr 3e-4"
  timeout: "6h"
  env:
    LR: 0.001
    WANDB_MODE: offline
    DEBUG: false
  tensorboard:
    enabled: true
  storage:
    sharedVolume:
      mountPoint: /mnt/shared
      sizeGB: 16
      storageClass: standard-rwo
      accessMode: ReadWriteMany
    attachExistingPVCs:
      - name: datasets
        mountPoint: /mnt/datasets
  debug:
    holdOnFailure: 30m
  types:
    worker:
      count: 4
      resources:
        cpus: 8
        ramRatio: 4
        shmSizeGB: 16
        cpuLimitRatio: 1
        accelerators:
          gpu:
            count: 1
            type: gpu
            product: A100-SXM4-80GB
        extraSelectors:
          pool: a100
        extraTolerations:
          - key: nvidia.com/gpu
            operator: Exists
            effect: NoSchedule
"""


def test_realistic_pytorch_manifest_is_normalised_for_the_pipeline():
    result = parse_manifest(PYTORCH_023, known_pvcs={"datasets"})

    builder = result.builder
    assert builder.dockerfile == "Dockerfile"
    assert builder.build_args == {
        "USE_CUDA": "true",
        "PYTHON_VERSION": "3.11",
        "BASE": "nvcr.io/nvidia/pytorch:24.01-py3",
    }
    assert builder.target == "train"
    assert result.clone == Clone(depth=5, include_dot_git=True, submodules="recursive")

    spec = result.spec
    assert spec.operator == "pytorch"
    assert spec.command == "torchrun src/train.py --lr 3e-4"
    assert spec.timeout == 6 * 3600
    assert spec.env == {"LR": "0.001", "WANDB_MODE": "offline", "DEBUG": "false"}
    assert spec.tensorboard is True
    assert spec.storage.shared_volume == SharedVolume(
        size_gb=16, mount_point="/mnt/shared", storage_class="standard-rwo", access_mode="ReadWriteMany"
    )
    assert spec.storage.pvcs == [PvcMount("datasets", "/mnt/datasets")]
    assert spec.debug.hold_on_failure == 1800
    assert spec.ray_pools == []  # only kuberay has worker pools
    assert "workers" not in result.to_dict()["spec"]

    (worker,) = spec.groups
    assert (worker.name, worker.count) == ("worker", 4)
    resources = worker.resources
    assert resources.memory_gb == 32.0  # 8 CPUs x 4 GB
    assert resources.cpu_limit_ratio == 1
    assert resources.gpu == Gpu(count=1, type="gpu", product="A100-SXM4-80GB")
    assert resources.tpu is None
    assert resources.extra_selectors == {"pool": "a100"}
    assert resources.extra_tolerations == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]


def test_legacy_0_2_2_master_and_worker_manifest_is_accepted():
    text = """
    kind: AIchorManifest
    apiVersion: 0.2.2
    builder:
      image: keras-demo
      dockerfile: ./Dockerfile
      context: .
      buildArgs:
        USE_CUDA: "true"
    spec:
      operator: xgboost
      image: keras-demo
      command: python train.py
      tensorboard:
        enabled: true
      types:
        Master:
          count: 1
          resources:
            cpus: 4
            ramRatio: 2
        Worker:
          count: 3
          resources:
            cpus: 8
            memory: 24
    """
    result = parse_manifest(dedent(text))

    assert result.api_version == "0.2.2"
    master, worker = result.spec.groups
    assert (master.name, worker.name) == ("Master", "Worker")  # names kept as written
    assert master.resources.memory_gb == 8.0
    assert worker.count == 3
    assert worker.resources.memory_gb == 24.0


def test_pytorch_worker_alone_in_legacy_spelling_is_accepted():
    result = parse_manifest(
        manifest(
            """
            operator: pytorch
            types:
              Worker:
                count: 2
                resources: {ramRatio: 2}
            """,
            api_version="0.2.2",
        )
    )
    assert result.spec.group("Worker").count == 2


def test_0_2_1_manifest_from_aichor_demos_is_accepted():
    # Verbatim shape of AIchor's public jobset demo, including shmSizeGB: 0.
    text = """
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
        worker:
          count: 10
          completions: 10   # optional, defaults to 1
          parallelisms: 2   # optional, defaults to 1
          resources:
            cpus: 2
            ramRatio: 2
            shmSizeGB: 0
    """
    result = parse_manifest(dedent(text))

    worker = result.spec.group("worker")
    assert (worker.count, worker.completions, worker.parallelisms) == (10, 10, 2)
    assert worker.resources.shm_size_gb == 0
    assert worker.resources.memory_gb == 4.0


def test_jax_manifest_is_accepted():
    result = parse_manifest(
        manifest(
            """
            operator: jax
            timeout: "1d"
            types:
              worker:
                count: 2
                resources:
                  cpus: 16
                  memory: 64
                  shmSizeGB: 32
                  accelerators:
                    gpu: {count: 1, product: Tesla-V100-SXM3-32GB, type: gpu}
            """
        )
    )
    assert result.spec.timeout == 86400
    worker = result.spec.groups[0]
    assert worker.count == 2
    assert worker.resources.memory_gb == 64.0
    assert worker.resources.ram_ratio is None
    assert worker.resources.gpu.count == 1


def test_jobset_with_two_groups_keeps_both_with_their_own_settings():
    result = parse_manifest(
        manifest(
            """
            operator: jobset
            types:
              worker-heavy:
                count: 1
                resources: {cpus: 60, ramRatio: 2}
              worker:
                count: 7
                completions: 4
                resources: {cpus: 20, memory: 40}
            """
        )
    )
    heavy, worker = result.spec.groups
    assert (heavy.name, worker.name) == ("worker-heavy", "worker")
    assert heavy.resources.memory_gb == 120.0
    assert heavy.completions == 1
    assert worker.completions == 4
    assert worker.parallelisms == 1


def test_kuberay_head_stays_in_types_and_worker_pools_become_a_list():
    result = parse_manifest(
        manifest(
            """
            operator: kuberay
            rayVersion: "2.23.0"
            types:
              Head:
                resources: {cpus: 8, ramRatio: 2}
                rayStartParams:
                  object-store-memory: 1000000000
                  dashboard-host: 0.0.0.0
              Workers:
                - name: gpu-workers
                  count: 2
                  resources:
                    cpus: 16
                    memory: 64
                    accelerators: {gpu: {count: 2}}
                - name: cpu-workers
                  resources: {ramRatio: 1}
            """
        )
    )
    spec = result.spec
    assert spec.ray_version == "2.23.0"
    head = spec.group("Head")
    assert head.count == 1
    assert head.ray_start_params == {
        "object-store-memory": "1000000000",
        "dashboard-host": "0.0.0.0",
    }
    assert [(g.name, g.count, g.ray_pool) for g in spec.groups] == [
        ("Head", 1, False),
        ("gpu-workers", 2, True),
        ("cpu-workers", 0, True),  # worker pools default to empty
    ]
    assert spec.ray_pools[0].resources.gpu.count == 2
    stored = result.to_dict()["spec"]
    assert list(stored["types"]) == ["Head"]
    assert [w["name"] for w in stored["workers"]] == ["gpu-workers", "cpu-workers"]


def test_kuberay_without_worker_pools_is_a_head_only_cluster():
    result = parse_manifest(
        manifest(
            """
            operator: kuberay
            types:
              Head:
                resources: {ramRatio: 2}
            """
        )
    )
    assert [g.name for g in result.spec.groups] == ["Head"]
    assert result.to_dict()["spec"]["workers"] == []


def test_batch_manifest_runs_one_process():
    result = parse_manifest(
        manifest(
            """
            operator: batch
            types:
              main:
                resources: {cpus: 2, memory: 4}
            """
        )
    )
    assert [(g.name, g.count) for g in result.spec.groups] == [("main", 1)]


def test_minimal_manifest_gets_every_default_filled_in():
    text = """
    kind: AIchorManifest
    apiVersion: 0.2.3
    builder:
      image: myimage
    spec:
      operator: jobset
      image: myimage
      command: python3 -u main.py
      types:
        worker:
          resources:
            ramRatio: 2
    """
    assert parse_manifest(dedent(text)).to_dict() == {
        "kind": "AIchorManifest",
        "apiVersion": "0.2.3",
        "builder": {
            "image": "myimage",
            "dockerfile": "Dockerfile",
            "context": ".",
            "buildArgs": {},
            "registry": None,
            "target": None,
            "skipBuild": {
                "enabled": False,
                "experimentID": None,
                "failIfNotFound": False,
            },
        },
        "clone": {"depth": 1, "includeDotGit": False, "submodules": "false"},
        "spec": {
            "operator": "jobset",
            "image": "myimage",
            "command": "python3 -u main.py",
            "timeout": None,
            "env": {},
            "tensorboard": {"enabled": False},
            "storage": {"sharedVolume": None, "attachExistingPVCs": []},
            "debug": {
                "jupyter": False,
                "vscode": {"enabled": False, "path": None, "provider": None},
                "holdOnFailure": None,
            },
            "rayVersion": None,
            "types": {
                "worker": {
                    "count": 1,
                    "completions": 1,
                    "parallelisms": 1,
                    "resources": {
                        "cpus": 1,
                        "memoryGB": 2.0,
                        "ramRatio": 2,
                        "memory": None,
                        "cpuLimitRatio": 2,
                        "shmSizeGB": None,
                        "gpu": None,
                        "tpu": None,
                        "rdma": None,
                        "extraSelectors": {},
                        "extraTolerations": [],
                    },
                }
            },
        },
    }


def test_fields_aichor_fills_in_or_ignores_are_accepted():
    # AIchor's reference: kind/apiVersion optional, a top-level name, builder.image
    # optional, and empty optional blocks (every line commented out).
    text = """
    name: nightly eval
    builder:
      dockerfile: docker/Dockerfile
    spec:
      operator: batch
      image: evalimg
      command: python eval.py
      env:
      types:
        worker:
          resources: {memory: 2}
    """
    result = parse_manifest(dedent(text))
    assert result.kind == "AIchorManifest"
    assert result.api_version == "0.2.3"
    assert result.builder.image == "evalimg"
    assert result.builder.dockerfile == "docker/Dockerfile"
    assert result.spec.env == {}
    assert "name" not in result.to_dict()


def test_timeout_wins_over_active_deadline_seconds():
    both = manifest(
        """
        operator: batch
        timeout: 90s
        activeDeadlineSeconds: 7200
        types: {worker: {resources: {memory: 1}}}
        """
    )
    only_deadline = manifest(
        """
        operator: batch
        activeDeadlineSeconds: 7200
        types: {worker: {resources: {memory: 1}}}
        """
    )
    assert parse_manifest(both).spec.timeout == 90
    assert parse_manifest(only_deadline).spec.timeout == 7200


def test_known_pvc_is_accepted():
    text = manifest(
        """
        operator: batch
        storage:
          attachExistingPVCs:
            - {name: team-data, mountPoint: /data}
        types: {worker: {resources: {memory: 1}}}
        """
    )
    result = parse_manifest(text, known_pvcs={"team-data", "other"})
    assert result.spec.storage.pvcs == [PvcMount("team-data", "/data")]


def test_submodules_written_as_a_yaml_boolean_means_the_string():
    text = manifest(
        "operator: batch\ntypes: {worker: {resources: {memory: 1}}}",
        head="clone:\n  includeDotGit: true\n  submodules: true\n",
    )
    assert parse_manifest(text).clone.submodules == "true"


# ------------------------------------------------------- the stored form and the totals

# One manifest per operator, each with what its operator allows beyond the defaults.
EVERY_OPERATOR = {
    "batch": manifest_yaml("python main.py", extra_spec="  env: {A: b}\n  timeout: 1h\n"),
    "jobset": manifest_yaml(
        "python main.py",
        operator="jobset",
        types="    driver:\n      resources: {memory: 2}\n"
        "    workers:\n      count: 3\n      completions: 4\n      parallelisms: 2\n"
        "      resources: {cpus: 2, ramRatio: 2, accelerators: {tpu: {type: v5e, topology: 2x2, tpuChipsCount: 4}}}\n",
    ),
    "jax": manifest_yaml(
        "python main.py", operator="jax", types="    worker:\n      count: 2\n      resources: {memory: 8}\n"
    ),
    "pytorch": PYTORCH_023,
    "xgboost": manifest_yaml(
        "python main.py",
        operator="xgboost",
        types="    Master:\n      resources: {cpus: 2, memory: 4}\n"
        "    Worker:\n      count: 3\n      resources: {cpus: 4, ramRatio: 1, accelerators: {gpu: {count: 2}}}\n",
    ),
    "tf": manifest_yaml(
        "python main.py",
        operator="tf",
        types="    Chief:\n      resources: {cpus: 2, memory: 4}\n"
        "    Worker:\n      count: 2\n      resources: {cpus: 2, memory: 4}\n"
        "    PS:\n      resources: {cpus: 1, memory: 2}\n",
    ),
    "kuberay": manifest_yaml(
        "python main.py",
        operator="kuberay",
        extra_spec='  rayVersion: "2.23.0"\n',
        types="    Head:\n      resources: {cpus: 4, memory: 8}\n      rayStartParams: {num-cpus: 0}\n"
        "    Workers:\n"
        "      - name: cpu\n        count: 3\n        resources: {cpus: 2, ramRatio: 2}\n"
        "      - name: gpu\n        count: 2\n        resources:\n          cpus: 8\n          memory: 32\n"
        "          accelerators: {gpu: {count: 4, type: h100}}\n",
    ),
}


@pytest.mark.parametrize("operator", OPERATORS)
def test_the_stored_form_reads_back_as_the_same_manifest(operator):
    parsed = parse_manifest(EVERY_OPERATOR[operator], known_pvcs={"datasets"})
    assert parsed.spec.operator == operator
    stored = parsed.to_dict()
    assert Manifest.from_dict(stored) == parsed
    assert Manifest.from_dict(stored).to_dict() == stored


def test_jobset_totals_count_only_the_completions_running_at_once():
    totals = parse_manifest(EVERY_OPERATOR["jobset"]).totals()
    # driver: 1 process; workers: count 3 × min(parallelisms 2, completions 4) = 6 at once.
    assert totals.processes == 1 + 6
    assert totals.cpus == 1 + 6 * 2
    assert totals.memory_gb == 2 + 6 * 4
    assert (totals.gpus, totals.tpu_chips) == (0, 6 * 4)


def test_kuberay_totals_count_the_head_and_every_pool():
    totals = parse_manifest(EVERY_OPERATOR["kuberay"]).totals()
    assert totals.as_json() == {
        "processes": 1 + 3 + 2,
        "cpus": 4 + 3 * 2 + 2 * 8,
        "gpus": 8,
        "gpus_by_type": {"h100": 8},
        "memory_gb": 8 + 3 * 4 + 2 * 32,
        "tpu_chips": 0,
    }
    assert (totals.gpu_text, totals.gpu_short) == ("8 × H100", "8 × H100")


def test_gpus_are_named_by_product_type_or_not_at_all():
    # PYTORCH_023 writes AIchor's generic `type: gpu` with a product: the product names them.
    pytorch = parse_manifest(PYTORCH_023).totals()
    assert pytorch.gpus_by_type == {"A100-SXM4-80GB": 4}
    assert pytorch.gpu_text == "4 × A100-SXM4-80GB"
    assert pytorch.gpu_short == "4"  # too long for a table column
    xgboost = parse_manifest(EVERY_OPERATOR["xgboost"]).totals()
    assert (xgboost.gpus, xgboost.gpus_by_type, xgboost.gpu_text) == (6, {"": 6}, "6")
    assert parse_manifest(EVERY_OPERATOR["batch"]).totals().gpu_text == "0"


# ----------------------------------------------------------------- refused manifests


def test_every_problem_is_reported_at_once_with_its_path():
    text = """
    kind: AIchorManifest
    apiVersion: 0.2.3
    builder:
      image: img
    spec:
      operator: pytorch
      image: img
      command: python train.py
      types:
        worker:
          count: 2
          resources:
            cpus: 4
        Master:
          resources:
            cpus: -1
            memory: 4
            ramRatio: 2
    """
    errors = errors_of(text)
    assert "spec.types.worker.resources: set exactly one of ramRatio or memory" in errors
    assert "spec.types.Master.resources: set exactly one of ramRatio or memory" in errors
    assert any(e.startswith("spec.types.Master.resources.cpus: ") for e in errors)
    assert any(e.startswith("spec.types: use either 'worker'") for e in errors)
    assert len(errors) == 4


def test_error_message_joins_every_problem_on_its_own_line():
    exc = ManifestError(["a.b: first", "c: second"])
    assert str(exc) == "a.b: first\nc: second"
    assert exc.errors == ["a.b: first", "c: second"]
    # Celery pickles task exceptions; the errors must survive the round trip.
    assert pickle.loads(pickle.dumps(exc)).errors == ["a.b: first", "c: second"]


def test_unsupported_api_version_is_refused():
    errors = errors_of(manifest("operator: batch", api_version="0.2.0"))
    assert errors[0].startswith("apiVersion: unsupported version '0.2.0'")


def test_wrong_kind_is_refused():
    text = manifest("operator: batch\ntypes: {worker: {resources: {memory: 1}}}")
    errors = errors_of(text.replace("kind: AIchorManifest", "kind: Deployment"))
    assert errors == ["kind: must be AIchorManifest, got 'Deployment'"]


def test_unknown_keys_are_reported_with_their_path_and_a_suggestion():
    errors = errors_of(
        manifest(
            """
            operator: batch
            tiemout: 1h
            types:
              worker:
                resources: {memory: 1, ramratio: 2}
            """,
            head="metadata: {}\n",
        )
    )
    assert "metadata: unknown field; expected one of: " in errors[0]
    assert "spec.tiemout: unknown field; did you mean 'timeout'?" in errors
    assert "spec.types.worker.resources.ramratio: unknown field; did you mean 'ramRatio'?" in errors


def test_jobset_only_keys_outside_jobset_are_explained():
    errors = errors_of(
        manifest(
            """
            operator: jax
            types:
              worker: {completions: 2, resources: {memory: 1}}
            """
        )
    )
    assert errors == [("spec.types.worker.completions: unknown field: only the jobset operator uses completions")]


def test_spec_image_must_match_builder_image():
    text = manifest("operator: batch\ntypes: {worker: {resources: {memory: 1}}}")
    errors = errors_of(text.replace("  image: img\n  command", "  image: other\n  command"))
    assert errors == ["spec.image: must be the image the builder builds ('img'), got 'other'"]


def test_command_must_be_a_non_empty_string():
    text = manifest("operator: batch\ntypes: {worker: {resources: {memory: 1}}}")
    assert errors_of(text.replace("python main.py", '""')) == ["spec.command: must not be empty"]
    assert errors_of(text.replace("python main.py", "[python, main.py]")) == ["spec.command: must be text, got a list"]


def test_negative_and_fractional_counts_are_refused():
    errors = errors_of(
        manifest(
            """
            operator: jobset
            types:
              a: {count: -1, resources: {memory: 1}}
              b: {count: 1.5, resources: {memory: 1}}
              c: {count: 1, completions: 0, resources: {memory: 1}}
            """
        )
    )
    assert errors == [
        "spec.types.a.count: must be 0 or more, got -1",
        "spec.types.b.count: must be a whole number, got the number 1.5",
        "spec.types.c.completions: must be at least 1, got 0",
    ]


def test_bad_jobset_group_name_is_refused():
    errors = errors_of(
        manifest(
            """
            operator: jobset
            types:
              Worker_GPU: {resources: {memory: 1}}
            """
        )
    )
    assert len(errors) == 1
    assert errors[0].startswith("spec.types.Worker_GPU: jobset group names must")


def test_wrong_process_type_for_operator_is_refused():
    errors = errors_of(
        manifest(
            """
            operator: pytorch
            types:
              workers: {resources: {memory: 1}}
            """
        )
    )
    assert errors == [("spec.types.workers: unknown process type; pytorch accepts 'worker', or 'Master' and 'Worker'")]


def test_master_runs_exactly_one_process():
    errors = errors_of(
        manifest(
            """
            operator: pytorch
            types:
              Master: {count: 2, resources: {memory: 1}}
              Worker: {count: 2, resources: {memory: 1}}
            """
        )
    )
    assert errors == ["spec.types.Master.count: there is exactly one Master; count must be 1"]


def test_batch_refuses_more_than_one_process():
    errors = errors_of(
        manifest(
            """
            operator: batch
            types:
              worker: {count: 3, resources: {memory: 1}}
            """
        )
    )
    assert len(errors) == 1
    assert errors[0].startswith("spec.types.worker.count: batch runs a single process")


def test_kuberay_needs_a_head():
    errors = errors_of(
        manifest(
            """
            operator: kuberay
            types:
              Workers:
                - {name: pool, count: 1, resources: {memory: 1}}
                - {name: pool, resources: {cpus: 2}}
            """
        )
    )
    assert errors == [
        "spec.types.Head: required field is missing: kuberay needs a Ray head",
        "spec.types.Workers[1].name: another worker pool is already named 'pool'",
        "spec.types.Workers[1].resources: set exactly one of ramRatio or memory",
    ]


def test_missing_or_empty_types_is_refused():
    assert "spec.types: required field is missing" in errors_of(manifest("operator: batch"))
    assert errors_of(manifest("operator: batch\ntypes: {}")) == ["spec.types: must define at least one process type"]


def test_unsupported_operator_is_refused_but_resources_are_still_checked():
    errors = errors_of(
        manifest(
            """
            operator: mpi
            types:
              Worker: {count: 2, resources: {cpus: 2}}
            """
        )
    )
    assert errors == [
        f"spec.operator: unsupported operator 'mpi'; use one of {', '.join(OPERATORS)}",
        "spec.types.Worker.resources: set exactly one of ramRatio or memory",
    ]


def test_legacy_tf_operator_takes_chief_worker_and_ps():
    # The shape of AIchor's own tf sample (apiVersion 0.2.2, Worker only) and a distributed one.
    single = parse_manifest(manifest("operator: tf\ntypes:\n  Worker: {count: 1, resources: {cpus: 1, ramRatio: 2}}"))
    assert [(g.name, g.count) for g in single.spec.groups] == [("Worker", 1)]
    types = "  Chief: {resources: {memory: 4}}\n  Worker: {count: 2, resources: {memory: 4}}\n"
    full = parse_manifest(manifest(f"operator: tf\ntypes:\n{types}  PS: {{count: 2, resources: {{memory: 2}}}}"))
    assert [(g.name, g.count) for g in full.spec.groups] == [("Chief", 1), ("Worker", 2), ("PS", 2)]
    assert full.totals().processes == 5


def test_tf_types_are_checked():
    errors = errors_of(
        manifest(
            """
            operator: tf
            types:
              Chief: {count: 2, resources: {memory: 4}}
              worker: {count: 2, resources: {memory: 4}}
            """
        )
    )
    assert errors == [
        "spec.types.worker: unknown process type; tf accepts 'Chief', 'Worker' and 'PS'",
        "spec.types.Chief.count: there is exactly one Chief; count must be 1",
    ]
    assert errors_of(manifest("operator: tf\ntypes:\n  PS: {resources: {memory: 4}}")) == [
        "spec.types: tf needs a 'Worker' or a 'Chief' type besides 'PS'"
    ]


@pytest.mark.parametrize("name", ["AICHOR_INPUT_PATH", "AICHOR_LOGS_PATH", "RANK", "TF_CONFIG", "RAY_SERVER"])
def test_a_protected_name_in_spec_env_is_an_error_naming_it(name):
    env = f"env: {{FINE: yes, {name}: /elsewhere}}"
    errors = errors_of(manifest(f"operator: batch\n{env}\ntypes:\n  worker: {{resources: {{memory: 1}}}}"))
    assert errors == [f"spec.env.{name}: {name} is set by aichor and cannot be overridden; remove it"]


def test_resource_limits_are_checked():
    errors = errors_of(
        manifest(
            """
            operator: batch
            types:
              worker:
                resources:
                  cpus: 0
                  memory: 4
                  cpuLimitRatio: 0.5
                  accelerators:
                    gpu: {count: -1}
                    tpu: {type: v5e}
            """
        )
    )
    assert errors == [
        "spec.types.worker.resources.cpus: must be greater than 0, got 0",
        "spec.types.worker.resources.accelerators: set at most one of gpu or tpu",
        "spec.types.worker.resources.accelerators.gpu.count: must be 0 or more, got -1",
        "spec.types.worker.resources.cpuLimitRatio: must be at least 1, got 0.5",
    ]


@pytest.mark.parametrize("value", [".inf", ".nan", "-.inf", '"4"'])
def test_resource_numbers_must_be_real_finite_numbers(value):
    text = manifest(f"operator: batch\ntypes: {{worker: {{resources: {{memory: {value}}}}}}}")
    errors = errors_of(text)
    assert len(errors) == 1
    assert errors[0].startswith("spec.types.worker.resources.memory: must be a number")


@pytest.mark.parametrize(
    ("field", "value"),
    [("timeout", "5 hours"), ("timeout", "0s"), ("debug", "{holdOnFailure: soon}")],
)
def test_bad_durations_are_refused_with_their_path(field, value):
    types = "types: {worker: {resources: {memory: 1}}}"
    errors = errors_of(manifest(f"operator: batch\n{field}: {value}\n{types}"))
    path = "spec.timeout" if field == "timeout" else "spec.debug.holdOnFailure"
    assert len(errors) == 1
    assert errors[0].startswith(f"{path}: ")


def test_submodules_need_include_dot_git():
    text = manifest(
        "operator: batch\ntypes: {worker: {resources: {memory: 1}}}",
        head="clone:\n  submodules: recursive\n",
    )
    assert errors_of(text) == [
        ("clone.submodules: submodules need the repository's .git folder; set clone.includeDotGit: true")
    ]


def test_clone_depth_must_be_at_least_one():
    text = manifest(
        "operator: batch\ntypes: {worker: {resources: {memory: 1}}}",
        head="clone:\n  depth: 0\n",
    )
    assert errors_of(text) == ["clone.depth: must be at least 1, got 0"]


def test_skip_build_needs_an_experiment_id():
    text = manifest("operator: batch\ntypes: {worker: {resources: {memory: 1}}}").replace(
        "  image: img\nspec", "  image: img\n  skipBuild: {enabled: true}\nspec"
    )
    errors = errors_of(text)
    assert len(errors) == 1
    assert errors[0].startswith("builder.skipBuild.experimentID: required when skipBuild")


def test_build_paths_cannot_leave_the_repository():
    text = manifest("operator: batch\ntypes: {worker: {resources: {memory: 1}}}").replace(
        "  image: img\nspec",
        "  image: img\n  context: /\n  dockerfile: ../../etc/Dockerfile\nspec",
    )
    assert errors_of(text) == [
        "builder.dockerfile: must stay inside the repository (no '..')",
        "builder.context: must be a path relative to the repository",
    ]


def test_unknown_pvc_is_refused():
    text = manifest(
        """
        operator: batch
        storage:
          attachExistingPVCs:
            - {name: x, mountPoint: /mnt/x}
        types: {worker: {resources: {memory: 1}}}
        """
    )
    assert errors_of(text, known_pvcs={"datasets"}) == [
        ("spec.storage.attachExistingPVCs[0].name: no persistent volume claim named 'x' in this project")
    ]
    # Without a project to check against (e.g. a CLI preview) the name is not checked.
    assert [p.name for p in parse_manifest(text).spec.storage.pvcs] == ["x"]


def test_two_volumes_on_one_mount_point_are_refused():
    text = manifest(
        """
        operator: batch
        storage:
          sharedVolume: {mountPoint: /mnt/data, sizeGB: 10}
          attachExistingPVCs:
            - {name: data, mountPoint: /mnt/data}
        types: {worker: {resources: {memory: 1}}}
        """
    )
    assert errors_of(text) == [
        (
            "spec.storage.attachExistingPVCs[0].mountPoint: "
            "/mnt/data is already used by spec.storage.sharedVolume.mountPoint"
        )
    ]


def test_yaml_syntax_error_gives_one_error_with_the_line():
    text = "kind: AIchorManifest\nspec:\n  command: python main.py\n   image: img\n"
    errors = errors_of(text)
    assert len(errors) == 1
    assert errors[0].startswith("manifest: invalid YAML at line 4")


def test_duplicate_keys_are_refused_instead_of_silently_overwritten():
    errors = errors_of("spec: {}\nbuilder: {}\nspec: {}\n")
    assert len(errors) == 1
    assert "line 3" in errors[0]
    assert "duplicate key 'spec'" in errors[0]


def test_non_mapping_document_gives_one_error_with_the_line():
    errors = errors_of("# my manifest\n\n- operator: jax\n- image: img\n")
    assert errors == [
        ("manifest: line 3: the top level must be a mapping of fields (kind, apiVersion, builder, spec), got a list")
    ]


@pytest.mark.parametrize("text", ["", "   \n", "# only a comment\n", "---\n"])
def test_empty_document_is_refused(text):
    assert errors_of(text) == ["manifest: the file is empty; expected kind, apiVersion, builder and spec"]


@pytest.mark.parametrize(
    "text",
    [
        "just text",
        "spec: []\nbuilder: 5",
        "builder: {buildArgs: [a, b]}\nspec: {types: [worker]}",
        "builder: {}\nspec: {operator: [jax], types: {worker: 5}}",
        "builder: {}\nspec: {operator: kuberay, types: {Head: [], Workers: {a: 1}}}",
        "builder: {}\nspec: {operator: jobset, types: {1: {}, null: {}}}",
        "builder: {}\nspec: {env: {A: {b: c}}, storage: {attachExistingPVCs: [5]}}",
        "builder: {skipBuild: yes}\nclone: {submodules: [1]}\nspec: {debug: []}",
        "apiVersion: [0.2.3]\nkind: {a: b}\nbuilder: {}\nspec: {timeout: [1]}",
        "builder: {}\nspec: {types: {w: {resources: {cpus: nan, memory: .inf}}}}",
        "builder: {}\nspec: {experimentID: 2024-01-01, types: {w: {count: true}}}",
        "{a: b}: c",
        "!!python/object:os.system x",
        "a: &a [1]\nb: *a\nc: *unknown",
        "[" * 3000,
        "builder: {}\nspec: {}\n" + "x: y\n" * 200_000,
    ],
)
def test_garbage_only_ever_raises_manifest_error(text):
    # The pipeline relies on ManifestError being the only failure mode.
    errors = errors_of(text)
    assert errors
    assert all(isinstance(e, str) and ": " in e for e in errors)


# ------------------------------------------------------------------- durations


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("90s", 90),
        ("15m", 900),
        ("6h", 21600),
        ("1d", 86400),
        ("1h30m", 5400),
        ("1.5h", 5400),
        ("3600", 3600),
        (3600, 3600),
        (0, 0),
    ],
)
def test_parse_duration_accepts_the_documented_forms(value, seconds):
    assert parse_duration(value) == seconds


@pytest.mark.parametrize("value", ["", "h", "6 h", "-5m", "1w", "6H", "soon", -1, True, 1.5, None, []])
def test_parse_duration_refuses_anything_else(value):
    with pytest.raises(ValueError):
        parse_duration(value)
