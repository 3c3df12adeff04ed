"""Every change of an experiment's status or step happens here: a conditional update on the
transition table, an event row in the same transaction, and work enqueued after commit."""

import logging
from datetime import datetime, timedelta
from uuid import UUID

from django.conf import settings
from django.db import DEFAULT_DB_ALIAS, IntegrityError, connection, connections, models, transaction
from django.db.models import Count, F, Q, Window
from django.db.models.functions import Coalesce, RowNumber
from django.utils import timezone

from experiments import signals
from experiments.logs import append_log
from experiments.manifest import Manifest
from experiments.models import (
    ACTIVE_STATUSES,
    STATUS_TRANSITIONS,
    STEP_ORDER,
    STEP_TRANSITIONS,
    WATCHED_STEPS,
    EngineWatch,
    Event,
    Experiment,
    Status,
    Step,
    StepName,
    StepStatus,
    WebhookDelivery,
    allowed_from,
)
from experiments.queue import enqueue
from projects.models import Engine, Project

log = logging.getLogger(__name__)


class ExperimentError(Exception):
    """A request the experiment's state or the project's setup does not allow."""


def chosen_engine(project, name: str | None):
    """The project's engine called `name` (None: the caller's default), or ExperimentError."""
    if not name:
        return None
    engine = project.engines.filter(name=name).first()
    if engine is None:
        raise ExperimentError(f"engine {name} is not enabled for project {project.slug}")
    return engine


