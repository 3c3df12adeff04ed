"""Everything that changes notification state: settings, endpoints, and the outcome of each
commit status post, delivery and e-mail. Posting runs in tasks on the notify queue (tasks.py),
never in the pipeline's path; a call that must be tried again raises Later."""

import hashlib
import hmac
import json
import logging
import smtplib
import time
import uuid
from datetime import timedelta
from uuid import UUID

import requests
from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.mail import send_mail
from django.db import transaction
from django.db.models import F, Q
from django.utils import timezone
from kombu.exceptions import OperationalError as KombuOperationalError

from aichor.celery import app
from aichor.lib import outbound
from aichor.lib.crypto import encrypt
from experiments import queue, signals
from experiments.models import Experiment, WebhookDelivery
from notifications import backoff, githost
from notifications.models import CommitStatus, Delivery, EmailPreference, Endpoint, GitHost
from projects.models import Membership, Project

log = logging.getLogger(__name__)

# The events a commit status may move on from to each event: never back, never twice.
EARLIER = {
    signals.CREATED: [""],
    signals.RUNNING: ["", signals.CREATED],
    signals.SUCCEEDED: ["", signals.CREATED, signals.RUNNING],
    signals.FAILED: ["", signals.CREATED, signals.RUNNING],
    signals.CANCELLED: ["", signals.CREATED, signals.RUNNING],
}
# How long a task waits when another holds the experiment's commit status lease.
LEASE_WAIT_SECONDS = 1.0
EXCERPT = 500


class Later(Exception):
    """Try again in `seconds`; `counts`: whether this was an attempt (not a wait for a lease)."""

    def __init__(self, seconds: float, *, counts: bool = True) -> None:
        super().__init__(f"again in {seconds:.1f} s")
        self.seconds = seconds
        self.counts = counts


def enqueue(task_name: str, *args, countdown: float | None = None) -> None:
    """Send `task_name` (routed to the notify queue) once the current transaction commits."""

    def send() -> None:
        try:
            if app.conf.task_always_eager:
                # Inline (debugging only): the task object, as experiments.queue does.
                if task_name not in app.tasks:
                    app.autodiscover_tasks(force=True)
                app.tasks[task_name].apply_async(args=args)
            else:
                app.send_task(task_name, args=list(args), countdown=countdown)
        except KombuOperationalError as exc:
            # Lost: a notification is not worth failing what caused it (a commit status catches
            # up with the experiment's next event).
            queue.report_refused(f"{task_name} not sent", exc)

    transaction.on_commit(send)


# --- Anything to notify at all? ------------------------------------------------------------
# Most servers configure no notification: then an experiment's events cost no task and no query
# in the pipeline's path. The answer is kept a few seconds per process; changing a setting
# forgets it here (another process learns within CONFIGURED_SECONDS).
CONFIGURED_SECONDS = 10.0
_configured: dict[str, float | bool] = {"at": float("-inf"), "value": False}


def anything_configured() -> bool:
    now = time.monotonic()
    if now - _configured["at"] > CONFIGURED_SECONDS:
        _configured["value"] = (
            GitHost.objects.exclude(token_encrypted="").exists()
            or Endpoint.objects.exists()
            or EmailPreference.objects.filter(Q(on_succeeded=True) | Q(on_failed=True)).exists()
        )
        _configured["at"] = now
    return bool(_configured["value"])


def _settings_changed() -> None:
    _configured["at"] = float("-inf")


# --- Settings (project admins) -------------------------------------------------------------
def save_git_host(project: Project, *, kind: str, api_url: str, repository: str, token: str = "") -> GitHost:
    """An empty `token` keeps the one stored."""
    git_host, _ = GitHost.objects.get_or_create(project=project)
    git_host.kind, git_host.api_url, git_host.repository = kind, api_url, repository
    if token:
        git_host.token_encrypted, git_host.token_ending = encrypt(token), token[-4:]
    git_host.updated_at = timezone.now()
    git_host.save()
    _settings_changed()
    return git_host


def remove_git_host_token(project: Project) -> bool:
    return bool(
        GitHost.objects.filter(project=project)
        .exclude(token_encrypted="")
        .update(token_encrypted="", token_ending="", updated_at=timezone.now())
    )


def create_endpoint(project: Project, *, url: str, events: list[str], format: str, secret: str) -> Endpoint:
    _settings_changed()
    return Endpoint.objects.create(
        project=project, url=url, events=list(events), format=format, secret_encrypted=encrypt(secret)
    )


