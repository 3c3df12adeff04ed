import logging
import secrets

from django.core.exceptions import ValidationError
from django.db import IntegrityError, models, transaction
from django.utils import timezone

from aichor.lib.crypto import encrypt
from projects import signals
from projects.models import (
    ApiToken,
    Engine,
    Membership,
    PersistentVolumeClaim,
    Project,
    ProjectVariable,
    clone_url_problem,
    new_namespace,
)


def create_project(
    *,
    name: str,
    slug: str,
    repo_clone_url: str = "",
    repo_web_url: str = "",
    engines: list[Engine] = (),
    default_engine: Engine | None = None,
    admins: list = (),
    members: list = (),
    webhook_secret: str | None = None,
) -> Project:
    problem = clone_url_problem(repo_clone_url)
    if problem:
        raise ValidationError({"repo_clone_url": problem})
    engines = list(engines)
    if default_engine and default_engine not in engines:
        engines.append(default_engine)
    with transaction.atomic():
        project = Project.objects.create(
            name=name,
            slug=slug,
            repo_clone_url=repo_clone_url,
            repo_web_url=repo_web_url,
            webhook_secret_encrypted=encrypt(webhook_secret or secrets.token_hex(20)),
            namespace=new_namespace(slug),
            default_engine=default_engine or (engines[0] if engines else None),
        )
        project.engines.set(engines)
        for user in admins:
            Membership.objects.create(user=user, project=project, role=Membership.Role.ADMIN)
        for user in members:
            Membership.objects.create(user=user, project=project, role=Membership.Role.MEMBER)
        # Bucket creation is slow I/O: after commit, and repaired later by the Datasets tab.
        transaction.on_commit(lambda: _create_buckets(project))
    return project


def _create_buckets(project: Project) -> None:
    from datasets.services import StorageError, ensure_buckets

    try:
        ensure_buckets(project)
    except StorageError as exc:
        logging.getLogger(__name__).warning("buckets of project %s not created: %s", project.slug, exc)


def rotate_webhook_secret(project: Project) -> str:
    secret = secrets.token_hex(20)
    Project.objects.filter(pk=project.pk).update(webhook_secret_encrypted=encrypt(secret))
    project.webhook_secret_encrypted = encrypt(secret)
    return secret


def add_member(project: Project, user, role: str = Membership.Role.MEMBER) -> Membership:
    membership, _ = Membership.objects.update_or_create(user=user, project=project, defaults={"role": role})
    return membership


class LastAdmin(ValidationError):
    """The change would leave a project without an admin."""


def set_member_by_email(project: Project, email: str, role: str) -> Membership:
    """Add the existing user with this e-mail (the login name) to the project, or change their role."""
    from django.contrib.auth import get_user_model

    User = get_user_model()
    email = email.strip()
    user = User.objects.filter(models.Q(email__iexact=email) | models.Q(username__iexact=email), is_active=True).first()
    if user is None:
        raise ValidationError({"email": f"No user with the e-mail {email}: they must have an account first."})
    with transaction.atomic():
        if role != Membership.Role.ADMIN:
            _keep_an_admin(project, excluding=Membership.objects.filter(project=project, user=user))
        return add_member(project, user, role)


def remove_member(project: Project, pk: int) -> Membership | None:
    """Remove a membership of this project (None if there is no such membership)."""
    with transaction.atomic():
        membership = Membership.objects.filter(project=project, pk=pk).select_related("user").first()
        if membership is None:
            return None
        _keep_an_admin(project, excluding=Membership.objects.filter(pk=membership.pk))
        membership.delete()
    return membership


def _keep_an_admin(project: Project, excluding) -> None:
    # Locking the admin rows makes two concurrent demotions of the last two admins serialise:
    # the second one sees the first one's change and is refused.
    admins = list(
        Membership.objects.select_for_update()
        .filter(project=project, role=Membership.Role.ADMIN)
        .values_list("pk", flat=True)
    )
    leaving = set(excluding.values_list("pk", flat=True))
    if admins and not set(admins) - leaving:
        raise LastAdmin("A project must keep at least one admin: make someone else admin first.")


# --- API tokens ----------------------------------------------------------------------------
TOKEN_PREFIX = "aichor_"


def create_api_token(user, expires_at=None, *, name: str = "default") -> str:
    """Issue a fresh token and return it in clear: the only time anyone sees it.
    Only its digest is stored. A user may hold several (SPEC §1): older ones stay valid."""
    raw = TOKEN_PREFIX + secrets.token_urlsafe(32)
    ApiToken.objects.create(
        user=user,
        name=name,
        digest=ApiToken.digest_of(raw),
        prefix=raw[: len(TOKEN_PREFIX) + 4],
        expires_at=expires_at,
    )
    return raw


def revoke_api_token(user, pk: int | None = None) -> int:
    """Revoke one of the user's tokens (by id), or all of them; returns how many were still unrevoked.
    Scoped to `user`, so an id of someone else's token revokes nothing."""
    tokens = ApiToken.objects.filter(user=user, revoked_at__isnull=True)
    if pk is not None:
        tokens = tokens.filter(pk=pk)
    return tokens.update(revoked_at=timezone.now())


def touch_api_token(token_id: int) -> None:
    ApiToken.objects.filter(pk=token_id).update(last_used_at=timezone.now())


# --- Persistent volume claims (SPEC §6) ------------------------------------------------
def create_pvc(project: Project, form) -> PersistentVolumeClaim | None:
    pvc = form.save(commit=False)
    pvc.project = project
    try:
        with transaction.atomic():
            pvc.save()
    except IntegrityError:  # a concurrent create of the same name
        form.add_error("name", "This project already has a PVC with this name.")
        return None
    # The cluster call is slow I/O: after the record's transaction, never inside it.
    try:
        signals.pvc_created.send(sender=PersistentVolumeClaim, pvc=pvc)
    except signals.PvcRefused as exc:
        pvc.delete()
        form.add_error(None, str(exc))
        return None
    return pvc


def delete_pvc(project: Project, pk: int) -> str | None:
    """Delete the record and its claim; the reason when the cluster side refuses (None: done)."""
    pvc = PersistentVolumeClaim.objects.filter(project=project, pk=pk).select_related("engine", "project").first()
    if pvc is None:
        return None
    try:
        signals.pvc_deleting.send(sender=PersistentVolumeClaim, pvc=pvc)
    except signals.PvcRefused as exc:
        return str(exc)
    pvc.delete()
    return None


# --- Project variables (SPEC §7) -----------------------------------------------------------
def set_variable(project: Project, *, name: str, kind: str, value: str, sensitive: bool) -> ProjectVariable:
    """Create or replace a variable. A sensitive value is stored only encrypted."""
    fields = {
        "sensitive": sensitive,
        "value": "" if sensitive else value,
        "value_encrypted": encrypt(value) if sensitive else "",
    }
    variable, _ = ProjectVariable.objects.update_or_create(project=project, name=name, kind=kind, defaults=fields)
    return variable


def delete_variable(project: Project, pk: int) -> bool:
    return bool(ProjectVariable.objects.filter(project=project, pk=pk).delete()[0])