def _new_experiment(
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
) -> tuple[Experiment, list[models.Model]]:
    """A new experiment and the rows that come with it (its steps and its `created` event), not
    saved yet: create_experiment and create_experiment_from_push both build them here."""
    engine_id = engine.pk if engine else project.default_engine_id
    if engine_id is None:
        raise ExperimentError(f"project {project.slug} has no engine")
    # The default engine is always one of the project's (create_project sees to it).
    if engine_id != project.default_engine_id and not project.engines.filter(pk=engine_id).exists():
        raise ExperimentError(f"engine {engine.name} is not enabled for project {project.slug}")
    now = timezone.now()
    experiment = Experiment(
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
        created_at=now,
        heartbeat_at=now,
    )
    steps = [
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
    reason = f"resubmission of {resubmitted_from.short_id}" if resubmitted_from else "created"
    event = Event(
        experiment=experiment, kind=Event.Kind.STATUS, new=Status.CREATED, reason=reason, actor=author, created_at=now
    )
    return experiment, [experiment, *steps, event]


def _insert_created(experiment: Experiment, rows: list[models.Model]) -> None:
    """Insert a new experiment's rows, then (on commit) send it to its clone step and announce it.
    Inside the caller's transaction."""
    _insert(rows)
    enqueue("clone", experiment.pk)
    signals.announce(experiment.pk, signals.CREATED)


_INSERTS: dict[tuple[type[models.Model], int], tuple[str, list[models.Field], bool]] = {}


def _insert_statement(db, model: type[models.Model], count: int) -> tuple[str, list[models.Field], bool]:
    """The INSERT of `count` new rows of `model`, its fields, and whether it takes one array per
    column (PostgreSQL, several rows) rather than one value per field and row."""
    key = (model, count)
    if key not in _INSERTS:
        meta = model._meta
        fields = [f for f in meta.local_concrete_fields if f is not meta.auto_field and not f.generated]
        head = (
            f"INSERT INTO {db.ops.quote_name(meta.db_table)} ({', '.join(db.ops.quote_name(f.column) for f in fields)})"
        )
        arrays = db.vendor == "postgresql" and count > 1
        if arrays:
            # Its parameters do not grow with the rows: psycopg parses a statement of at most 50
            # parameters once and keeps it, and a webhook delivery's rows (its experiment, six
            # steps, event and delivery) then take 50 instead of 80. Beyond 50 it parses each
            # time (~0.5 ms of CPU), still correct.
            statement = f"{head} SELECT * FROM unnest({', '.join(f'%s::{f.db_type(db)}[]' for f in fields)})"
        else:
            statement = f"{head} VALUES " + ", ".join(["(" + ", ".join(["%s"] * len(fields)) + ")"] * count)
        _INSERTS[key] = (statement, fields, arrays)
    return _INSERTS[key]


def _insert(rows: list[models.Model]) -> None:
    """INSERT new rows of any models, one statement per model (all in one on PostgreSQL), with
    the values save() would store. The ORM's create() and bulk_create() composed each insert
    anew: for a webhook delivery's 12 rows that was half of its CPU time (issue 16). No
    pre_save/post_save signal is sent (none is connected for these models), and an
    auto-increment id is not read back (it stays None)."""
    # The connection itself: through django.db.connection, every attribute is a lookup.
    db = connections[DEFAULT_DB_ALIAS]
    by_model: dict[type[models.Model], list[models.Model]] = {}
    for row in rows:
        by_model.setdefault(type(row), []).append(row)
    statements, params = [], []
    for model, instances in by_model.items():
        statement, fields, arrays = _insert_statement(db, model, len(instances))
        values = [[f.get_db_prep_save(f.pre_save(row, True), db) for f in fields] for row in instances]
        statements.append(statement)
        params.append([list(column) for column in zip(*values, strict=True)] if arrays else sum(values, []))
    with db.cursor() as cursor:
        if db.vendor == "postgresql":
            # One round trip: data-modifying statements in WITH all run, and foreign keys are
            # checked at commit (Django declares them DEFERRABLE INITIALLY DEFERRED).
            *first, last = statements
            sql = "WITH " + ", ".join(f"_{i} AS ({statement})" for i, statement in enumerate(first)) + " " + last
            cursor.execute(sql if first else last, sum(params, []))
        else:
            for statement, values in zip(statements, params, strict=True):
                cursor.execute(statement, values)
    for row in rows:
        row._state.adding = False
        row._state.db = db.alias


def create_experiment(*, project: Project, **fields) -> Experiment:
    """A new experiment of `project`, queued for its clone step (the fields: _new_experiment's)."""
    experiment, rows = _new_experiment(project=project, **fields)
    # savepoint=False: inside a caller's transaction a savepoint would only cost round trips.
    with transaction.atomic(savepoint=False):
        _insert_created(experiment, rows)
    return experiment


REPLAY_WINDOW = timedelta(hours=24)


def _lock_body_digest(body_digest: str) -> None:
    """Serialise deliveries of one body until the transaction ends, so two copies sent at once
    cannot both miss each other in the lookup. PostgreSQL: a transaction-scoped advisory lock
    (no table is touched). SQLite: its IMMEDIATE transactions already serialise writers."""
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            # 60 bits of the digest: a bigint key; a collision only serialises two deliveries.
            cursor.execute("SELECT pg_advisory_xact_lock(%s)", [int(body_digest[:15], 16)])


def _body_seen(project: Project, provider: str, body_digest: str) -> bool:
    """One lookup on the body_digest index. In SQL: the ORM spent four times as long composing
    this query as the database answering it, a tenth of a webhook delivery's CPU time."""
    since = connection.ops.adapt_datetimefield_value(timezone.now() - REPLAY_WINDOW)
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT 1 FROM {WebhookDelivery._meta.db_table} WHERE body_digest = %s AND project_id = %s"
            " AND provider = %s AND received_at >= %s LIMIT 1",
            [body_digest, project.pk, provider, since],
        )
        return cursor.fetchone() is not None


def create_experiment_from_push(
    *, project: Project, provider: str, delivery_id: str, body_digest: str = "", **fields
) -> tuple[Experiment | None, bool]:
    """Returns (experiment, created). A delivery id seen before, or the same signed body within
    24 hours (the delivery id is not signed: a replayed body may come with a fresh one), creates
    nothing (SPEC §2)."""
    experiment, rows = _new_experiment(project=project, **fields)
    # Inserted with its experiment: a duplicate id (the unique constraint) fails the whole
    # delivery, and nothing of it stays.
    rows.append(
        WebhookDelivery(
            project=project,
            provider=provider,
            delivery_id=delivery_id,
            body_digest=body_digest,
            experiment=experiment,
            received_at=experiment.created_at,
        )
    )
    try:
        with transaction.atomic():
            if body_digest:
                _lock_body_digest(body_digest)
                if _body_seen(project, provider, body_digest):
                    return None, False
            _insert_created(experiment, rows)
    except IntegrityError:
        return None, False
    return experiment, True


