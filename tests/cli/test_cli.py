"""The `aichor` CLI as a user runs it: a subprocess talking to a live server and worker."""

import json
import os
import stat

import pytest

from tests.helpers import manifest_yaml, wait_for

pytestmark = pytest.mark.django_db(transaction=True)


def write_repo(root, command: str, manifest: str = "aichor_manifests/manifest.yaml") -> None:
    files = {
        manifest: manifest_yaml(command),
        "Dockerfile": "FROM scratch\n",
        "data.txt": "payload-from-the-tree\n",
        ".gitignore": "secret.txt\nbuild/\n",
        "secret.txt": "must not leave the laptop\n",
        "build/big.bin": "x" * 1000,
        ".git/config": "[core]\n",
        "src/.gitignore": "*.log\n",
        "src/train.log": "ignored below src\n",
        "src/train.py": "print('hi')\n",
    }
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)


def test_config_is_private_and_context_shows(logged_in, tmp_path):
    path = tmp_path / "config" / "aichor" / "config.json"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    shown = logged_in.json("context", "show")
    assert (shown["project"], shown["engine"], shown["url"]) == ("vision", "local", logged_in.url)
    assert shown["token"].endswith("…") and json.loads(path.read_text())["token"] not in json.dumps(shown)


def test_submit_local_succeeds_then_logs_resubmit(logged_in, tmp_path, celery_worker_thread):
    repo = tmp_path / "repo"
    write_repo(repo, "echo hello-from-cli; cat data.txt; ls secret.txt build .git src/train.log 2>&1 || true")
    submitted = logged_in.run("experiments", "submit", "local", "--repo-dir", str(repo), "-m", "first", "--json")
    assert "upload" in submitted.stderr  # the progress bar
    experiment = json.loads(submitted.stdout)
    assert experiment["source"] == "archive" and experiment["message"] == "first"
    done = logged_in.wait_status(experiment["id"], ("Succeeded", "Failed", "Cancelled"))
    assert done["status"] == "Succeeded", done["failure_reason"]

    out = logged_in.run("experiments", "logs", experiment["id"]).stdout
    assert "hello-from-cli" in out and "payload-from-the-tree" in out
    # What .gitignore (root and nested) excludes, and .git, never reached the server.
    for name in ("secret.txt", "build", ".git", "src/train.log"):
        assert f"cannot access '{name}'" in out, out

    steps = logged_in.json("experiments", "step", experiment["id"])
    assert [s["status"] for s in steps] == ["Succeeded"] * 6
    assert "Succeeded" in logged_in.run("experiments", "status", experiment["short_id"]).stdout
    listed = logged_in.json("experiments", "list")
    assert [e["id"] for e in listed] == [experiment["id"]]

    again = logged_in.json("experiments", "resubmit", experiment["id"])
    assert again["resubmitted_from"] == experiment["id"]
    assert logged_in.wait_status(again["id"], ("Succeeded", "Failed"))["status"] == "Succeeded"
    assert "hello-from-cli" in logged_in.run("experiments", "logs", again["id"]).stdout


def test_follow_then_cancel_a_long_running_one(logged_in, tmp_path, celery_worker_thread):
    repo = tmp_path / "repo"
    write_repo(repo, "echo started-long; sleep 120", manifest="aichor_manifests/long.yaml")
    experiment = logged_in.json(
        "experiments", "submit", "local", "--repo-dir", str(repo), "--manifest-path", "aichor_manifests/long.yaml"
    )
    wait_for(
        lambda: "started-long" in logged_in.run("experiments", "logs", experiment["id"]).stdout,
        timeout=60,
        interval=0.3,
        message="the workload to print",
    )
    follower = logged_in.popen("experiments", "logs", "-f", experiment["id"])
    try:
        cancelled = logged_in.json("experiments", "cancel", experiment["id"])
        assert cancelled["status"] == "Cancelled"
        out, _ = follower.communicate(timeout=30)  # follow ends by itself once the experiment does
    finally:
        follower.kill()
    assert follower.returncode == 130  # the outcome: Cancelled
    assert "started-long" in out
    steps = {s["name"]: s["status"] for s in logged_in.json("experiments", "step", experiment["id"])}
    assert steps["Running"] == "Cancelled" and steps["Completed"] == "Cancelled"


def test_submit_commit_sha(logged_in, git_repo, celery_worker_thread):
    sha = git_repo.commit({"aichor_manifests/manifest.yaml": manifest_yaml("echo from-commit")}, "code")
    experiment = logged_in.json("experiments", "submit", "commit-sha", sha, "--branch", "main")
    assert experiment["commit_sha"] == sha
    assert logged_in.wait_status(experiment["id"], ("Succeeded", "Failed"))["status"] == "Succeeded"
    assert "from-commit" in logged_in.run("experiments", "logs", experiment["id"]).stdout


