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