def record_ignored_delivery(*, project: Project, provider: str, delivery_id: str, body_digest: str = "") -> None:
    try:
        with transaction.atomic():
            WebhookDelivery.objects.create(
                project=project, provider=provider, delivery_id=delivery_id, body_digest=body_digest
            )
    except IntegrityError:
        pass


def _step_event(experiment_id: UUID, step: str, old: str, new: str, reason: str = "", actor=None) -> None:
    Event.objects.create(
        experiment_id=experiment_id, kind=Event.Kind.STEP, step=step, old=old, new=new, reason=reason, actor=actor
    )


def _set_step(experiment_id: UUID, step: str, new: str, *, reason: str = "", actor=None) -> bool:
    now = timezone.now()
    # A step usually ends from Running: asked first, that costs one update, not two.
    for old in sorted(allowed_from(STEP_TRANSITIONS, new), key=lambda old: old != StepStatus.RUNNING):
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


_STEP_PAIR: dict[str, str] = {}


def _step_pair_statement(db) -> str:
    """The UPDATE of _next_step's fast path. Written out once: the ORM composes an update with
    CASE anew on every call (~2 ms of CPU, a third of a step change)."""
    if db.vendor not in _STEP_PAIR:
        quote, meta = db.ops.quote_name, Step._meta
        status, name, ended, started, experiment = (
            quote(meta.get_field(field).column) for field in ("status", "name", "ended_at", "started_at", "experiment")
        )
        _STEP_PAIR[db.vendor] = (
            f"UPDATE {quote(meta.db_table)} SET {status} = CASE WHEN {name} = %s THEN %s ELSE %s END, "
            f"{ended} = CASE WHEN {name} = %s THEN %s ELSE {ended} END, "
            f"{started} = CASE WHEN {name} = %s THEN %s ELSE {started} END "
            f"WHERE {experiment} = %s AND (({name} = %s AND {status} = %s) OR ({name} = %s AND {status} = %s))"
        )
    return _STEP_PAIR[db.vendor]


def _next_step(
    experiment_id: UUID, previous: str, outcome: str, step: str, now: datetime, reason: str = "", also=()
) -> None:
    """_set_step(previous → outcome) then _set_step(step → Running). Where a step change usually
    finds them (Running, Initialize) both rows change in one update and both events go in one
    insert: a step change is 2 queries, not 4. Otherwise the rows are taken one by one. `also`:
    events of the same change not written yet (the status event of a start), in that insert."""
    if StepStatus.RUNNING not in allowed_from(STEP_TRANSITIONS, outcome):
        if also:
            _insert(list(also))
        _set_step(experiment_id, previous, outcome, reason=reason)
        _set_step(experiment_id, step, StepStatus.RUNNING)
        return
    db = connections[DEFAULT_DB_ALIAS]
    at = Step._meta.get_field("started_at").get_db_prep_value(now, db)
    of = Step._meta.get_field("experiment").get_db_prep_value(experiment_id, db)
    running, initialize = StepStatus.RUNNING, StepStatus.INITIALIZE
    with db.cursor() as cursor:
        cursor.execute(
            _step_pair_statement(db),
            [previous, outcome, running, previous, at, step, at, of, previous, running, step, initialize],
        )
        changed = cursor.rowcount
    events = [
        Event(
            experiment_id=experiment_id, kind=Event.Kind.STEP, step=previous, old=running, new=outcome, reason=reason
        ),
        Event(experiment_id=experiment_id, kind=Event.Kind.STEP, step=step, old=initialize, new=running),
    ]
    if changed < 2:
        # One row (or none) was elsewhere: the one changed above has this very `now`.
        done = set(
            Step.objects.filter(experiment_id=experiment_id, name__in=[previous, step])
            .filter(Q(name=previous, ended_at=now) | Q(name=step, started_at=now))
            .values_list("name", flat=True)
        )
        events = [event for event in events if event.step in done]
        if previous not in done:
            _set_step(experiment_id, previous, outcome, reason=reason)
        if step not in done:
            _set_step(experiment_id, step, StepStatus.RUNNING)
    events = [*also, *events]
    if events:
        _insert(events)