def test_list_shows_the_cpus_and_gpus_the_manifest_asks_for(logged_in, project, member_user):
    from experiments import services
    from experiments.manifest import parse_manifest
    from experiments.models import Experiment

    text = manifest_yaml(
        "python train.py",
        operator="pytorch",
        types="    worker:\n      count: 2\n      resources: {cpus: 6, memory: 40, accelerators: {gpu: {count: 4, type: a100}}}\n",
    )
    made = [
        services.create_experiment(
            project=project,
            author=member_user,
            commit_sha="a" * 40,
            branch="main",
            message=message,
            manifest_path="aichor_manifests/manifest.yaml",
        )
        for message in ("not cloned yet", "eight gpus")
    ]
    # As Cloning leaves it: the validated manifest stored.
    Experiment.objects.filter(pk=made[1].pk).update(manifest=parse_manifest(text).to_dict(), manifest_text=text)

    lines = logged_in.run("experiments", "list").stdout.splitlines()
    gpus = next(line for line in lines if line.startswith(made[1].short_id))
    assert "  12 CPU   8 × A100 GPU  " in gpus and gpus.endswith("eight gpus")
    unread = next(line for line in lines if line.startswith(made[0].short_id))
    assert "CPU" not in unread and unread.endswith("not cloned yet")
    listed = {e["message"]: e["resources"] for e in logged_in.json("experiments", "list")}
    assert listed["not cloned yet"] is None
    assert (listed["eight gpus"]["gpus"], listed["eight gpus"]["gpus_by_type"]) == (8, {"a100": 8})


def one_line_error(result) -> str:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_errors_are_one_line_with_non_zero_exit(logged_in, cli, tmp_path, member_user, server_url):
    from projects.models import ApiToken

    unknown = "00000000-0000-0000-0000-000000000000"
    assert "no experiment" in one_line_error(logged_in.run("experiments", "status", unknown, check=False))
    assert "no experiment" in one_line_error(logged_in.run("experiments", "logs", "zzzzzzzz", check=False))

    empty = tmp_path / "empty"
    empty.mkdir()
    line = one_line_error(logged_in.run("experiments", "submit", "local", "--repo-dir", str(empty), check=False))
    assert "no manifest" in line and "aichor_manifests/manifest.yaml" in line

    line = one_line_error(logged_in.run("context", "set", "project", "nope", check=False))
    assert "no project nope" in line

    ApiToken.objects.update(revoked_at=ApiToken.objects.first().created_at)
    line = one_line_error(logged_in.run("experiments", "list", check=False))
    assert "invalid, expired or revoked" in line
    assert "invalid" in one_line_error(cli.run("auth", "key", "--apikey", "wrong", "--url", server_url, check=False))

    line = one_line_error(cli.run("auth", "key", "--apikey", "x", "--url", "http://127.0.0.1:9", check=False))
    assert "cannot reach the aichor server at http://127.0.0.1:9" in line


def test_every_command_has_help(cli):
    commands = [
        [], ["auth"], ["auth", "key"], ["context"], ["context", "set"], ["context", "set", "project"],
        ["context", "set", "engine"], ["context", "show"], ["experiments"], ["experiments", "submit"],
        ["experiments", "submit", "local"], ["experiments", "submit", "commit-sha"], ["experiments", "list"],
        ["experiments", "status"], ["experiments", "step"], ["experiments", "logs"], ["experiments", "cancel"],
        ["experiments", "resubmit"], ["experiments", "port-forward"], ["local-repo"], ["local-repo", "init"],
    ]  # fmt: skip
    for command in commands:
        result = cli.run(*command, "--help")
        assert result.stdout.startswith("Usage: aichor"), command


def test_context_set_engine_checks_the_project(logged_in):
    assert "has no engine gpu" in one_line_error(logged_in.run("context", "set", "engine", "gpu", check=False))
    assert logged_in.run("context", "set", "engine", "local").stdout.strip() == "engine: local"


def test_an_archive_over_the_limit_is_refused_in_one_line(logged_in, tmp_path, settings):
    from experiments.models import Experiment

    settings.MAX_ARCHIVE_BYTES = 4096
    repo = tmp_path / "repo"
    write_repo(repo, "true")
    (repo / "weights.bin").write_bytes(os.urandom(64 * 1024))
    line = one_line_error(logged_in.run("experiments", "submit", "local", "--repo-dir", str(repo), check=False))
    assert "larger than the limit of 4096 bytes (HTTP 413)" in line
    assert not Experiment.objects.exists()
