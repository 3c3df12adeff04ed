"""`aichor experiments list` shows each experiment's engine and filters by one with --engine."""

import pytest

pytestmark = pytest.mark.django_db(transaction=True)


def test_list_shows_the_engine_and_filters_by_it(logged_in, project, member_user):
    from experiments import services
    from projects.models import Engine

    gpu = Engine.objects.create(name="gpu-docker", kind=Engine.Kind.DOCKER)
    project.engines.add(gpu)
    common = {"project": project, "author": member_user, "commit_sha": "a" * 40, "manifest_path": "manifest.yaml"}
    local = services.create_experiment(**common, message="on local")
    remote = services.create_experiment(**common, engine=gpu, message="on gpu")

    lines = logged_in.run("experiments", "list").stdout.splitlines()
    assert next(line for line in lines if line.startswith(local.short_id)).split()[1] == "local"
    assert next(line for line in lines if line.startswith(remote.short_id)).split()[1] == "gpu-docker"

    only = logged_in.run("experiments", "list", "--engine", "gpu-docker").stdout.splitlines()
    assert [line.split()[0] for line in only] == [remote.short_id]
    assert [e["engine"] for e in logged_in.json("experiments", "list", "--engine", "local")] == ["local"]