def begin_step(
    experiment_id: UUID,
    step: str,
    *,
    previous_outcome: str = StepStatus.SUCCEEDED,
    reason: str = "",
    fields: dict | None = None,
) -> bool:
    """Move an active experiment from the step before `step` into `step`. False when the
    experiment is no longer there to move (cancelled, failed, or already moved by a twin task),
    or, for Waiting → Cloning, when its engine has no free slot for its project yet. `fields`
    of the experiment are set in the same update (what the step begins with: Running's handle)."""
    index = STEP_ORDER.index(step)
    previous = STEP_ORDER[index - 1]
    now = timezone.now()
    if previous == StepName.WAITING:
        return _leave_waiting(experiment_id)
    with transaction.atomic():
        # Past Waiting an experiment is Processing: that update first, one query instead of two.
        also = ()
        if not Experiment.objects.filter(pk=experiment_id, status=Status.PROCESSING, current_step=previous).update(
            current_step=step, heartbeat_at=now, **(fields or {})
        ):
            started = _move_from_created(experiment_id, previous, step, now, fields)
            if started is None:
                return False
            also = (started,)
        _next_step(experiment_id, previous, previous_outcome, step, now, reason, also)
        if step == StepName.RUNNING:
            signals.announce(experiment_id, signals.RUNNING)
    return True


def begin_completions(outcomes: dict[UUID, tuple[str, str]]) -> list[UUID]:
    """begin_step(id, Completed, previous_outcome=…, reason=…) for many Running experiments at
    once, {id: (outcome of Running, reason)}: the exits an engine's watcher saw in one interval
    cost the same handful of queries whether one exited or fifty, each step change still with
    its event row. The ids moved into Completed, which the caller goes on finishing."""
    if not outcomes:
        return []
    now = timezone.now()
    with transaction.atomic():
        # Locked, so the steps below are as these rows say until commit (finish_experiment and
        # begin_step take the same row locks).
        moved = list(
            Experiment.objects.select_for_update()
            .filter(pk__in=outcomes, status=Status.PROCESSING, current_step=StepName.RUNNING)
            .order_by("pk")
            .values_list("pk", flat=True)
        )
        if not moved:
            return []
        Experiment.objects.filter(pk__in=moved).update(current_step=StepName.COMPLETED, heartbeat_at=now)
        for outcome in {outcomes[pk][0] for pk in moved}:
            Step.objects.filter(
                experiment_id__in=[pk for pk in moved if outcomes[pk][0] == outcome],
                name=StepName.RUNNING,
                status=StepStatus.RUNNING,
            ).update(status=outcome, ended_at=now)
        Step.objects.filter(experiment_id__in=moved, name=StepName.COMPLETED, status=StepStatus.INITIALIZE).update(
            status=StepStatus.RUNNING, started_at=now
        )
        Event.objects.bulk_create(
            event
            for pk in moved
            for event in (
                Event(
                    experiment_id=pk,
                    kind=Event.Kind.STEP,
                    step=StepName.RUNNING,
                    old=StepStatus.RUNNING,
                    new=outcomes[pk][0],
                    reason=outcomes[pk][1],
                ),
                Event(
                    experiment_id=pk,
                    kind=Event.Kind.STEP,
                    step=StepName.COMPLETED,
                    old=StepStatus.INITIALIZE,
                    new=StepStatus.RUNNING,
                ),
            )
        )
    return moved


def _move_from_created(
    experiment_id: UUID, previous: str, step: str, now: datetime, fields: dict | None = None
) -> Event | None:
    """Created → Processing in `step`; its status event, which the caller writes with the step
    change's own (_next_step's `also`), or None when the experiment was not there to move."""
    moved = Experiment.objects.filter(pk=experiment_id, status=Status.CREATED, current_step=previous).update(
        status=Status.PROCESSING,
        current_step=step,
        heartbeat_at=now,
        started_at=Coalesce("started_at", now),
        waiting_reason="",
        **(fields or {}),
    )
    if not moved:
        return None
    return Event(
        experiment_id=experiment_id,
        kind=Event.Kind.STATUS,
        old=Status.CREATED,
        new=Status.PROCESSING,
        reason=f"{step} started",
    )