def delete_endpoint(project: Project, pk: int) -> bool:
    return bool(Endpoint.objects.filter(project=project, pk=pk).delete()[0])


def redeliver(project: Project, delivery_id: UUID) -> Delivery | None:
    """The same facts again, as a new delivery (its own id, timestamp and attempts)."""
    original = Delivery.objects.filter(pk=delivery_id, endpoint__project=project).first()
    if original is None:
        return None
    with transaction.atomic():
        copy = Delivery.objects.create(
            endpoint_id=original.endpoint_id,
            experiment_id=original.experiment_id,
            event=original.event,
            payload=original.payload,
            redelivery_of=original,
        )
        enqueue("notifications.deliver", str(copy.pk))
    return copy


def save_email_preference(user, *, on_succeeded: bool, on_failed: bool) -> EmailPreference:
    preference, _ = EmailPreference.objects.update_or_create(
        user=user, defaults={"on_succeeded": on_succeeded, "on_failed": on_failed}
    )
    _settings_changed()
    return preference


# --- An experiment changed: fan out -----------------------------------------------------------
def experiment_changed(experiment_id: UUID, event: str) -> None:
    """Queue what `event` means for the experiment's commit, endpoints and author."""
    experiment = Experiment.objects.select_related("project", "engine").filter(pk=experiment_id).first()
    if experiment is None:
        return
    project = experiment.project
    posts_status = (
        experiment.source == Experiment.Source.GIT
        and GitHost.objects.filter(project=project).exclude(token_encrypted="").exists()
    )
    endpoints = [e for e in Endpoint.objects.filter(project=project) if event in e.events]
    recipient = _email_recipient(experiment, event)
    with transaction.atomic():
        if posts_status:
            CommitStatus.objects.get_or_create(experiment=experiment, defaults={"project": project})
            # Fan-outs run in parallel: one arriving after a later event's changes nothing.
            if CommitStatus.objects.filter(pk=experiment.pk, event__in=EARLIER[event]).update(
                seq=F("seq") + 1, event=event, updated_at=timezone.now()
            ):
                enqueue("notifications.post_status", str(experiment.pk), 0)
        if endpoints:
            payload = payload_of(experiment, event)
            for endpoint in endpoints:
                delivery = Delivery.objects.create(
                    endpoint=endpoint, experiment=experiment, event=event, payload=payload
                )
                enqueue("notifications.deliver", str(delivery.pk))
        if recipient is not None:
            enqueue("notifications.send_email", str(experiment.pk), event, recipient.pk, 0)


def _seconds(delta: timedelta | None) -> float | None:
    return round(delta.total_seconds(), 3) if delta is not None else None


def payload_of(experiment: Experiment, event: str) -> dict:
    """What a delivery says of the experiment (the signed JSON body, less delivery and time)."""
    queued = (experiment.started_at or experiment.finished_at or timezone.now()) - experiment.created_at
    return {
        "event": event,
        "id": str(experiment.pk),
        "short_id": experiment.short_id,
        "project": {"slug": experiment.project.slug, "name": experiment.project.name},
        "status": experiment.status,
        "step": experiment.current_step,
        "message": experiment.message,
        "manifest_path": experiment.manifest_path,
        "engine": experiment.engine.name,
        "commit": {
            "sha": experiment.commit_sha,
            "branch": experiment.branch,
            "url": experiment.commit_url,
        },
        "author": experiment.author_name,
        "exit_code": experiment.exit_code,
        "failure_reason": experiment.failure_reason,
        "created_at": experiment.created_at.isoformat(),
        "started_at": experiment.started_at.isoformat() if experiment.started_at else None,
        "finished_at": experiment.finished_at.isoformat() if experiment.finished_at else None,
        "durations": {"queued_seconds": _seconds(queued), "running_seconds": _seconds(experiment.duration)},
        "url": githost.page_url(experiment),
    }


# --- Commit statuses -------------------------------------------------------------------------
def post_commit_status(experiment_id: UUID, attempt: int) -> None:
    """Post the experiment's current state to its commit, unless the host already has the latest
    change. One task at a time per experiment (the lease); raises Later to be tried again."""
    row = CommitStatus.objects.filter(pk=experiment_id).values("seq", "posted_seq").first()
    if row is None or row["posted_seq"] >= row["seq"]:
        return
    owner = uuid.uuid4().hex
    now = timezone.now()
    hold = timedelta(seconds=2 * settings.NOTIFY_HTTP_TIMEOUT_SECONDS + 30)
    free = Q(lease_owner="") | Q(lease_until__lt=now)
    if not CommitStatus.objects.filter(free, pk=experiment_id).update(lease_owner=owner, lease_until=now + hold):
        raise Later(LEASE_WAIT_SECONDS, counts=False)
    try:
        _post_leased(experiment_id, attempt)
    finally:
        CommitStatus.objects.filter(pk=experiment_id, lease_owner=owner).update(lease_owner="", lease_until=None)


