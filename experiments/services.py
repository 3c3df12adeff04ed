"""Every change of an experiment's status or step happens here: a conditional update on the
transition table, an event row in the same transaction, and work enqueued after commit."""

import logging
from datetime import timedelta

from django.db import IntegrityError, transaction
from django.db.models.functions import Coalesce
from django.utils import timezone

from experiments.logs import append_log
from experiments.models import (
    ACTIVE_STATUSES,
    STATUS_TRANSITIONS,
    STEP_ORDER,
    STEP_TRANSITIONS,
    Event,
    Experiment,
    Status,
    Step,
    StepName,
    StepStatus,
    WebhookDelivery,
    allowed_from,
)
from projects.models import Engine, Project

log = logging.getLogger(__name__)


class ExperimentError(Exception):
    """A request the experiment's state or the project's setup does not allow."""


def _enqueue(task_name: str, experiment_id, **kwargs) -> None:
    from experiments import tasks

    task = getattr(tasks, task_name)
    transaction.on_commit(lambda: task.apply_async(args=[str(experiment_id)], kwargs=kwargs))


def create_experiment(
    *,
    project: Project,
    engine: Engine | None = None,
    source: str = Experiment.Source.GIT,
    clone_url: str = "",
    commit_sha: str = "",
    branch: str = "",
    archive: str = "",
    message: str = "",
    author=None,
    author_name: str = "",
    manifest_path: str,
    resubmitted_from: Experiment | None = None,
) -> Experiment:
    engine_id = engine.pk if engine else project.default_engine_id
    if engine_id is None:
        raise ExperimentError(f"project {project.slug} has no engine")
    # The default engine is always one of the project's (create_project sees to it).
    if engine_id != project.default_engine_id and not project.engines.filter(pk=engine_id).exists():
        raise ExperimentError(f"engine {engine.name} is not enabled for project {project.slug}")
    now = timezone.now()
    # savepoint=False: inside a webhook's transaction a savepoint would only cost round trips.
    with transaction.atomic(savepoint=False):
        experiment = Experiment.objects.create(
            project=project,
            engine_id=engine_id,
            source=source,
            clone_url=clone_url or project.repo_clone_url,
            commit_sha=commit_sha,
            branch=branch,
            archive=archive,
            message=message,
            author=author,
            author_name=author_name or (author.get_username() if author else ""),
            manifest_path=manifest_path,
            resubmitted_from=resubmitted_from,
            heartbeat_at=now,
        )
        Step.objects.bulk_create(
            [
                Step(
                    experiment=experiment,
                    name=name,
                    position=i,
                    # Waiting is the queue: it is under way from the moment of creation.
                    status=StepStatus.RUNNING if name == StepName.WAITING else StepStatus.INITIALIZE,
                    started_at=now if name == StepName.WAITING else None,
                )
                for i, name in enumerate(STEP_ORDER)
            ]
        )
        reason = f"resubmission of {resubmitted_from.short_id}" if resubmitted_from else "created"
        Event.objects.create(
            experiment=experiment, kind=Event.Kind.STATUS, new=Status.CREATED, reason=reason, actor=author
        )
        _enqueue("clone", experiment.id)
    return experiment


def create_experiment_from_push(
    *, project: Project, provider: str, delivery_id: str, **fields
) -> tuple[Experiment | None, bool]:
    """Returns (experiment, created). A delivery id seen before creates nothing."""
    try:
        with transaction.atomic():
            experiment = create_experiment(project=project, **fields)
            # Inserted last, with its experiment: a duplicate id rolls the whole delivery back.
            WebhookDelivery.objects.create(
                project=project, provider=provider, delivery_id=delivery_id, experiment=experiment
            )
    except IntegrityError:
        return None, False
    return experiment, True


def record_ignored_delivery(*, project: Project, provider: str, delivery_id: str) -> None:
    try:
        with transaction.atomic():
            WebhookDelivery.objects.create(project=project, provider=provider, delivery_id=delivery_id)
    except IntegrityError:
        pass


def _step_event(experiment_id, step: str, old: str, new: str, reason: str = "", actor=None) -> None:
    Event.objects.create(
        experiment_id=experiment_id, kind=Event.Kind.STEP, step=step, old=old, new=new, reason=reason, actor=actor
    )