# --- Slots: max_running_experiments_per_project (SPEC §4) ----------------------------------
# An experiment holds a slot from the moment it leaves Waiting (status Processing) until it is
# terminal. Waiting experiments start oldest first. Who moves one out of Waiting:
# - its own clone task, the first time it runs (begin_step);
# - otherwise a "dispatch" (a slot freed, reconcile) which moves it and enqueues one clone task.
# A dispatch only moves experiments whose task already ran and left a waiting_reason: one whose
# first task is still queued keeps its turn (and the slot) for that task, so no experiment ever
# gets two clone tasks (a second would find it in Cloning and clone it again alongside).


def _plural(count: int, one: str, many: str) -> str:
    return f"{count} {one if count == 1 else many}"


def _fill_slots(project_id, engine: Engine, *, own: Experiment | None = None) -> tuple[bool, list[UUID]]:
    """Inside a transaction: start the oldest waiting experiments of (project, engine) that fit.
    Returns (whether `own` started, the others started, whose clone task the caller enqueues).
    When `own` does not fit, its waiting reason is recorded."""
    from experiments.limits import MAX_RUNNING, engine_limit

    # The project row is the lock: two clone tasks starting at once must not both take the
    # last slot. (SQLite ignores FOR UPDATE, but its IMMEDIATE transactions serialise writers.)
    # NO KEY: a webhook inserting an experiment of the project (a foreign key share lock) is
    # not held up by it.
    list(Project.objects.select_for_update(no_key=True).filter(pk=project_id).values_list("pk", flat=True))
    limit = engine_limit(engine, MAX_RUNNING)
    queue = Experiment.objects.filter(
        project_id=project_id, engine=engine, status=Status.CREATED, current_step=StepName.WAITING
    )
    running = Experiment.objects.filter(project_id=project_id, engine=engine, status=Status.PROCESSING).count()
    free = max(limit - running, 0)
    now = timezone.now()
    own_started, others = False, []
    # Of the first `free` in line, only `own` and those a full engine held back (they have a
    # reason) are started here: the database picks them out, so a sweep of 500 does not read
    # the whole line 500 times.
    first_in_line = (
        queue.annotate(place=Window(RowNumber(), order_by=[F("created_at").asc(), F("id").asc()]))
        .filter(place__lte=free)
        .filter(Q(pk=own.pk) | ~Q(waiting_reason="") if own is not None else ~Q(waiting_reason=""))
        .order_by("place")
    )
    for experiment_id, waiting_reason in first_in_line.values_list("id", "waiting_reason") if free else ():
        if own is not None and experiment_id == own.pk:
            own_started = _start_waiting(experiment_id, now)
        elif waiting_reason and _start_waiting(experiment_id, now):
            others.append(experiment_id)
        # Else its first clone task is still queued: the slot is kept for it.
    if own is not None and not own_started:
        # With running < limit the free slots are kept for older experiments whose first task
        # is about to start them: they run a moment later, and a reason that stays true spares
        # an event per waiting experiment each time one starts.
        n = max(running, limit)
        why = _plural(n, "experiment of this project already runs", "experiments of this project already run")
        _record_waiting(own.pk, f"waiting for a slot: {why} on engine {engine.name} ({MAX_RUNNING} = {limit})")
    return own_started, others


def _all_fit(project_id, engine: Engine) -> bool:
    """Whether every active experiment of (project, engine) has a slot, and none was held back
    (left waiting with a reason, for a dispatch to start): then one starts at once, without the
    project lock and the line. Safe without the lock: an experiment is Waiting or Processing,
    never neither, so this count includes whoever could race for a slot, and anyone created
    after counts this one."""
    from experiments.limits import MAX_RUNNING, engine_limit

    counts = Experiment.objects.filter(project_id=project_id, engine=engine, status__in=ACTIVE_STATUSES).aggregate(
        active=Count("pk"), held=Count("pk", filter=Q(status=Status.CREATED) & ~Q(waiting_reason=""))
    )
    return counts["active"] <= engine_limit(engine, MAX_RUNNING) and not counts["held"]


