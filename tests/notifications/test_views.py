"""The notification settings page (project admins), the e-mail preferences form, and e-mail
through Django's locmem backend."""

import uuid

import pytest
from django.core import mail
from django.test import Client

from experiments import services as experiment_services
from notifications import services
from notifications.models import Delivery, EmailPreference, Endpoint, GitHost
from projects.services import add_member
from tests.helpers import ended, github_push, manifest_yaml, wait_for
from tests.notifications.conftest import TOKEN

pytestmark = pytest.mark.django_db

BASE = "/p/vision/notifications/"


@pytest.fixture
def delivery(project):
    endpoint = services.create_endpoint(
        project, url="https://example.com/h", events=["created"], format="json", secret="0123456789abcdef"
    )
    experiment = experiment_services.create_experiment(project=project, message="m", manifest_path="manifest.yaml")
    services.experiment_changed(experiment.pk, "created")
    return Delivery.objects.get(endpoint=endpoint)


def test_admin_sets_a_token_that_is_encrypted_and_never_shown(client, project, admin_user):
    client.force_login(admin_user)
    form = {"kind": "github", "api_url": "https://ghe.example.com/api/v3", "repository": "acme/vision", "token": TOKEN}
    response = client.post(BASE + "git-host/", form, follow=True)
    assert response.status_code == 200
    page = response.content.decode()
    assert "ending in 9z7Q" in page and TOKEN not in page
    git_host = GitHost.objects.get(project=project)
    assert TOKEN not in git_host.token_encrypted and git_host.token == TOKEN
    # Saving again without a token keeps it; the page never echoes it into the form.
    client.post(BASE + "git-host/", form | {"token": "", "repository": "acme/other"})
    git_host.refresh_from_db()
    assert git_host.token == TOKEN and git_host.repository == "acme/other"
    assert TOKEN not in client.get(BASE).content.decode()
    assert TOKEN not in client.get("/p/vision/details/").content.decode()
    client.post(BASE + "git-host/remove-token/")
    git_host.refresh_from_db()
    assert git_host.token_encrypted == "" and "not set" in client.get(BASE).content.decode()


@pytest.mark.parametrize("api_url", ["file:///etc/passwd", "ftp://example.com/api", "javascript:alert(1)"])
def test_git_host_api_url_must_be_http(client, project, admin_user, api_url):
    client.force_login(admin_user)
    response = client.post(BASE + "git-host/", {"kind": "github", "api_url": api_url, "repository": "", "token": "x"})
    assert response.status_code == 400 and not GitHost.objects.exists()


def test_admin_adds_and_deletes_an_endpoint(client, project, admin_user):
    client.force_login(admin_user)
    form = {
        "url": "https://hooks.example.com/aichor",
        "events": ["succeeded", "failed"],
        "format": "slack",
        "secret": "s" * 20,
    }
    assert client.post(BASE + "endpoints/", form).status_code == 302
    endpoint = Endpoint.objects.get(project=project)
    assert endpoint.events == ["succeeded", "failed"] and endpoint.format == "slack"
    page = client.get(BASE).content.decode()
    assert "https://hooks.example.com/aichor" in page and "s" * 20 not in page
    assert client.post(f"{BASE}endpoints/{endpoint.pk}/delete/").status_code == 302
    assert not Endpoint.objects.exists()
    assert client.post(f"{BASE}endpoints/{endpoint.pk}/delete/").status_code == 404


@pytest.mark.parametrize(
    "url", ["file:///etc/passwd", "ftp://example.com/x", "gopher://example.com/", "javascript:alert(1)", "example.com"]
)
def test_endpoint_urls_must_be_http_or_https(client, project, admin_user, url):
    client.force_login(admin_user)
    form = {"url": url, "events": ["failed"], "format": "json", "secret": "s" * 20}
    response = client.post(BASE + "endpoints/", form)
    assert response.status_code == 400 and b"http://" in response.content
    assert not Endpoint.objects.exists()


