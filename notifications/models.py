import uuid

from django.conf import settings
from django.db import models
from django.utils import timezone

from aichor.lib.crypto import decrypt
from experiments.models import Experiment
from experiments.signals import EVENTS
from projects.models import Project

EVENT_CHOICES = [(event, event) for event in EVENTS]


class GitHost(models.Model):
    """Where a project's commit statuses go, and the token that may post them."""

    class Kind(models.TextChoices):
        AUTO = "", "From the repository (GitHub unless it is a GitLab)"
        GITHUB = "github", "GitHub"
        GITLAB = "gitlab", "GitLab"

    DEFAULT_API = {Kind.GITHUB: "https://api.github.com", Kind.GITLAB: "https://gitlab.com/api/v4"}

    project = models.OneToOneField(Project, on_delete=models.CASCADE, primary_key=True, related_name="git_host")
    kind = models.CharField(max_length=8, choices=Kind.choices, blank=True)
    # GitHub Enterprise (https://host/api/v3) or a self-hosted GitLab (https://host/api/v4).
    api_url = models.URLField("API base URL", max_length=500, blank=True)
    # owner/name on GitHub, the project's path (group/sub/name) or numeric id on GitLab; "" to
    # read it from the project's repository URLs.
    repository = models.CharField(max_length=300, blank=True)
    # Encrypted: posting needs it back. Only its last four characters are ever shown.
    token_encrypted = models.TextField(blank=True, editable=False)
    token_ending = models.CharField(max_length=4, blank=True, editable=False)
    updated_at = models.DateTimeField(default=timezone.now)

    def __str__(self) -> str:
        return f"git host of {self.project}"

    @property
    def token(self) -> str:
        return decrypt(self.token_encrypted) if self.token_encrypted else ""


class CommitStatus(models.Model):
    """One row per experiment started from a commit: the ordering and the outcome of its status
    posts. `seq` counts the changes to report and `event` is the latest (never replaced by an
    earlier one), `posted_seq` the last the host accepted. The lease lets one task at a time
    post, and each posts the latest event, so a late or retried post never sets an earlier state
    over a later one."""

    experiment = models.OneToOneField(Experiment, on_delete=models.CASCADE, primary_key=True, related_name="+")
    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="+")
    seq = models.PositiveIntegerField(default=0)
    event = models.CharField(max_length=12, choices=EVENT_CHOICES, blank=True)
    posted_seq = models.PositiveIntegerField(default=0)
    posted_state = models.CharField(max_length=16, blank=True)
    lease_owner = models.CharField(max_length=36, blank=True)
    lease_until = models.DateTimeField(null=True, blank=True)
    # The last post that failed for good (a token without permission, retries exhausted); cleared
    # once a post of this experiment succeeds.
    error = models.CharField(max_length=500, blank=True)
    error_at = models.DateTimeField(null=True, blank=True)
    updated_at = models.DateTimeField(default=timezone.now)

    class Meta:
        indexes = [
            # The project page's "last posting errors".
            models.Index(
                fields=["project", "-error_at"], name="commit_status_errors_idx", condition=~models.Q(error="")
            )
        ]


class Endpoint(models.Model):
    """A URL that receives a signed POST for each subscribed event of the project's experiments."""

    class Format(models.TextChoices):
        JSON = "json", "JSON (signed)"
        SLACK = "slack", "Slack incoming webhook (text)"

    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="notification_endpoints")
    url = models.URLField("URL", max_length=500)
    events = models.JSONField(default=list)
    format = models.CharField(max_length=8, choices=Format.choices, default=Format.JSON)
    secret_encrypted = models.TextField(editable=False)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["created_at", "id"]

    def __str__(self) -> str:
        return self.url

    @property
    def secret(self) -> str:
        return decrypt(self.secret_encrypted)


class Delivery(models.Model):
    class State(models.TextChoices):
        PENDING = "pending"
        DELIVERED = "delivered"
        FAILED = "failed"

    # Sent as X-Aichor-Delivery: the same through the retries of one delivery, so a receiver
    # can tell a retry from a new event.
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    endpoint = models.ForeignKey(Endpoint, on_delete=models.CASCADE, related_name="deliveries")
    experiment = models.ForeignKey(Experiment, null=True, on_delete=models.SET_NULL, related_name="+")
    event = models.CharField(max_length=12, choices=EVENT_CHOICES)
    # What the event said of the experiment, kept so a redelivery sends the same facts.
    payload = models.JSONField()
    state = models.CharField(max_length=10, choices=State.choices, default=State.PENDING)
    attempts = models.PositiveSmallIntegerField(default=0)
    response_code = models.PositiveSmallIntegerField(null=True, blank=True)
    response_excerpt = models.CharField(max_length=500, blank=True)
    redelivery_of = models.ForeignKey("self", null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    created_at = models.DateTimeField(default=timezone.now)
    attempted_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        indexes = [models.Index(fields=["endpoint", "-created_at"], name="delivery_list_idx")]


class EmailPreference(models.Model):
    user = models.OneToOneField(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="email_preference")
    on_succeeded = models.BooleanField("When my experiments succeed", default=False)
    on_failed = models.BooleanField("When my experiments fail", default=False)