def _start_waiting(experiment_id: UUID, now: datetime) -> bool:
    started = _move_from_created(experiment_id, StepName.WAITING, StepName.CLONING, now)
    if started is None:
        return False
    _next_step(experiment_id, StepName.WAITING, StepStatus.SUCCEEDED, StepName.CLONING, now, also=(started,))
    return True


def _record_waiting(experiment_id: UUID, reason: str) -> None:
    reason = reason[:300]
    # The heartbeat says "checked just now": reconcile leaves it alone for a while.
    if Experiment.objects.filter(pk=experiment_id, status=Status.CREATED, waiting_reason=reason).update(
        heartbeat_at=timezone.now()
    ):
        return  # unchanged: no new event or log line (reconcile re-checks every period)
    if not Experiment.objects.filter(pk=experiment_id, status=Status.CREATED).update(
        waiting_reason=reason, heartbeat_at=timezone.now()
    ):
        return
    Event.objects.create(
        experiment_id=experiment_id,
        kind=Event.Kind.STEP,
        step=StepName.WAITING,
        # The step stays Running: the row records why, not a transition.
        old=StepStatus.RUNNING,
        new=StepStatus.RUNNING,
        reason=reason,
        data={"waiting_reason": reason},
    )
    step_log(experiment_id, StepName.WAITING, reason)


def _leave_waiting(experiment_id: UUID) -> bool:
    own = (
        Experiment.objects.filter(pk=experiment_id, status=Status.CREATED, current_step=StepName.WAITING)
        .select_related("engine")
        .only("id", "project", "created_at", "engine__id", "engine__name", "engine__config")
        .first()
    )
    if own is None:
        return False  # cancelled, or already out of Waiting (a resumed task: see pipeline.common.enter)
    with transaction.atomic():
        if _all_fit(own.project_id, own.engine):
            return _start_waiting(experiment_id, timezone.now())
        started, others = _fill_slots(own.project_id, own.engine, own=own)
        for other in others:
            enqueue("clone", other)
    return started


def start_waiting_experiments(project_id, engine_id) -> list[UUID]:
    """Give freed slots to the oldest waiting experiments of (project, engine); the ids started."""
    # Most ends free a slot nobody waits for: one look, not the project lock and a count. One
    # created after the look takes its slot through its own first task, which counts after.
    if not Experiment.objects.filter(
        project_id=project_id, engine_id=engine_id, status=Status.CREATED, current_step=StepName.WAITING
    ).exists():
        return []
    engine = Engine.objects.filter(pk=engine_id).first()
    if engine is None:
        return []
    with transaction.atomic():
        _started, others = _fill_slots(project_id, engine)
        for other in others:
            enqueue("clone", other)
    return others


def heartbeat(experiment_id: UUID) -> bool:
    """Tell reconcile the owning task is alive; False once the experiment is no longer active."""
    return bool(
        Experiment.objects.filter(pk=experiment_id, status__in=ACTIVE_STATUSES).update(heartbeat_at=timezone.now())
    )


def watched(engine_id: int):
    """The experiments an engine's watcher follows: Running, and Completed ones a lost watcher
    left half finished."""
    return Experiment.objects.filter(engine_id=engine_id, status=Status.PROCESSING, current_step__in=WATCHED_STEPS)


def heartbeat_watched(engine_id: int, every: float) -> int:
    """One update for all of an engine's watched experiments; rows beaten less than `every`
    seconds ago are left alone, so a thousand rows are not rewritten every interval."""
    now = timezone.now()
    return watched(engine_id).filter(heartbeat_at__lt=now - timedelta(seconds=every)).update(heartbeat_at=now)


def is_active(experiment_id: UUID) -> bool:
    return Experiment.objects.filter(pk=experiment_id, status__in=ACTIVE_STATUSES).exists()


