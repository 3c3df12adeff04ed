"""The demo repository `manage.py bootstrap` makes behaves as a GitHub repository would: a
`git push` to it delivers a signed push webhook to the running server, which starts an
experiment when the commit message asks for one. The push never waits long on the server."""

import os
import stat
import subprocess
import time

import pytest
from django.core.management import call_command
from django.urls import reverse

pytestmark = pytest.mark.django_db(transaction=True)


def git(*args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True)


@pytest.fixture
def demo(settings, tmp_path, asgi_server_url, monkeypatch, capsys):
    """A bootstrapped demo on the local engine, its hook pointed at the live test server, and a
    clone of its repository as a user makes one."""
    from projects.management.commands import bootstrap

    settings.DATA_DIR = tmp_path / "data"
    settings.LOCAL_ENGINE = True
    settings.PUBLIC_URL = asgi_server_url
    monkeypatch.setattr(bootstrap, "_docker_available", lambda: False)
    call_command("bootstrap")
    capsys.readouterr()
    clone = tmp_path / "my-demo"
    git("clone", "-q", str(settings.DATA_DIR / "demo-repo.git"), str(clone), cwd=tmp_path)
    git("config", "user.email", "newcomer@example.com", cwd=clone)
    git("config", "user.name", "Newcomer", cwd=clone)
    return clone


def push(clone, message: str) -> tuple[str, str]:
    (clone / "notes.txt").write_text(f"{message}\n")
    git("add", "notes.txt", cwd=clone)
    git("commit", "-q", "-m", message, cwd=clone)
    return git("rev-parse", "HEAD", cwd=clone).stdout.strip(), git("push", "origin", "main", cwd=clone).stderr


def remote_lines(push_output: str) -> list[str]:
    return [line.removeprefix("remote: ").strip() for line in push_output.splitlines() if line.startswith("remote:")]


def test_a_push_asking_for_an_experiment_starts_one(demo, settings):
    from experiments.models import Experiment
    from projects.models import Project

    project = Project.objects.get(slug="demo")
    sha, output = push(demo, "aichor[manifest.yaml]: my first push")

    experiment = Experiment.objects.exclude(pk=project.experiments.order_by("created_at").first().pk).get()
    assert (experiment.commit_sha, experiment.branch) == (sha, "main")
    assert experiment.manifest_path == "aichor_manifests/manifest.yaml"
    assert experiment.message == "aichor[manifest.yaml]: my first push"
    assert experiment.author_name == "newcomer@example.com"
    assert remote_lines(output) == [f"aichor: experiment started: {settings.PUBLIC_URL}/experiments/{experiment.pk}/"]


def test_a_push_without_the_request_starts_nothing_and_says_why(demo):
    from experiments.models import Experiment

    before = Experiment.objects.count()
    _, output = push(demo, "tidy the notes")
    assert remote_lines(output) == [
        "aichor: main delivered, nothing started: the commit message does not ask for an experiment"
    ]
    assert Experiment.objects.count() == before


def test_the_secret_is_private_and_a_down_server_does_not_hold_the_push(demo, settings, capsys):
    from projects.models import Project

    hooks = settings.DATA_DIR / "demo-repo.git" / "hooks"
    assert stat.S_IMODE(os.stat(hooks / "aichor-webhook.secret").st_mode) == 0o600
    secret = Project.objects.get(slug="demo").webhook_secret
    assert (hooks / "aichor-webhook.secret").read_text().strip() == secret
    assert secret not in (hooks / "post-receive").read_text()

    settings.PUBLIC_URL = "http://127.0.0.1:9"  # a later start on another address rewrites the hook
    call_command("bootstrap")
    capsys.readouterr()
    started = time.monotonic()
    _, output = push(demo, "aichor[manifest.yaml]: while the server is down")
    assert time.monotonic() - started < 10
    [line] = remote_lines(output)
    assert line.startswith("aichor: could not deliver the push of main to http://127.0.0.1:9/webhooks/github/demo/ (")


def test_the_demo_project_page_shows_its_repository_not_not_linked(demo, client):
    from django.contrib.auth import get_user_model

    client.force_login(get_user_model().objects.get(username="admin@example.com"))
    page = client.get(reverse("project-detail", args=["demo"])).content.decode()
    assert "demo-repo.git" in page and "not linked" not in page
