"""The engine admin page (organisation admins only): a docker engine on the host's network is
flagged, since every member's code then reaches the services of that host."""

import pytest
from django.utils.html import escape

from projects.admin import HOST_NETWORK_WARNING, LOCAL_ENGINE_WARNING
from projects.models import Engine

pytestmark = pytest.mark.django_db


@pytest.fixture
def root(client, django_user_model):
    user = django_user_model.objects.create_superuser("root@example.com", "root@example.com", "pw-root-123")
    client.force_login(user)
    return user


def change_page(client, engine: Engine) -> str:
    response = client.get(f"/admin/projects/engine/{engine.pk}/change/")
    assert response.status_code == 200
    return response.content.decode()


def test_host_network_engine_page_shows_the_warning(client, root):
    engine = Engine.objects.create(name="risky", kind=Engine.Kind.DOCKER, config={"network": "host"})
    page = change_page(client, engine)
    assert escape(HOST_NETWORK_WARNING) in page


def test_bridge_network_engine_page_has_no_warning(client, root):
    engine = Engine.objects.create(name="safe", kind=Engine.Kind.DOCKER, config={"network": "bridge"})
    page = change_page(client, engine)
    assert escape(HOST_NETWORK_WARNING) not in page
    assert "is the Docker network" in page  # the config field says what `network` means


def test_local_engine_page_says_it_runs_code_as_the_server(client, root):
    engine = Engine.objects.create(name="laptop", kind=Engine.Kind.LOCAL)
    assert escape(LOCAL_ENGINE_WARNING) in change_page(client, engine)
    docker = Engine.objects.create(name="box", kind=Engine.Kind.DOCKER, config={"network": "none"})
    assert escape(LOCAL_ENGINE_WARNING) not in change_page(client, docker)


def save(client, engine: Engine, config: str):
    created = engine.created_at
    form = {"name": engine.name, "kind": engine.kind, "config": config}
    form |= {"created_at_0": created.strftime("%Y-%m-%d"), "created_at_1": created.strftime("%H:%M:%S")}
    return client.post(f"/admin/projects/engine/{engine.pk}/change/", form)


def test_settings_with_a_typo_or_a_wrong_type_are_refused_and_named(client, root):
    engine = Engine.objects.create(name="cluster", kind=Engine.Kind.KUBERNETES, config={"registry": "r.example/ml"})
    response = save(client, engine, '{"registry": "r.example/ml", "max_running_experiment_per_project": 5}')
    assert response.status_code == 200  # the form again, with the error
    page = response.content.decode()
    assert "Unknown setting &#x27;max_running_experiment_per_project&#x27;" in page
    assert "max_running_experiments_per_project" in page  # the right spelling is listed

    response = save(client, engine, '{"log_streams": "many", "in_cluster": "yes", "max_processes_per_experiment": 0}')
    page = response.content.decode()
    assert "log_streams must be a whole number, 0 or more, not &#x27;many&#x27;" in page
    assert "in_cluster must be true or false" in page
    assert "max_processes_per_experiment must be a positive integer, not 0" in page
    engine.refresh_from_db()
    assert engine.config == {"registry": "r.example/ml"}  # nothing half-saved

    response = save(client, engine, '{"path": ["venv/bin"]}')
    assert "path must be a list of absolute folders" in response.content.decode()

    response = save(client, engine, '["not", "an", "object"]')
    assert "must be a JSON object" in response.content.decode()


def test_valid_settings_are_saved(client, root):
    engine = Engine.objects.create(name="cluster", kind=Engine.Kind.KUBERNETES)
    config = '{"registry": "r.example/ml", "log_streams": 0, "log_reads_per_second": 2.5, "in_cluster": true}'
    response = save(client, engine, config)
    assert response.status_code == 302
    engine.refresh_from_db()
    assert engine.config == {
        "registry": "r.example/ml",
        "log_streams": 0,
        "log_reads_per_second": 2.5,
        "in_cluster": True,
    }


def test_a_null_log_streams_means_the_default():
    from experiments.engines.kubernetes import MAX_LOG_STREAMS, KubernetesEngine

    assert KubernetesEngine({"log_streams": None})._log_streams() == MAX_LOG_STREAMS
    assert KubernetesEngine({"log_streams": 0})._log_streams() == 0