# --- Facts the pipeline learns on the way: no transition, so no event row --------------------
def record_commit(experiment_id: UUID, sha: str) -> bool:
    """The commit a push without a sha resolved to. Learned once: a resumed clone fetches that
    commit again, never the branch's newer head."""
    return bool(
        Experiment.objects.filter(pk=experiment_id, status__in=ACTIVE_STATUSES, commit_sha="").update(commit_sha=sha)
    )


def record_manifest(experiment_id: UUID, manifest: Manifest | None, text: str) -> bool:
    """The manifest as written, and its stored form once it is valid (None: the text alone, kept
    so the page shows what was refused)."""
    fields: dict = {"manifest_text": text}
    if manifest is not None:
        fields["manifest"] = manifest.to_dict()
    return bool(Experiment.objects.filter(pk=experiment_id, status__in=ACTIVE_STATUSES).update(**fields))


def record_image(experiment_id: UUID, image: str) -> bool:
    """The image the build made or reused. False when the experiment left Building meanwhile
    (cancelled, failed): it must go no further."""
    building = Experiment.objects.filter(pk=experiment_id, status__in=ACTIVE_STATUSES, current_step=StepName.BUILDING)
    return bool(building.update(image=image))


def record_submission(experiment_id: UUID, handle: dict, deadline: datetime | None, watch_state: dict) -> bool:
    """The engine took the workload: keep its handle, the timeout's deadline and the watch's
    starting bookkeeping. False when a cancel came first (the caller removes the workload)."""
    return bool(
        Experiment.objects.filter(pk=experiment_id, status__in=ACTIVE_STATUSES).update(
            handle=handle, deadline_at=deadline, watch_state=watch_state
        )
    )


def save_watch_state(experiment_id: UUID, watch_state: dict) -> bool:
    """The watch's log cursors and collected logs, so the next watcher resumes where this one
    stopped."""
    return bool(Experiment.objects.filter(pk=experiment_id, status__in=ACTIVE_STATUSES).update(watch_state=watch_state))


def record_handle(experiment_id: UUID, handle: dict) -> bool:
    """The engine's handle as it now is: found again by a watch, or a debug hold's (whose
    keep-alive copies of failed processes terminals open in)."""
    return bool(Experiment.objects.filter(pk=experiment_id, status__in=ACTIVE_STATUSES).update(handle=handle))


def finish_experiment(
    experiment_id: UUID,
    new: str,
    *,
    reason: str = "",
    exit_code: int | None = None,
    actor=None,
    step_status: str | None = None,
    watch_state: dict | None = None,
) -> bool:
    """End an experiment: Succeeded, Failed or Cancelled, with its current step to match (and
    the watch's last bookkeeping, saved with it)."""
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
        row = (
            Experiment.objects.select_for_update()
            .filter(pk=experiment_id)
            .values("status", "current_step", "project_id", "engine_id")
            .first()
        )
        if not row or row["status"] not in allowed_from(STATUS_TRANSITIONS, new):
            return False
        # waiting_reason cleared: it says why an experiment has not started *yet*; the Waiting
        # step's log and events keep the history.
        fields = {"status": new, "finished_at": now, "heartbeat_at": now, "waiting_reason": ""}
        if exit_code is not None:
            fields["exit_code"] = exit_code
        if watch_state is not None:
            fields["watch_state"] = watch_state
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
        # A slot of (project, engine) is free now. Its own transaction after this one: it locks
        # the project row, which must never be taken while holding an experiment row (deadlock
        # with a clone task that holds the project and moves experiments). robust: reconcile
        # retries a dispatch that failed, and the finish itself stands.
        transaction.on_commit(lambda: start_waiting_experiments(row["project_id"], row["engine_id"]), robust=True)
        signals.announce(experiment_id, signals.OF_TERMINAL_STATUS[new])
    return True


def fail_experiment(experiment_id: UUID, reason: str, *, exit_code: int | None = None) -> bool:
    done = finish_experiment(experiment_id, Status.FAILED, reason=reason, exit_code=exit_code)
    if done:
        # Whatever already runs on the engine goes: nothing outlives a failed experiment
        # (except under a debug hold, which the stop task honours).
        enqueue("stop", experiment_id)
    return done


