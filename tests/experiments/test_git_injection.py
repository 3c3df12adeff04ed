"""Nothing from a delivery, an API call or a project's settings reaches git as an option
(SPEC §2, issue 10 #1). Each attack would make git run `--upload-pack=<command>`: the command
writes a marker file, and every test asserts the marker never appears."""

import json
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from django.core.exceptions import ValidationError

from aichor.lib.git import GitInputError, branch_problem, check_clone_url
from experiments import services
from experiments.logs import LogWriter, log_text
from experiments.models import Experiment, Status, WebhookDelivery
from experiments.pipeline import Liveness, StepFailed, fetch_git
from projects.services import create_project
from tests.helpers import ended, github_push, manifest_yaml, post_github, project_change_form

pytestmark = pytest.mark.django_db


@pytest.fixture
def marker() -> Iterator[Path]:
    # Short, so the attack also fits a 64-character commit sha column (PostgreSQL enforces it).
    path = Path("/tmp") / f"pw-{uuid.uuid4().hex[:8]}"
    yield path
    path.unlink(missing_ok=True)


def upload_pack(marker: Path) -> str:
    # No spaces: it must pass any "no whitespace" rule and still be an option git obeys.
    return f"--upload-pack=id>{marker};false"


# --- The rules themselves --------------------------------------------------------------------
BRANCHES = [
    "main", "feature/x", "release-1.0", "v1.2.3", "a/b/c", "héllo", "a@b", "a{b}", "x/HEAD", "a.b",
    "a..b", "a/.b", ".a", "a.lock", "a/b.lock/c", "a.", "a/", "/a", "a//b", "a@{b", "HEAD", "a b",
    "a~b", "a^b", "a:b", "a?b", "a*b", "a[b", "a\\b", "a\x01b", "a\x7fb", "a/./b", "foo.", ".",
]  # fmt: skip


@pytest.mark.parametrize("name", BRANCHES)
def test_branch_rules_agree_with_git_check_ref_format(name):
    # `--` cannot be used here (check-ref-format takes exactly one name), so only names that
    # git cannot mistake for an option are compared; "-x" is covered below.
    git = subprocess.run(["git", "check-ref-format", "--branch", name], capture_output=True)
    assert (branch_problem(name) is None) == (git.returncode == 0), branch_problem(name)


@pytest.mark.parametrize("name", ["-x", "--upload-pack=id", "-", ""])
def test_branch_names_starting_with_a_dash_or_empty_are_refused(name):
    assert branch_problem(name)


@pytest.mark.parametrize(
    ("url", "local_ok"),
    [
        ("https://github.com/acme/vision.git", True),
        ("https://user:token@git.example.com:8443/acme/vision", True),
        ("ssh://git@github.com:22/acme/vision.git", True),
        ("git@github.com:acme/vision.git", True),
        ("file:///srv/git/vision.git", True),
        ("/srv/git/vision.git", True),
    ],
)
def test_clone_urls_that_are_accepted(url, local_ok):
    assert check_clone_url(url, allow_local=True) == url
    local = url.startswith(("file:", "/"))
    if local:
        with pytest.raises(GitInputError, match="AICHOR_ALLOW_LOCAL_REPOS"):
            check_clone_url(url, allow_local=False)
    else:
        assert check_clone_url(url, allow_local=False) == url


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("--upload-pack=id>/tmp/x;false", "cannot start with '-'"),
        ("-oProxyCommand=id@host:repo", "cannot start with '-'"),
        ("ext::sh -c id", "spaces"),
        ("ext::sh", "remote helpers"),
        ("fd::3", "remote helpers"),
        ("ssh://-oProxyCommand=id/repo", "no valid host"),
        ("git@-oProxyCommand=id:repo", "no valid host"),
        ("git@host:-repo", "repository path"),
        ("https://host/a\nb", "control characters"),
        ("http://host/repo.git", "https://"),
        ("relative/path", "https://"),
    ],
)
def test_hostile_clone_urls_are_refused(url, why):
    with pytest.raises(GitInputError, match=why):
        check_clone_url(url, allow_local=True)


