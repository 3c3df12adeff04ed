"""`aichor experiments logs -f` as a user follows a run: it ends with the experiment and exits
with its outcome, and a run that failed before Running says which step failed and why."""

import pytest

from tests.cli.test_cli import write_repo
from tests.helpers import manifest_yaml

pytestmark = pytest.mark.django_db(transaction=True)


def test_follow_a_run_whose_manifest_is_invalid_shows_the_step_and_its_log(logged_in, git_repo, celery_worker_thread):
    bad = manifest_yaml("echo never").replace("operator: batch", "operator: batchh")
    sha = git_repo.commit({"aichor_manifests/manifest.yaml": bad}, "typo")
    experiment = logged_in.json("experiments", "submit", "commit-sha", sha, "--branch", "main")

    followed = logged_in.run("experiments", "logs", "-f", experiment["id"], check=False, timeout=90)

    assert followed.returncode == 1, followed.stderr
    assert followed.stdout == ""  # no process ever ran
    lines = followed.stderr.splitlines()
    assert lines[0].startswith("Cloning failed: Invalid manifest: ") and "spec.operator" in lines[0]
    assert lines[1] == "--- the last lines of the Cloning log ---"
    assert "manifest aichor_manifests/manifest.yaml is invalid:" in lines[2:]
    assert any("spec.operator" in line and "batch" in line for line in lines[3:])


def test_follow_exits_with_the_workloads_exit_code(logged_in, tmp_path, celery_worker_thread):
    repo = tmp_path / "repo"
    write_repo(repo, "echo about-to-fail; exit 3")
    experiment = logged_in.json("experiments", "submit", "local", "--repo-dir", str(repo))

    followed = logged_in.run("experiments", "logs", "-f", experiment["id"], check=False, timeout=90)

    assert followed.returncode == 3, followed.stderr
    assert "about-to-fail" in followed.stdout
    assert "failed:" not in followed.stderr  # it failed while Running: its output says why


def test_follow_a_succeeding_run_exits_0(logged_in, tmp_path, celery_worker_thread):
    repo = tmp_path / "repo"
    write_repo(repo, "echo all-good")
    experiment = logged_in.json("experiments", "submit", "local", "--repo-dir", str(repo))

    followed = logged_in.run("experiments", "logs", "-f", experiment["id"], timeout=90)

    assert "all-good" in followed.stdout and followed.stderr == ""


def test_logs_tail_gives_the_last_lines_and_is_refused_with_follow(
    logged_in, git_repo, celery_worker_thread, client, member_user
):
    from projects.services import create_api_token

    sha = git_repo.commit({"aichor_manifests/manifest.yaml": manifest_yaml("echo a; echo b; echo c")}, "three")
    experiment = logged_in.json("experiments", "submit", "commit-sha", sha, "--branch", "main")
    logged_in.run("experiments", "logs", "-f", experiment["id"], timeout=90)
    headers = {"Authorization": f"Bearer {create_api_token(member_user)}"}
    url = f"/api/v1/experiments/{experiment['id']}/logs"

    assert client.get(url, {"stream": "process:worker-0", "tail": 2}, headers=headers).content == b"b\nc\n"
    refused = client.get(url, {"tail": 2, "follow": "true"}, headers=headers)
    assert refused.status_code == 400 and refused.json()["detail"] == "tail and follow cannot be combined"
