"""A member must never reach the server itself through a URL they give: notification endpoints and
Git host API URLs on loopback, link-local (cloud metadata) or private addresses are refused when
saved, and a delivery whose name resolves there at send time sends nothing (aichor.lib.outbound).
The fake receivers listen on loopback, which tests/conftest.py allows; these tests take it back."""

import pytest

from aichor.lib import outbound
from experiments import services as experiment_services
from notifications import services
from notifications.models import CommitStatus, Delivery, Endpoint, GitHost
from tests.notifications.conftest import TOKEN

BASE = "/p/vision/notifications/"


@pytest.fixture
def no_internal(settings):
    settings.OUTBOUND_ALLOW_NETWORKS = ""


@pytest.mark.parametrize(
    "address",
    ["127.0.0.1", "127.8.9.10", "::1", "::ffff:127.0.0.1", "169.254.169.254", "10.1.2.3", "192.168.0.7", "0.0.0.0"],
)
def test_internal_addresses_are_refused(no_internal, address):
    assert not outbound.allowed(address)


def test_public_addresses_and_listed_networks_are_allowed(settings):
    settings.OUTBOUND_ALLOW_NETWORKS = "10.0.0.0/8"
    assert outbound.allowed("140.82.112.3") and outbound.allowed("2606:4700::1111")
    assert outbound.allowed("10.20.30.40")
    assert not outbound.allowed("127.0.0.1") and not outbound.allowed("169.254.169.254")


def test_an_endpoint_on_the_servers_loopback_is_refused_on_save(client, project, admin_user, no_internal, receiver):
    client.force_login(admin_user)
    form = {"url": receiver.url, "events": ["failed"], "format": "json", "secret": "s" * 20}
    response = client.post(BASE + "endpoints/", form)
    assert response.status_code == 400
    assert b"internal to the server" in response.content and b"AICHOR_OUTBOUND_ALLOW_NETWORKS" in response.content
    assert not Endpoint.objects.exists()
    # By name as well as by number.
    form["url"] = "http://localhost:6379/"
    assert client.post(BASE + "endpoints/", form).status_code == 400 and not Endpoint.objects.exists()


def test_a_git_host_api_url_on_loopback_is_refused_on_save(client, project, admin_user, no_internal, github):
    client.force_login(admin_user)
    response = client.post(
        BASE + "git-host/", {"kind": "github", "api_url": github.url, "repository": "", "token": "x"}
    )
    assert response.status_code == 400 and b"internal to the server" in response.content
    assert not GitHost.objects.exists()


@pytest.mark.django_db
def test_a_delivery_to_an_address_that_became_internal_sends_nothing(project, receiver, settings):
    # Saved while allowed (as a name that later resolves to loopback would be), then sent.
    endpoint = services.create_endpoint(project, url=receiver.url, events=["created"], format="json", secret="x" * 20)
    settings.OUTBOUND_ALLOW_NETWORKS = ""
    experiment = experiment_services.create_experiment(project=project, message="m", manifest_path="manifest.yaml")
    services.experiment_changed(experiment.pk, "created")
    delivery = Delivery.objects.get(endpoint=endpoint)
    services.deliver(delivery.pk)
    delivery.refresh_from_db()
    assert receiver.requests() == []
    assert delivery.state == Delivery.State.FAILED and delivery.response_code is None
    assert "internal to the server" in delivery.response_excerpt


@pytest.mark.django_db
def test_a_commit_status_to_an_internal_api_url_sends_nothing(project, github, github_statuses, settings):
    settings.OUTBOUND_ALLOW_NETWORKS = ""
    experiment = experiment_services.create_experiment(
        project=project, message="m", manifest_path="manifest.yaml", commit_sha="c" * 40, branch="main"
    )
    services.experiment_changed(experiment.pk, "created")
    services.post_commit_status(experiment.pk, 0)  # no Later: a setting to change, not an outage
    assert github.requests() == []
    assert "internal to the server" in CommitStatus.objects.get(pk=experiment.pk).error


def test_a_name_that_resolves_to_loopback_at_send_time_gets_no_byte(no_internal, github):
    with pytest.raises(Exception) as raised:
        outbound.post(
            github.url.replace("127.0.0.1", "localhost"), json={}, headers={"Authorization": TOKEN}, timeout=5
        )
    assert outbound.refused(raised.value)
    assert github.requests() == []