def _post_leased(experiment_id: UUID, attempt: int) -> None:
    # The latest event under the lease: a later one bumps the sequence, and its own task posts
    # it once this lease is free.
    seq, event = CommitStatus.objects.values_list("seq", "event").get(pk=experiment_id)
    experiment = Experiment.objects.select_related("project").get(pk=experiment_id)
    git_host = GitHost.objects.select_related("project").filter(project_id=experiment.project_id).first()
    if git_host is None or not git_host.token_encrypted or not experiment.commit_sha:
        return  # the token was removed meanwhile; a push without a sha yet posts once it has one
    delivered_by = (
        WebhookDelivery.objects.filter(experiment_id=experiment_id).values_list("provider", flat=True).first() or ""
    )
    target = githost.target_of(git_host, experiment, delivered_by)
    if target is None:
        _status_error(experiment_id, "no repository to post to: set it in the notification settings")
        return
    try:
        state, response = githost.post(target, git_host.token, event, experiment)
    except requests.RequestException as exc:
        if outbound.refused(exc):  # a setting to change, not an outage: no retry
            _status_error(
                experiment_id, "refused: the Git host's API URL leads to an address internal to the server's network"
            )
            return
        _retry_status(experiment_id, attempt, None, f"the Git host could not be reached ({type(exc).__name__})")
        return
    if response.ok or githost.already_there(target, response):
        CommitStatus.objects.filter(pk=experiment_id, posted_seq__lt=seq).update(
            posted_seq=seq, posted_state=state, error="", error_at=None, updated_at=timezone.now()
        )
        return
    if backoff.retryable(response):
        _retry_status(experiment_id, attempt, response, f"the Git host answered {response.status_code}")
        return
    _status_error(experiment_id, githost.problem(target, response))


def _retry_status(experiment_id: UUID, attempt: int, response: requests.Response | None, what: str) -> None:
    if attempt + 1 >= settings.NOTIFY_MAX_ATTEMPTS:
        _status_error(experiment_id, f"gave up after {attempt + 1} attempts: {what}")
        return
    raise Later(backoff.delay(attempt, response))


def _status_error(experiment_id: UUID, error: str) -> None:
    log.warning("commit status of experiment %s not posted: %s", experiment_id, error)
    now = timezone.now()
    CommitStatus.objects.filter(pk=experiment_id).update(error=error[:500], error_at=now, updated_at=now)


def last_posting_errors(project: Project, limit: int = 5):
    return (
        CommitStatus.objects.filter(project=project)
        .exclude(error="")
        .select_related("experiment")
        .order_by("-error_at")[:limit]
    )