def _set_step(experiment_id, step: str, new: str, *, reason: str = "", actor=None) -> bool:
    now = timezone.now()
    for old in allowed_from(STEP_TRANSITIONS, new):
        fields = {"status": new}
        if new == StepStatus.RUNNING:
            fields["started_at"] = now
        else:
            fields["ended_at"] = now
            if old == StepStatus.INITIALIZE:
                fields["started_at"] = now
        if Step.objects.filter(experiment_id=experiment_id, name=step, status=old).update(**fields):
            _step_event(experiment_id, step, old, new, reason, actor)
            return True
    return False


def begin_step(experiment_id, step: str, *, previous_outcome: str = StepStatus.SUCCEEDED, reason: str = "") -> bool:
    """Move an active experiment from the step before `step` into `step`. False when the
    experiment is no longer there to move (cancelled, failed, or already moved by a twin task)."""
    index = STEP_ORDER.index(step)
    previous = STEP_ORDER[index - 1]
    now = timezone.now()
    with transaction.atomic():
        moved_from_created = Experiment.objects.filter(
            pk=experiment_id, status=Status.CREATED, current_step=previous
        ).update(status=Status.PROCESSING, current_step=step, heartbeat_at=now, started_at=Coalesce("started_at", now))
        if moved_from_created:
            Event.objects.create(
                experiment_id=experiment_id,
                kind=Event.Kind.STATUS,
                old=Status.CREATED,
                new=Status.PROCESSING,
                reason=f"{step} started",
            )
        elif not Experiment.objects.filter(pk=experiment_id, status=Status.PROCESSING, current_step=previous).update(
            current_step=step, heartbeat_at=now
        ):
            return False
        _set_step(experiment_id, previous, previous_outcome, reason=reason)
        _set_step(experiment_id, step, StepStatus.RUNNING)
    return True


def heartbeat(experiment_id) -> bool:
    """Tell reconcile the owning task is alive; False once the experiment is no longer active."""
    return bool(
        Experiment.objects.filter(pk=experiment_id, status__in=ACTIVE_STATUSES).update(heartbeat_at=timezone.now())
    )


def is_active(experiment_id) -> bool:
    return Experiment.objects.filter(pk=experiment_id, status__in=ACTIVE_STATUSES).exists()


def set_fields(experiment_id, **fields) -> bool:
    """Record facts learned on the way (image, handle, manifest) on an active experiment."""
    return bool(Experiment.objects.filter(pk=experiment_id, status__in=ACTIVE_STATUSES).update(**fields))


def finish_experiment(
    experiment_id,
    new: str,
    *,
    reason: str = "",
    exit_code: int | None = None,
    actor=None,
    step_status: str | None = None,
) -> bool:
    """End an experiment: Succeeded, Failed or Cancelled, with its current step to match."""
    step_status = (
        step_status
        or {
            Status.SUCCEEDED: StepStatus.SUCCEEDED,
            Status.FAILED: StepStatus.FAILED,
            Status.CANCELLED: StepStatus.CANCELLED,
        }[new]
    )
    now = timezone.now()
    with transaction.atomic():
        row = Experiment.objects.select_for_update().filter(pk=experiment_id).values("status", "current_step").first()
        if not row or row["status"] not in allowed_from(STATUS_TRANSITIONS, new):
            return False
        fields = {"status": new, "finished_at": now, "heartbeat_at": now}
        if exit_code is not None:
            fields["exit_code"] = exit_code
        if new != Status.SUCCEEDED and reason:
            fields["failure_reason"] = reason
        if not Experiment.objects.filter(pk=experiment_id, status=row["status"]).update(**fields):
            return False
        Event.objects.create(
            experiment_id=experiment_id,
            kind=Event.Kind.STATUS,
            old=row["status"],
            new=new,
            reason=reason,
            actor=actor,
            data={"exit_code": exit_code} if exit_code is not None else {},
        )
        _set_step(experiment_id, row["current_step"], step_status, reason=reason, actor=actor)
        if new == Status.CANCELLED:
            # Steps that never started are cancelled too, so the timeline shows nothing pending.
            for step in STEP_ORDER[STEP_ORDER.index(row["current_step"]) + 1 :]:
                _set_step(experiment_id, step, StepStatus.CANCELLED, actor=actor)
    return True


