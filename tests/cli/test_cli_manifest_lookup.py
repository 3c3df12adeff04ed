"""`aichor experiments submit local` finds the manifest as AIchor's CLI does (-f/--manifest, else
manifest.yaml at the root, else aichor_manifests/manifest.yaml), and `aichor local-repo init`
asks for, or takes flags for, the operator and resources, writing only operators AIchor has."""

import pytest

from experiments.manifest import parse_manifest
from tests.helpers import manifest_yaml

pytestmark = pytest.mark.django_db(transaction=True)


def repo_with(root, files: dict[str, str]):
    for rel, text in {"Dockerfile": "FROM scratch\n", **files}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def submit(cli, repo, *args: str, check: bool = True):
    return cli.run("experiments", "submit", "local", "--repo-dir", str(repo), *args, check=check)


def test_a_root_manifest_wins_over_aichor_manifests(logged_in, tmp_path, celery_worker_thread):
    repo = repo_with(
        tmp_path / "repo",
        {
            "manifest.yaml": manifest_yaml("echo from-the-root"),
            "aichor_manifests/manifest.yaml": manifest_yaml("false"),
        },
    )
    experiment = logged_in.json("experiments", "submit", "local", "--repo-dir", str(repo))
    assert experiment["manifest_path"] == "manifest.yaml"
    done = logged_in.wait_status(experiment["id"], ("Succeeded", "Failed", "Cancelled"))
    assert done["status"] == "Succeeded", done["failure_reason"]
    assert "from-the-root" in logged_in.run("experiments", "logs", experiment["id"]).stdout


def test_without_a_root_manifest_aichor_manifests_is_used(logged_in, tmp_path):
    repo = repo_with(tmp_path / "repo", {"aichor_manifests/manifest.yaml": manifest_yaml("true")})
    assert logged_in.json("experiments", "submit", "local", "--repo-dir", str(repo))["manifest_path"] == (
        "aichor_manifests/manifest.yaml"
    )


def test_f_names_the_manifest_from_the_root_or_aichor_manifests(logged_in, tmp_path):
    repo = repo_with(
        tmp_path / "repo",
        {
            "manifest.yaml": manifest_yaml("true"),
            "aichor_manifests/train.yaml": manifest_yaml("true"),
            "configs/big.yaml": manifest_yaml("true"),
        },
    )
    # As in a commit message, a name is relative to aichor_manifests/ ...
    assert logged_in.json("experiments", "submit", "local", "--repo-dir", str(repo), "-f", "train.yaml")[
        "manifest_path"
    ] == ("aichor_manifests/train.yaml")
    # ... and a path in the repository is taken as it is, with either spelling of the option.
    for option in ("--manifest", "--manifest-path"):
        submitted = logged_in.json(
            "experiments", "submit", "local", "--repo-dir", str(repo), option, "configs/big.yaml"
        )
        assert submitted["manifest_path"] == "configs/big.yaml"


def test_no_manifest_lists_where_it_looked_and_suggests_init(logged_in, tmp_path):
    from experiments.models import Experiment

    repo = repo_with(tmp_path / "repo", {"src/main.py": "print(1)\n"})
    result = submit(logged_in, repo, check=False)
    assert result.returncode == 1 and result.stdout == ""
    (line,) = result.stderr.strip().splitlines()
    assert "manifest.yaml, aichor_manifests/manifest.yaml" in line
    assert "-f PATH" in line and "aichor local-repo init" in line
    missing = submit(logged_in, repo, "-f", "nope.yaml", check=False)
    assert "nope.yaml, aichor_manifests/nope.yaml" in missing.stderr and missing.returncode == 1
    assert not Experiment.objects.exists()


# --- local-repo init -------------------------------------------------------------------------
def written_manifest(repo):
    return parse_manifest((repo / "aichor_manifests" / "manifest.yaml").read_text())


@pytest.mark.parametrize("operator", ["jobset", "jax", "pytorch", "xgboost", "kuberay"])
def test_init_flags_choose_the_operator_and_resources(cli, tmp_path, operator):
    repo = tmp_path / operator
    cli.run(
        "local-repo", "init", str(repo), "--operator", operator, "--count", "3", "--cpus", "4", "--ram-ratio", "1.5"
    )
    spec = written_manifest(repo).spec
    assert spec.operator == operator
    workers = spec.ray_pools if operator == "kuberay" else spec.groups
    assert [(g.count, g.resources.cpus, g.resources.ram_ratio) for g in workers] == [(3, 4, 1.5)]


def test_init_asks_on_a_terminal_and_takes_defaults_otherwise(cli, tmp_path):
    import os
    import pty
    import subprocess

    from tests.cli.conftest import AICHOR

    quiet = tmp_path / "quiet"
    cli.run("local-repo", "init", str(quiet))  # stdin is not a terminal: no prompt, no hang
    spec = written_manifest(quiet).spec
    assert (spec.operator, spec.groups[0].count, spec.groups[0].resources.cpus) == ("jobset", 1, 1)

    asked = tmp_path / "asked"
    leader, follower = pty.openpty()
    process = subprocess.Popen(
        [AICHOR, "local-repo", "init", str(asked)], stdin=follower, stdout=follower, stderr=follower, env=cli.env
    )
    os.close(follower)
    os.write(leader, b"kuberay\n2\n8\n4\n")
    transcript = b""
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # the terminal closed with the process
            break
        if not chunk:
            break
        transcript += chunk
    assert process.wait(timeout=60) == 0, transcript
    os.close(leader)
    text = transcript.decode()
    for question in ("Operator", "Number of worker nodes", "CPUs per process", "GB of memory per CPU"):
        assert question in text
    spec = written_manifest(asked).spec
    assert spec.operator == "kuberay"
    assert [(p.count, p.resources.cpus, p.resources.ram_ratio) for p in spec.ray_pools] == [(2, 8, 4)]


@pytest.mark.parametrize("operator", ["batch", "tf", "mpi"])
def test_init_writes_only_operators_aichor_offers(cli, tmp_path, operator):
    result = cli.run("local-repo", "init", str(tmp_path / "r"), "--operator", operator, check=False)
    assert result.returncode == 2 and "jobset" in result.stderr
    assert not (tmp_path / "r" / "aichor_manifests").exists()
