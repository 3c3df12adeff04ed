"""Cloning from the project's repository mirror (issue 12): a sweep of one commit fetches it once,
and each experiment still gets exactly that commit's code; projects never share a mirror."""

import os
import subprocess
from pathlib import Path

import pytest

from experiments.logs import log_text
from experiments.models import Experiment, StepName
from experiments.pipeline import run_clone, workdir_of
from experiments.services import create_experiment
from projects.services import create_project
from tests.helpers import manifest_yaml

pytestmark = pytest.mark.django_db(transaction=True)

MANIFEST = "aichor_manifests/train.yaml"


def cloned(project, sha: str) -> Experiment:
    experiment = create_experiment(project=project, commit_sha=sha, branch="main", manifest_path=MANIFEST)
    run_clone(experiment.pk)
    return Experiment.objects.get(pk=experiment.pk)


def files_of(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): p.read_text() for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_commit_fetched_before_is_checked_out_from_the_mirror_exactly(project, git_repo):
    (git_repo.work / "run.sh").write_text("#!/bin/sh\necho v1\n")
    (git_repo.work / "run.sh").chmod(0o755)
    first = git_repo.commit({MANIFEST: manifest_yaml("./run.sh"), "data/old.txt": "old"}, "first")
    (git_repo.work / "data/old.txt").unlink()
    second = git_repo.commit({"run.sh": "#!/bin/sh\necho v2\n"}, "second")

    a, b, c = cloned(project, first), cloned(project, second), cloned(project, first)

    for experiment in (a, b, c):
        assert experiment.current_step == StepName.CLONING and not experiment.is_terminal, experiment.failure_reason
    # The third experiment fetched nothing: the mirror had the commit.
    assert "$ git fetch" in log_text(a.pk, "step:Cloning")
    assert "$ git fetch" in log_text(b.pk, "step:Cloning")
    assert "$ git fetch" not in log_text(c.pk, "step:Cloning")
    assert "from the project's repository mirror" in log_text(c.pk, "step:Cloning")
    # Each folder holds its commit's files and nothing else (no .git, no file of the other commit).
    manifest = manifest_yaml("./run.sh")
    assert files_of(workdir_of(c.pk)) == {MANIFEST: manifest, "data/old.txt": "old", "run.sh": "#!/bin/sh\necho v1\n"}
    assert files_of(workdir_of(b.pk)) == {MANIFEST: manifest, "run.sh": "#!/bin/sh\necho v2\n"}
    assert os.access(workdir_of(c.pk) / "run.sh", os.X_OK)
    assert not (workdir_of(c.pk) / ".git").exists()


def test_projects_with_the_same_repository_do_not_share_a_mirror(project, git_repo, local_engine, admin_user):
    other = create_project(
        name="Other", slug="other", repo_clone_url=git_repo.url, engines=[local_engine], admins=[admin_user]
    )
    sha = git_repo.commit({MANIFEST: manifest_yaml("true")}, "one")

    cloned(project, sha)
    theirs = cloned(other, sha)

    assert "$ git fetch" in log_text(theirs.pk, "step:Cloning")
    assert files_of(workdir_of(theirs.pk)) == {MANIFEST: manifest_yaml("true")}


def test_include_dot_git_still_gets_a_clone_of_the_commit(project, git_repo):
    manifest = manifest_yaml("git log --oneline") + "clone:\n  includeDotGit: true\n"
    sha = git_repo.commit({MANIFEST: manifest}, "with .git")

    cloned(project, sha)  # now in the mirror
    experiment = cloned(project, sha)

    assert not experiment.is_terminal, experiment.failure_reason
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=workdir_of(experiment.pk), capture_output=True, text=True)
    assert head.stdout.strip() == sha
    remote = subprocess.run(["git", "remote", "get-url", "origin"], cwd=workdir_of(experiment.pk), capture_output=True)
    assert remote.stdout.decode().strip() == git_repo.url