def test_outsiders_and_members_get_404_on_every_settings_page(
    client, project, admin_user, member_user, outsider_user, delivery
):
    pages = [
        ("get", BASE),
        ("post", BASE + "git-host/"),
        ("post", BASE + "git-host/remove-token/"),
        ("post", BASE + "endpoints/"),
        ("post", f"{BASE}endpoints/{delivery.endpoint_id}/delete/"),
        ("post", f"{BASE}deliveries/{delivery.pk}/redeliver/"),
    ]
    for user in (outsider_user, member_user):
        client.force_login(user)
        for method, url in pages:
            assert getattr(client, method)(url).status_code == 404, (user, url)
    assert Endpoint.objects.exists() and Delivery.objects.count() == 1
    client.logout()
    for method, url in pages:
        response = getattr(client, method)(url)
        assert response.status_code == 302 and "/login/" in response["Location"]
    # Another project's admin cannot reach this project's delivery through their own project.
    client.force_login(admin_user)
    assert client.post(f"/p/vision/notifications/deliveries/{uuid.uuid4()}/redeliver/").status_code == 404


def test_wrong_methods_get_405(client, project, admin_user, delivery):
    client.force_login(admin_user)
    assert client.put(BASE).status_code == 405
    assert client.get(BASE + "git-host/").status_code == 405
    assert client.get(BASE + "endpoints/").status_code == 405
    assert client.get(f"{BASE}deliveries/{delivery.pk}/redeliver/").status_code == 405
    assert client.put("/account/notifications/").status_code == 405


def test_forms_need_the_csrf_token(project, admin_user):
    csrf_client = Client(enforce_csrf_checks=True)
    csrf_client.force_login(admin_user)
    form = {"url": "https://example.com/h", "events": ["failed"], "format": "json", "secret": "s" * 20}
    assert csrf_client.post(BASE + "endpoints/", form).status_code == 403
    assert csrf_client.post("/account/notifications/", {"on_failed": "on"}).status_code == 403
    assert not Endpoint.objects.exists() and not EmailPreference.objects.exists()
    assert b"csrfmiddlewaretoken" in csrf_client.get(BASE).content


def test_user_opts_in_to_e_mail(client, member_user):
    client.force_login(member_user)
    assert client.get("/account/notifications/").status_code == 200
    assert client.post("/account/notifications/", {"on_failed": "on"}).status_code == 302
    preference = EmailPreference.objects.get(user=member_user)
    assert preference.on_failed and not preference.on_succeeded
    client.logout()
    assert client.get("/account/notifications/").status_code == 302


def test_project_page_links_admins_to_the_settings(client, project, admin_user, member_user):
    client.force_login(admin_user)
    assert BASE.encode() in client.get("/p/vision/details/").content
    client.force_login(member_user)
    page = client.get("/p/vision/details/").content
    assert BASE.encode() not in page and b"/account/notifications/" in page


@pytest.mark.django_db(transaction=True)
def test_author_gets_an_e_mail_when_their_run_fails_if_they_opted_in(
    client, project, git_repo, django_user_model, settings, fast_retries, celery_worker_thread
):
    settings.EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"
    mail.outbox = []
    # The push's author as GitHub names them ("researcher"), an aichor user in the project.
    researcher = django_user_model.objects.create_user("researcher", "researcher@example.com", "pw-r-1234")
    add_member(project, researcher)
    services.save_email_preference(researcher, on_succeeded=False, on_failed=True)
    message = "aichor[train.yaml]: try"
    for command in ("echo fine", "exit 4"):
        files = {"aichor_manifests/train.yaml": manifest_yaml(command), "nonce.txt": uuid.uuid4().hex}
        sha = git_repo.commit(files, message)
        response = github_push(client, project, sha=sha, message=message)
        experiment = ended(response.json()["experiment"])
    wait_for(lambda: mail.outbox, message="the e-mail")
    (sent,) = mail.outbox  # the success sent none: not asked for
    assert sent.to == ["researcher@example.com"] and experiment.short_id in sent.subject
    assert "failed" in sent.subject and f"/experiments/{experiment.pk}/" in sent.body
