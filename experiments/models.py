import uuid
from datetime import timedelta

from django.conf import settings
from django.db import models
from django.utils import timezone
from django.utils.functional import cached_property

from experiments.manifest.types import Manifest
from projects.models import Engine, Project, access_of


class Status(models.TextChoices):
    CREATED = "Created"
    PROCESSING = "Processing"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    CANCELLED = "Cancelled"


ACTIVE_STATUSES = (Status.CREATED, Status.PROCESSING)
TERMINAL_STATUSES = (Status.SUCCEEDED, Status.FAILED, Status.CANCELLED)

# The one table of allowed status changes; services update conditionally on it.
STATUS_TRANSITIONS: dict[str, tuple[str, ...]] = {
    Status.CREATED: (Status.PROCESSING, Status.FAILED, Status.CANCELLED),
    Status.PROCESSING: (Status.SUCCEEDED, Status.FAILED, Status.CANCELLED),
    Status.SUCCEEDED: (),
    Status.FAILED: (),
    Status.CANCELLED: (),
}


class StepName(models.TextChoices):
    WAITING = "Waiting"
    CLONING = "Cloning"
    BUILDING = "Building"
    SUBMITTING = "Submitting"
    RUNNING = "Running"
    COMPLETED = "Completed"


STEP_ORDER = [s.value for s in StepName]
# The steps an engine's watcher follows: Running, and Completed ones a lost watcher left half finished.
WATCHED_STEPS = (StepName.RUNNING, StepName.COMPLETED)


class StepStatus(models.TextChoices):
    INITIALIZE = "Initialize"
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    CANCELLED = "Cancelled"


STEP_TRANSITIONS: dict[str, tuple[str, ...]] = {
    # Initialize -> Succeeded is a skipped step (skipBuild); -> Cancelled when cancelled first.
    StepStatus.INITIALIZE: (StepStatus.RUNNING, StepStatus.SUCCEEDED, StepStatus.CANCELLED),
    StepStatus.RUNNING: (StepStatus.SUCCEEDED, StepStatus.FAILED, StepStatus.CANCELLED),
    StepStatus.SUCCEEDED: (),
    StepStatus.FAILED: (),
    StepStatus.CANCELLED: (),
}


def allowed_from(table: dict[str, tuple[str, ...]], new: str) -> list[str]:
    """The states from which `new` may be reached: the filter of a conditional update."""
    return [old for old, targets in table.items() if new in targets]


class ExperimentQuerySet(models.QuerySet):
    def for_user(self, user) -> "ExperimentQuerySet":
        """The experiments `user` may see, each with the user's `role` in its project annotated."""
        access = access_of(user, to_project="project__")
        if access is None:
            return self.none()
        where, role = access
        return self.filter(where).annotate(role=role)

    def active(self) -> "ExperimentQuerySet":
        return self.filter(status__in=ACTIVE_STATUSES)


class Experiment(models.Model):
    class Source(models.TextChoices):
        GIT = "git", "Git commit"
        ARCHIVE = "archive", "Uploaded archive"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    # No index of its own: the list indexes below start with it (one index entry less per
    # experiment, which a webhook burst writes by the thousand).
    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="experiments", db_index=False)
    engine = models.ForeignKey(Engine, on_delete=models.PROTECT, related_name="experiments")
    source = models.CharField(max_length=8, choices=Source.choices, default=Source.GIT)
    clone_url = models.CharField(max_length=500, blank=True)
    commit_sha = models.CharField(max_length=64, blank=True)
    branch = models.CharField(max_length=255, blank=True)
    archive = models.CharField(max_length=500, blank=True, help_text="path of the uploaded archive in storage")
    message = models.TextField(blank=True)
    author = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL)
    author_name = models.CharField(max_length=255, blank=True)
    manifest_path = models.CharField(max_length=500)
    manifest = models.JSONField(null=True, blank=True, help_text="validated manifest snapshot")
    manifest_text = models.TextField(blank=True)
    status = models.CharField(max_length=12, choices=Status.choices, default=Status.CREATED)
    current_step = models.CharField(max_length=12, choices=StepName.choices, default=StepName.WAITING)
    exit_code = models.IntegerField(null=True, blank=True)
    failure_reason = models.TextField(blank=True)
    image = models.CharField(max_length=500, blank=True)
    # What the engine needs to find the workload again: container ids, pids, namespace...
    handle = models.JSONField(null=True, blank=True)
    # The pipeline's own bookkeeping while it watches: log cursors, processes whose final logs
    # are stored, the decisive processes. Never the engine's: a handle is the engine's alone.
    watch_state = models.JSONField(default=dict, blank=True)
    resubmitted_from = models.ForeignKey(
        "self", null=True, blank=True, on_delete=models.SET_NULL, related_name="resubmissions"
    )
    created_at = models.DateTimeField(default=timezone.now)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    # Written by the task that owns the experiment; reconcile looks at stale ones.
    heartbeat_at = models.DateTimeField(default=timezone.now)
    deadline_at = models.DateTimeField(null=True, blank=True)
    hold_until = models.DateTimeField(null=True, blank=True)
    # Why a queued experiment has not started yet (an engine's concurrency limit); "" otherwise.
    waiting_reason = models.CharField(max_length=300, blank=True)

    objects = ExperimentQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [
            # Keyset pagination of one project/engine's list, newest first.
            models.Index(fields=["project", "engine", "-created_at", "-id"], name="exp_list_idx"),
            models.Index(fields=["project", "-created_at", "-id"], name="exp_project_list_idx"),
            # Reconcile and live polling scan only the active few.
            models.Index(
                fields=["status"], name="exp_active_idx", condition=models.Q(status__in=["Created", "Processing"])
            ),
        ]

    def __str__(self) -> str:
        return f"{self.short_id} {self.message[:40]}"

    @property
    def short_id(self) -> str:
        return str(self.id)[:8]

    @property
    def is_terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES

    @property
    def duration(self) -> timedelta | None:
        if not self.started_at:
            return None
        return (self.finished_at or timezone.now()) - self.started_at

    @property
    def commit_url(self) -> str:
        return self.project.commit_url(self.commit_sha) if self.source == self.Source.GIT else ""

    @property
    def output_prefix(self) -> str:
        return f"output/{self.id}/"

    @property
    def is_held(self) -> bool:
        """Failed, with its processes kept for debugging right now."""
        return bool(self.status == Status.FAILED and self.hold_until and self.hold_until > timezone.now())

    @property
    def can_open_terminal(self) -> bool:
        """The one rule for the terminal (SPEC §7), read by the page, its live update and the
        terminal consumer: the workload runs, or a failure is held for debugging. Every engine
        that can run a workload can exec into it (one that cannot run fails before Running)."""
        running = self.status == Status.PROCESSING and self.current_step == StepName.RUNNING
        return running or self.is_held

    @cached_property
    def typed_manifest(self) -> Manifest | None:
        """The validated manifest as types (None until Cloning read it). The stored JSON is its
        `to_dict()` form: rows written before the types existed load the same way."""
        return Manifest.from_dict(self.manifest) if self.manifest else None