def cancel_experiment(experiment: Experiment, *, actor=None) -> None:
    who = actor.get_username() if actor else "the system"
    if not finish_experiment(experiment.pk, Status.CANCELLED, reason=f"Cancelled by {who}", actor=actor):
        raise ExperimentError(f"experiment {experiment.short_id} is {experiment.status}: nothing to cancel")
    # The stop task removes whatever the engine runs; the clone/build loops notice on their own.
    enqueue("stop", experiment.pk)
    experiment.refresh_from_db()


def resubmit_experiment(experiment: Experiment, *, actor=None, engine: Engine | None = None) -> Experiment:
    """Run the same code again, on `engine` (one of the project's) or else the original's."""
    if not experiment.is_terminal:
        raise ExperimentError(f"experiment {experiment.short_id} is still {experiment.status}")
    with transaction.atomic():
        new = create_experiment(
            project=experiment.project,
            engine=engine or experiment.engine,
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


def record_action(experiment_id: UUID, reason: str, *, actor=None, data: dict | None = None) -> None:
    Event.objects.create(
        experiment_id=experiment_id, kind=Event.Kind.ACTION, reason=reason, actor=actor, data=data or {}
    )


def step_log(experiment_id: UUID, step: str, text: str) -> None:
    append_log(experiment_id, f"step:{step}", text if text.endswith("\n") else text + "\n")


def stale_active(seconds: float):
    return Experiment.objects.active().filter(heartbeat_at__lt=timezone.now() - timedelta(seconds=seconds))


# --- Debug hold (SPEC §7) ------------------------------------------------------------------
def hold_for_debugging(experiment_id: UUID, seconds: float) -> bool:
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


def release_hold(experiment_id: UUID, *, actor=None, reason: str = "") -> bool:
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
        enqueue("stop", experiment_id)
    return True


def expired_holds():
    return Experiment.objects.filter(hold_until__isnull=False, hold_until__lte=timezone.now())


# --- The engine watcher's lease ---------------------------------------------------------------
def watch_lease_seconds() -> float:
    """A few intervals: a watcher that died is replaced this long after its last renewal."""
    return max(5.0, 10 * settings.WATCH_POLL_SECONDS)


def take_watch(engine_id: int, owner: str) -> bool:
    """The lease of `engine_id`'s watcher for `owner`, if it is free or expired."""
    now = timezone.now()
    try:
        EngineWatch.objects.get_or_create(engine_id=engine_id)
    except IntegrityError:
        pass  # created meanwhile by a twin watcher: the update below decides
    free = Q(owner="") | Q(expires_at__lt=now)
    until = now + timedelta(seconds=watch_lease_seconds())
    return bool(EngineWatch.objects.filter(free, engine_id=engine_id).update(owner=owner, expires_at=until))


def renew_watch(engine_id: int, owner: str) -> bool:
    """False once another watcher took the lease over (this one was too slow): it must stop."""
    until = timezone.now() + timedelta(seconds=watch_lease_seconds())
    return bool(EngineWatch.objects.filter(engine_id=engine_id, owner=owner).update(expires_at=until))


def release_watch(engine_id: int, owner: str) -> None:
    EngineWatch.objects.filter(engine_id=engine_id, owner=owner).update(owner="", expires_at=timezone.now())


def watcher_gone(engine_id: int) -> bool:
    """Whether the engine's experiments went unwatched: its watcher died holding the lease, or
    none ever ran (not one that freed it at the end of its slice)."""
    lease = EngineWatch.objects.filter(engine_id=engine_id).values_list("owner", "expires_at").first()
    return lease is None or (lease[0] != "" and lease[1] < timezone.now())


def ensure_watcher(engine_id: int) -> bool:
    """Enqueue the engine's watcher unless one holds a live lease. A twin is harmless: the
    second finds the lease taken and returns. True when one was enqueued."""
    if EngineWatch.objects.filter(engine_id=engine_id, expires_at__gte=timezone.now()).exclude(owner="").exists():
        return False
    enqueue("watch_engine", engine_id)
    return True