# --- Through the webhooks ---------------------------------------------------------------------
def test_github_push_with_an_option_as_commit_id_is_refused(client, project, marker):
    response = github_push(client, project, sha=upload_pack(marker), message="aichor[train.yaml]: pwn")
    assert response.status_code == 422
    assert response.json()["field"] == "head_commit.id"
    assert "hexadecimal" in response.json()["error"]
    assert not Experiment.objects.exists() and not WebhookDelivery.objects.exists()
    assert not marker.exists()


def test_github_push_to_a_branch_named_like_an_option_is_refused(client, project, marker):
    response = github_push(client, project, sha="a" * 40, message="aichor[train.yaml]: pwn", branch=upload_pack(marker))
    assert response.status_code == 422
    assert response.json()["field"] == "ref"
    assert "cannot start with '-'" in response.json()["error"]
    assert not Experiment.objects.exists()


@pytest.mark.parametrize("sha_field", ["checkout_sha", "after"])
def test_gitlab_push_with_an_option_as_sha_is_refused(client, project, marker, sha_field):
    hostile = upload_pack(marker)
    body = {
        "object_kind": "push",
        "ref": "refs/heads/main",
        sha_field: hostile,
        "commits": [{"id": hostile, "message": "aichor[train.yaml]: pwn"}],
    }
    response = client.post(
        f"/webhooks/gitlab/{project.slug}/",
        data=json.dumps(body),
        content_type="application/json",
        headers={"X-Gitlab-Token": "s3cret-webhook", "X-Gitlab-Event": "Push Hook"},
    )
    assert response.status_code == 422
    assert response.json()["field"] == sha_field
    assert not Experiment.objects.exists()


def test_delivery_clone_url_of_a_project_without_one_is_checked(client, local_engine, admin_user, marker):
    # A project without its own URL clones what the delivery names: that URL is checked too.
    bare = create_project(name="Bare", slug="bare", engines=[local_engine], admins=[admin_user], webhook_secret="s")
    body = json.dumps(
        {
            "ref": "refs/heads/main",
            "head_commit": {"id": "a" * 40, "message": "exp: pwn"},
            "repository": {"clone_url": upload_pack(marker)},
        }
    ).encode()
    response = post_github(client, bare, body, secret="s")
    assert response.status_code == 422
    assert response.json()["field"] == "repository.clone_url"
    assert not Experiment.objects.exists()


# --- Through the Django admin (a project admin edits the clone URL) ---------------------------
def change_form(project, clone_url: str) -> dict:
    return project_change_form(project, repo_clone_url=clone_url, repo_web_url="")


@pytest.mark.parametrize(
    ("hostile", "why"),
    [
        ("--upload-pack=id>{marker};false", "cannot start with"),
        ("ext::sh -c id>{marker}", "spaces"),
        ("ext::sh%20-c%20id", "remote helpers"),
    ],
)
def test_project_admin_cannot_set_a_hostile_clone_url(client, admin_user, project, marker, hostile, why):
    client.force_login(admin_user)
    before = project.repo_clone_url
    response = client.post(
        f"/admin/projects/project/{project.pk}/change/", change_form(project, hostile.format(marker=marker))
    )
    assert response.status_code == 200  # the form again, with the error
    assert why in response.content.decode()
    project.refresh_from_db()
    assert project.repo_clone_url == before


def test_local_clone_urls_need_allow_local_repos(client, admin_user, project, settings):
    client.force_login(admin_user)
    settings.ALLOW_LOCAL_REPOS = False
    response = client.post(f"/admin/projects/project/{project.pk}/change/", change_form(project, "file:///etc"))
    assert response.status_code == 200
    assert "AICHOR_ALLOW_LOCAL_REPOS" in response.content.decode()
    good = client.post(
        f"/admin/projects/project/{project.pk}/change/", change_form(project, "git@github.com:acme/vision.git")
    )
    assert good.status_code == 302
    project.refresh_from_db()
    assert project.repo_clone_url == "git@github.com:acme/vision.git"