class Step(models.Model):
    # Indexed by one_step_per_name, which starts with it.
    experiment = models.ForeignKey(Experiment, on_delete=models.CASCADE, related_name="steps", db_index=False)
    name = models.CharField(max_length=12, choices=StepName.choices)
    position = models.PositiveSmallIntegerField()
    status = models.CharField(max_length=12, choices=StepStatus.choices, default=StepStatus.INITIALIZE)
    started_at = models.DateTimeField(null=True, blank=True)
    ended_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["experiment", "position"]
        constraints = [models.UniqueConstraint(fields=["experiment", "name"], name="one_step_per_name")]

    def __str__(self) -> str:
        return f"{self.name}: {self.status}"

    @property
    def log_stream(self) -> str:
        return f"step:{self.name}"


class Event(models.Model):
    """One row per transition: the experiment's timeline and audit trail."""

    class Kind(models.TextChoices):
        STATUS = "status"
        STEP = "step"
        ACTION = "action"  # a person did something: cancel, resubmit, opened a terminal

    experiment = models.ForeignKey(Experiment, on_delete=models.CASCADE, related_name="events")
    kind = models.CharField(max_length=8, choices=Kind.choices)
    step = models.CharField(max_length=12, blank=True)
    old = models.CharField(max_length=16, blank=True)
    new = models.CharField(max_length=16, blank=True)
    reason = models.TextField(blank=True)
    actor = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL)
    data = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["created_at", "id"]


class LogChunk(models.Model):
    """Logs live here, outside the experiment row, in appended chunks: a step log is stream
    "step:<Step>", a process's output "process:<name>". Chunks outlive the containers."""

    # Indexed by one_chunk_per_seq, which starts with it.
    experiment = models.ForeignKey(Experiment, on_delete=models.CASCADE, related_name="log_chunks", db_index=False)
    stream = models.CharField(max_length=100)
    seq = models.PositiveIntegerField()
    first_line = models.PositiveBigIntegerField()
    line_count = models.PositiveIntegerField()
    text = models.TextField()
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["experiment", "stream", "seq"]
        constraints = [models.UniqueConstraint(fields=["experiment", "stream", "seq"], name="one_chunk_per_seq")]


class WebhookDelivery(models.Model):
    """Remembers delivery ids so a redelivered webhook creates nothing new."""

    # Indexed by one_delivery_per_id, which starts with it.
    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="webhook_deliveries", db_index=False)
    provider = models.CharField(max_length=8)
    delivery_id = models.CharField(max_length=100)
    # SHA-256 of the signed body: the delivery id is not signed, so a replayed body under a
    # fresh id is recognised by its content (SPEC §2: same signed body within 24 hours).
    body_digest = models.CharField(max_length=64, blank=True)
    experiment = models.ForeignKey(Experiment, null=True, blank=True, on_delete=models.SET_NULL)
    received_at = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["project", "provider", "delivery_id"], name="one_delivery_per_id")
        ]
        # A plain index: db_index on a CharField adds a LIKE index on PostgreSQL, never used.
        indexes = [models.Index(fields=["body_digest"], name="delivery_body_idx")]


class EngineWatch(models.Model):
    """The lease of an engine's watcher: one watcher per engine at a time. A watcher takes it when
    it is free (owner "") or expired, renews it every interval and frees it at the end of its
    slice; a watcher that died leaves it to expire."""

    engine = models.OneToOneField(Engine, on_delete=models.CASCADE, primary_key=True, related_name="watch")
    owner = models.CharField(max_length=100, blank=True)
    expires_at = models.DateTimeField(default=timezone.now)

    def __str__(self) -> str:
        return f"watch of engine {self.engine_id} by {self.owner or 'nobody'} until {self.expires_at}"
