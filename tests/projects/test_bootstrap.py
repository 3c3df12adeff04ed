"""`manage.py bootstrap` (the first start of `make run`): which engines it makes, and which one
runs the demo (issue 10: local processes run as the server's own user)."""

import io

import pytest
from django.core.management import call_command

from projects.models import Engine, Project

pytestmark = pytest.mark.django_db


@pytest.fixture
def data_dir(settings, tmp_path):
    settings.DATA_DIR = tmp_path
    return tmp_path


@pytest.mark.docker
def test_bootstrap_makes_docker_the_demo_default_when_docker_answers(data_dir, docker_client, settings, monkeypatch):
    from projects.management.commands import bootstrap

    settings.LOCAL_ENGINE = True
    # No registry here: stand in for a host that has (or can pull) the demo's base image.
    monkeypatch.setattr(bootstrap, "_demo_base_available", lambda: True)
    call_command("bootstrap", stdout=io.StringIO())
    demo = Project.objects.get(slug="demo")
    assert demo.default_engine.kind == Engine.Kind.DOCKER
    assert {e.kind for e in demo.engines.all()} == {Engine.Kind.DOCKER, Engine.Kind.LOCAL}
    assert demo.experiments.get().engine.kind == Engine.Kind.DOCKER


@pytest.mark.docker
def test_bootstrap_creates_no_local_engine_when_it_is_disabled(data_dir, docker_client, settings):
    settings.LOCAL_ENGINE = False
    call_command("bootstrap", stdout=io.StringIO())
    assert not Engine.objects.filter(kind=Engine.Kind.LOCAL).exists()
    assert [e.kind for e in Project.objects.get(slug="demo").engines.all()] == [Engine.Kind.DOCKER]


def test_bootstrap_without_any_engine_says_so_and_makes_no_demo(data_dir, settings, monkeypatch, capsys):
    from projects.management.commands import bootstrap

    settings.LOCAL_ENGINE = False
    monkeypatch.setattr(bootstrap, "_docker_available", lambda: False)
    call_command("bootstrap")
    assert "No engine: start a Docker Engine" in capsys.readouterr().err
    assert not Engine.objects.exists()
    assert not Project.objects.filter(slug="demo").exists()


def test_bootstrap_without_local_repos_makes_no_demo_and_says_why(data_dir, settings, capsys):
    # Outside `make run` a server refuses file:// clone URLs; the demo's repository is one.
    settings.LOCAL_ENGINE = True
    settings.ALLOW_LOCAL_REPOS = False
    call_command("bootstrap")
    assert "AICHOR_ALLOW_LOCAL_REPOS=true" in capsys.readouterr().err
    assert Engine.objects.filter(kind=Engine.Kind.LOCAL).exists()
    assert not Project.objects.filter(slug="demo").exists()


@pytest.mark.docker
def test_demo_runs_on_the_local_engine_when_docker_cannot_get_its_base_image(
    data_dir, docker_client, settings, monkeypatch
):
    from projects.management.commands import bootstrap

    # An image no registry has: the real pull fails, with or without a registry in reach.
    monkeypatch.setattr(bootstrap, "DEMO_BASE_IMAGE", "aichor-test/never-published:none")
    settings.LOCAL_ENGINE = True
    notes = io.StringIO()
    call_command("bootstrap", stdout=io.StringIO(), stderr=notes)
    assert "Docker cannot get aichor-test/never-published:none" in notes.getvalue()
    demo = Project.objects.get(slug="demo")
    assert demo.default_engine.kind == Engine.Kind.LOCAL
    assert {e.kind for e in demo.engines.all()} == {Engine.Kind.DOCKER, Engine.Kind.LOCAL}
