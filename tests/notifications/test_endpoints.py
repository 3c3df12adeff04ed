"""Outbound notifications: a receiver on loopback verifies the signature, gets one delivery per
subscribed event and none for the others, a retry after a 500, a redelivery on request; the
Slack format is a text body."""

import hashlib
import hmac
import json
import time
import uuid

import pytest

from experiments import services as experiment_services
from notifications import services
from notifications.models import Delivery, Endpoint
from tests.helpers import ended, github_push, manifest_yaml, wait_for
from tests.notifications.fakes import Answer

SECRET = "receiver-secret-0123456789"
MESSAGE = "aichor[train.yaml]: try lr 3e-4"


def verified(seen, secret: str = SECRET) -> dict:
    """What a receiver does: recompute the HMAC of the raw body, then trust the JSON."""
    expected = "sha256=" + hmac.new(secret.encode(), seen.raw, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(seen.headers["X-Aichor-Signature-256"], expected)
    return json.loads(seen.raw)


def push(client, project, git_repo, command: str):
    files = {"aichor_manifests/train.yaml": manifest_yaml(command), "nonce.txt": uuid.uuid4().hex}
    sha = git_repo.commit(files, MESSAGE)
    response = github_push(client, project, sha=sha, message=MESSAGE)
    assert response.status_code == 201, response.content
    return sha, ended(response.json()["experiment"])


@pytest.mark.django_db(transaction=True)
def test_receiver_gets_one_signed_delivery_per_subscribed_event(
    client, project, git_repo, receiver, fast_retries, celery_worker_thread
):
    services.create_endpoint(
        project, url=receiver.url + "/hook", events=["created", "succeeded"], format="json", secret=SECRET
    )
    # A second endpoint for "running" only: once it has its delivery, the first would have had one too.
    services.create_endpoint(project, url=receiver.url + "/running", events=["running"], format="json", secret=SECRET)
    sha, experiment = push(client, project, git_repo, "echo trained")
    wait_for(lambda: len(receiver.deliveries()) == 3, message="three deliveries")
    by_path = {}
    for seen in receiver.deliveries():
        by_path.setdefault(seen.path, []).append(seen)
    hook = sorted(
        (verified(seen) | {"_headers": seen.headers} for seen in by_path["/hook"]), key=lambda b: b["timestamp"]
    )
    assert [body["event"] for body in sorted(hook, key=lambda b: b["event"])] == ["created", "succeeded"]
    assert [verified(seen)["event"] for seen in by_path["/running"]] == ["running"]
    for body in hook:
        headers = body.pop("_headers")
        assert headers["X-Aichor-Delivery"] == body["delivery"] and headers["X-Aichor-Event"] == body["event"]
        assert headers["X-Aichor-Timestamp"] == str(body["timestamp"]) and abs(time.time() - body["timestamp"]) < 300
        assert body["id"] == str(experiment.pk) and body["project"] == {"slug": "vision", "name": "Vision"}
        assert body["commit"]["sha"] == sha and body["commit"]["branch"] == "main"
        assert body["author"] == "researcher" and body["url"].endswith(f"/experiments/{experiment.pk}/")
        assert set(body["durations"]) == {"queued_seconds", "running_seconds"}
    succeeded = next(body for body in hook if body["event"] == "succeeded")
    assert succeeded["status"] == "Succeeded" and succeeded["step"] == "Completed"
    assert len({body["delivery"] for body in hook}) == 2
    # Nothing else arrives: the first endpoint holds exactly its two deliveries.
    assert sorted(Delivery.objects.filter(endpoint__url__endswith="/hook").values_list("event", flat=True)) == [
        "created",
        "succeeded",
    ]


@pytest.mark.django_db(transaction=True)
def test_a_delivery_answered_500_is_retried_and_can_be_redelivered(
    client, project, admin_user, receiver, fast_retries, celery_worker_thread
):
    endpoint = services.create_endpoint(
        project, url=receiver.url + "/hook", events=["failed"], format="json", secret=SECRET
    )
    receiver.answer_next(Answer(500, {"error": "busy"}))
    experiment = experiment_services.create_experiment(
        project=project, commit_sha="b" * 40, branch="main", message=MESSAGE, manifest_path="manifest.yaml"
    )
    experiment_services.cancel_experiment(experiment)  # "cancelled": not subscribed
    other = experiment_services.create_experiment(project=project, message=MESSAGE, manifest_path="manifest.yaml")
    experiment_services.fail_experiment(other.pk, "the manifest is invalid")
    delivery = wait_for(
        lambda: Delivery.objects.filter(endpoint=endpoint, state=Delivery.State.DELIVERED).first(), message="delivered"
    )
    assert delivery.attempts == 2 and delivery.response_code == 200 and delivery.experiment_id == other.pk
    codes = [seen.code for seen in receiver.requests()]
    assert codes == [500, 200]
    first, second = receiver.requests()
    assert first.headers["X-Aichor-Delivery"] == second.headers["X-Aichor-Delivery"] == str(delivery.pk)
    verified(second)
    # The endpoint's deliveries are listed with their answers, and one can be redelivered.
    client.force_login(admin_user)
    page = client.get("/p/vision/notifications/").content.decode()
    assert str(delivery.pk) in page and "delivered" in page and "2 attempts" in page
    response = client.post(f"/p/vision/notifications/deliveries/{delivery.pk}/redeliver/")
    assert response.status_code == 302
    wait_for(lambda: len(receiver.requests()) == 3, message="the redelivery")
    again = verified(receiver.requests()[-1])
    assert again["event"] == "failed" and again["id"] == str(other.pk) and again["delivery"] != str(delivery.pk)
    assert Delivery.objects.filter(redelivery_of=delivery, state=Delivery.State.DELIVERED).exists()
    assert Delivery.objects.filter(endpoint=endpoint).count() == 2  # nothing for the cancelled one


@pytest.mark.django_db
def test_a_receiver_answering_400_is_not_retried(project, receiver):
    endpoint = services.create_endpoint(project, url=receiver.url, events=["created"], format="json", secret=SECRET)
    experiment = experiment_services.create_experiment(project=project, message="m", manifest_path="manifest.yaml")
    services.experiment_changed(experiment.pk, "created")
    receiver.answer_next(Answer(400, {"error": "unknown field"}))
    delivery = Delivery.objects.get(endpoint=endpoint)
    services.deliver(delivery.pk)  # no Later
    delivery.refresh_from_db()
    assert delivery.state == Delivery.State.FAILED and delivery.response_code == 400
    assert "unknown field" in delivery.response_excerpt


@pytest.mark.django_db
def test_slack_format_posts_text(project, receiver):
    endpoint = services.create_endpoint(
        project, url=receiver.url + "/services/T0/B0/x", events=["failed"], format="slack", secret=SECRET
    )
    experiment = experiment_services.create_experiment(
        project=project, commit_sha="c" * 40, branch="main", message=MESSAGE, manifest_path="manifest.yaml"
    )
    experiment_services.fail_experiment(experiment.pk, "exit code 2")
    services.experiment_changed(experiment.pk, "failed")
    services.deliver(Delivery.objects.get(endpoint=endpoint).pk)
    (seen,) = receiver.deliveries()
    body = verified(seen)
    assert set(body) == {"text"}
    assert experiment.short_id in body["text"] and "failed" in body["text"] and "exit code 2" in body["text"]
    assert "cccccccc" in body["text"]


@pytest.mark.django_db
def test_endpoint_secret_is_encrypted_at_rest(project):
    endpoint = services.create_endpoint(
        project, url="https://example.com/h", events=["failed"], format="json", secret=SECRET
    )
    stored = Endpoint.objects.values_list("secret_encrypted", flat=True).get(pk=endpoint.pk)
    assert SECRET not in stored and Endpoint.objects.get(pk=endpoint.pk).secret == SECRET