# --- Outbound deliveries ---------------------------------------------------------------------
def signature(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def slack_text(payload: dict) -> str:
    commit = payload["commit"]
    took = payload["durations"]["running_seconds"]
    parts = [
        f"[{payload['project']['name']}] experiment <{payload['url']}|{payload['short_id']}> {payload['event']}",
        f"status {payload['status']}, step {payload['step']}",
    ]
    if took is not None:
        parts.append(f"after {took:.0f} s")
    if commit["sha"]:
        parts.append(f"commit {commit['sha'][:8]}" + (f" on {commit['branch']}" if commit["branch"] else ""))
    if payload["author"]:
        parts.append(f"by {payload['author']}")
    text = ", ".join(parts)
    first_line = (payload["message"] or "").splitlines()[0] if payload["message"] else ""
    if first_line:
        text += f": {first_line}"
    if payload["failure_reason"]:
        text += f"\n{payload['failure_reason'].splitlines()[0]}"
    return text


def request_of(delivery: Delivery, timestamp: int) -> tuple[bytes, dict[str, str]]:
    """The raw body and headers of one attempt. The JSON body carries the delivery id and the
    timestamp too, so that the signature covers them: a receiver refusing old timestamps
    refuses a replayed body."""
    endpoint = delivery.endpoint
    if endpoint.format == Endpoint.Format.SLACK:
        document = {"text": slack_text(delivery.payload)}
    else:
        document = delivery.payload | {"delivery": str(delivery.pk), "timestamp": timestamp}
    body = json.dumps(document, separators=(",", ":")).encode()
    headers = {
        "Content-Type": "application/json",
        "User-Agent": "aichor-notifications",
        "X-Aichor-Event": delivery.event,
        "X-Aichor-Delivery": str(delivery.pk),
        "X-Aichor-Timestamp": str(timestamp),
        "X-Aichor-Signature-256": signature(endpoint.secret, body),
    }
    return body, headers


def deliver(delivery_id: UUID) -> None:
    """One attempt of a pending delivery; raises Later while attempts remain after a 5xx, a rate
    limit or an unreachable receiver."""
    delivery = Delivery.objects.select_related("endpoint").filter(pk=delivery_id, state=Delivery.State.PENDING).first()
    if delivery is None:
        return  # delivered, given up, or its endpoint deleted
    body, headers = request_of(delivery, int(time.time()))
    response, refused = None, False
    try:
        response = outbound.post(
            delivery.endpoint.url,
            data=body,
            headers=headers,
            timeout=settings.NOTIFY_HTTP_TIMEOUT_SECONDS,
            allow_redirects=False,
        )
        code, excerpt = response.status_code, response.text[:EXCERPT]
    except requests.RequestException as exc:
        # Not str(exc): it repeats the URL, which for Slack is itself a secret.
        code, excerpt = None, f"{type(exc).__name__}: the receiver could not be reached"
        refused = outbound.refused(exc)  # a setting to change, not an outage: no retry
        if refused:
            excerpt = "refused: the URL leads to an address internal to the server's network"
    attempts = delivery.attempts + 1
    if code is not None and 200 <= code < 300:
        state = Delivery.State.DELIVERED
    elif not refused and (response is None or backoff.retryable(response)) and attempts < settings.NOTIFY_MAX_ATTEMPTS:
        state = Delivery.State.PENDING
    else:
        state = Delivery.State.FAILED
    Delivery.objects.filter(pk=delivery.pk).update(
        attempts=attempts, response_code=code, response_excerpt=excerpt, attempted_at=timezone.now(), state=state
    )
    if state == Delivery.State.PENDING:
        raise Later(backoff.delay(attempts - 1, response))


# --- E-mail ----------------------------------------------------------------------------------
def _email_recipient(experiment: Experiment, event: str):
    """The experiment's author, if they are still in the project and asked for this event's mail.
    A push names its author as the Git host does: matched to an aichor username or e-mail."""
    field = {signals.SUCCEEDED: "on_succeeded", signals.FAILED: "on_failed"}.get(event)
    if field is None:
        return None
    users = get_user_model().objects.filter(**{f"email_preference__{field}": True}, is_active=True).exclude(email="")
    in_project = Q(is_superuser=True) | Q(
        pk__in=Membership.objects.filter(project_id=experiment.project_id).values("user_id")
    )
    if experiment.author_id:
        return users.filter(in_project, pk=experiment.author_id).first()
    name = experiment.author_name.strip()
    if not name:
        return None
    return users.filter(in_project).filter(Q(username__iexact=name) | Q(email__iexact=name)).order_by("pk").first()


def send_email(experiment_id: UUID, event: str, user_id: int, attempt: int) -> None:
    experiment = Experiment.objects.select_related("project").filter(pk=experiment_id).first()
    user = get_user_model().objects.filter(pk=user_id).first()
    if experiment is None or user is None:
        return
    subject = f"[aichor] {experiment.project.name}: experiment {experiment.short_id} {experiment.status.lower()}"
    lines = [
        f"Experiment {experiment.short_id} of {experiment.project.name} is {experiment.status}.",
        "",
        f"Message:  {experiment.message.splitlines()[0] if experiment.message else '-'}",
        f"Manifest: {experiment.manifest_path}",
        f"Step:     {experiment.current_step}",
        f"Outcome:  {githost.description(event, experiment)}",
    ]
    if experiment.commit_sha:
        lines.append(f"Commit:   {experiment.commit_sha} ({experiment.branch or '-'})")
    if experiment.failure_reason:
        lines += ["", experiment.failure_reason]
    lines += ["", githost.page_url(experiment), "", "You asked for this e-mail in your aichor notification settings."]
    try:
        send_mail(subject[:200], "\n".join(lines), None, [user.email])
    except (smtplib.SMTPException, OSError) as exc:
        if attempt + 1 >= settings.NOTIFY_MAX_ATTEMPTS:
            log.error("e-mail about experiment %s not sent after %s attempts: %s", experiment_id, attempt + 1, exc)
            return
        raise Later(backoff.delay(attempt)) from exc