def fail_experiment(experiment_id, reason: str, *, exit_code: int | None = None) -> bool:
    done = finish_experiment(experiment_id, Status.FAILED, reason=reason, exit_code=exit_code)
    if done:
        # Whatever already runs on the engine goes: nothing outlives a failed experiment
        # (except under a debug hold, which the stop task honours).
        _enqueue("stop", experiment_id)
    return done


def cancel_experiment(experiment: Experiment, *, actor=None) -> None:
    who = actor.get_username() if actor else "the system"
    if not finish_experiment(experiment.pk, Status.CANCELLED, reason=f"Cancelled by {who}", actor=actor):
        raise ExperimentError(f"experiment {experiment.short_id} is {experiment.status}: nothing to cancel")
    # The stop task removes whatever the engine runs; the clone/build loops notice on their own.
    _enqueue("stop", experiment.pk)
    experiment.refresh_from_db()


def resubmit_experiment(experiment: Experiment, *, actor=None) -> Experiment:
    if not experiment.is_terminal:
        raise ExperimentError(f"experiment {experiment.short_id} is still {experiment.status}")
    with transaction.atomic():
        new = create_experiment(
            project=experiment.project,
            engine=experiment.engine,
            source=experiment.source,
            clone_url=experiment.clone_url,
            commit_sha=experiment.commit_sha,
            branch=experiment.branch,
            archive=experiment.archive,
            message=experiment.message,
            author=actor or experiment.author,
            author_name=actor.get_username() if actor else experiment.author_name,
            manifest_path=experiment.manifest_path,
            resubmitted_from=experiment,
        )
        Event.objects.create(
            experiment=experiment,
            kind=Event.Kind.ACTION,
            reason=f"resubmitted as {new.short_id}",
            actor=actor,
            data={"resubmission": str(new.id)},
        )
    return new


def record_action(experiment_id, reason: str, *, actor=None, data: dict | None = None) -> None:
    Event.objects.create(
        experiment_id=experiment_id, kind=Event.Kind.ACTION, reason=reason, actor=actor, data=data or {}
    )


def step_log(experiment_id, step: str, text: str) -> None:
    append_log(experiment_id, f"step:{step}", text if text.endswith("\n") else text + "\n")


def stale_active(seconds: float):
    return Experiment.objects.active().filter(heartbeat_at__lt=timezone.now() - timedelta(seconds=seconds))


# --- Debug hold (SPEC §7) ------------------------------------------------------------------
def is_held(experiment: Experiment) -> bool:
    """A failed experiment whose containers are kept for debugging right now."""
    return bool(experiment.status == Status.FAILED and experiment.hold_until and experiment.hold_until > timezone.now())


def hold_for_debugging(experiment_id, seconds: float) -> bool:
    """Keep a failed experiment's processes for `seconds`; the stop task leaves them alone until
    release_hold (a person, or reconcile once hold_until has passed)."""
    until = timezone.now() + timedelta(seconds=seconds)
    with transaction.atomic():
        if not Experiment.objects.filter(pk=experiment_id, status=Status.FAILED, hold_until__isnull=True).update(
            hold_until=until
        ):
            return False
        Event.objects.create(
            experiment_id=experiment_id,
            kind=Event.Kind.ACTION,
            reason=f"held for debugging until {until:%Y-%m-%d %H:%M:%S %Z}",
            data={"hold_until": until.isoformat(), "seconds": seconds},
        )
    return True


def release_hold(experiment_id, *, actor=None, reason: str = "") -> bool:
    """End a debug hold now and remove the kept processes. False when nothing was held."""
    who = actor.get_username() if actor else "the system"
    with transaction.atomic():
        if not Experiment.objects.filter(pk=experiment_id, hold_until__isnull=False).update(hold_until=None):
            return False
        Event.objects.create(
            experiment_id=experiment_id,
            kind=Event.Kind.ACTION,
            reason=reason or f"debug hold released by {who}",
            actor=actor,
        )
        _enqueue("stop", experiment_id)
    return True


def expired_holds():
    return Experiment.objects.filter(hold_until__isnull=False, hold_until__lte=timezone.now())