def test_create_project_refuses_a_hostile_clone_url(local_engine, marker):
    with pytest.raises(ValidationError, match="remote helpers"):
        create_project(name="X", slug="x", repo_clone_url="ext::sh", engines=[local_engine])
    with pytest.raises(ValidationError, match="cannot start with"):
        create_project(name="X", slug="x", repo_clone_url=upload_pack(marker), engines=[local_engine])


# --- In the pipeline: rows stored before these rules -------------------------------------------
def test_fetch_git_refuses_a_hostile_branch_from_an_old_row_before_running_git(project, tmp_path, marker):
    experiment = services.create_experiment(
        project=project, commit_sha="deadbeefdeadbeef", branch=upload_pack(marker), manifest_path="m.yaml"
    )
    dest = tmp_path / "code"
    with LogWriter(experiment.pk, "step:Cloning") as writer, pytest.raises(StepFailed, match="invalid branch"):
        fetch_git(experiment, dest, writer, Liveness(experiment.pk))
    assert not (dest / ".git").exists()  # not even `git init` ran
    assert not marker.exists()


@pytest.mark.parametrize(
    ("field", "value", "reason"),
    [
        ("branch", "{attack}", "invalid branch"),
        ("commit_sha", "{attack}", "invalid commit sha"),
        ("clone_url", "{attack}", "invalid clone URL"),
        ("clone_url", "ext::sh -c id>{marker}", "invalid clone URL"),
    ],
)
@pytest.mark.django_db(transaction=True)
def test_experiment_from_an_old_hostile_row_fails_at_cloning_and_runs_nothing(
    project, git_repo, marker, celery_worker_thread, field, value, reason
):
    # The unknown sha makes the old pipeline fall back to fetching the branch.
    fields = {"commit_sha": "deadbeefdeadbeef", "branch": "main", "clone_url": git_repo.url}
    fields[field] = value.format(attack=upload_pack(marker), marker=marker)
    experiment = services.create_experiment(project=project, manifest_path="m.yaml", **fields)
    experiment = ended(experiment.pk)
    assert not marker.exists()
    assert experiment.status == Status.FAILED
    assert experiment.current_step == "Cloning"
    assert reason in experiment.failure_reason
    assert "refusing to fetch the code" in log_text(experiment.pk, "step:Cloning")


@pytest.mark.django_db(transaction=True)
def test_a_push_still_runs_with_the_checked_git_calls(client, project, git_repo, celery_worker_thread):
    # The separators (--end-of-options, --) and protocol settings leave an ordinary clone working,
    # including the depth and .git options that add git calls after reading the manifest.
    clone = "clone:\n  depth: 2\n  includeDotGit: true\n"
    message = "aichor[train.yaml]: checked git"
    git_repo.commit({"first.txt": "1"}, "first")
    sha = git_repo.commit(
        {"aichor_manifests/train.yaml": manifest_yaml("git log --oneline | wc -l") + clone, "n": uuid.uuid4().hex},
        message,
    )
    response = github_push(client, project, sha=sha, message=message)
    assert response.status_code == 201, response.content
    experiment = ended(response.json()["experiment"])
    assert experiment.steps.get(name="Cloning").status == "Succeeded", experiment.failure_reason
    cloning = log_text(experiment.pk, "step:Cloning")
    assert f"--end-of-options {git_repo.url} {sha}" in cloning
    assert f"remote add -- origin {git_repo.url}" in cloning


def test_clone_url_credentials_never_reach_the_step_log(project, tmp_path):
    # A private repository's URL may carry a token; the Cloning log is read by every member.
    url = "https://ci-bot:ghp_s3cretT0ken@127.0.0.1:9/team/private.git"
    experiment = services.create_experiment(project=project, clone_url=url, branch="main", manifest_path="m.yaml")
    with LogWriter(experiment.pk, "step:Cloning") as writer, pytest.raises(StepFailed) as failure:
        fetch_git(experiment, tmp_path / "code", writer, Liveness(experiment.pk))
    text = log_text(experiment.pk, "step:Cloning")
    assert "$ git fetch" in text and "https://***@127.0.0.1:9/team/private.git" in text
    assert "ghp_s3cretT0ken" not in text and "ghp_s3cretT0ken" not in str(failure.value)
