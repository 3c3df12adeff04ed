import logging
import secrets

from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction
from django.utils import timezone

from aichor.lib.crypto import encrypt
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


# --- API tokens ----------------------------------------------------------------------------
TOKEN_PREFIX = "aichor_"


def create_api_token(user, expires_at=None) -> str:
    """Issue a fresh token and return it in clear: the only time anyone sees it. Only its
    digest is stored. One active token per user: issuing one revokes the previous."""
    raw = TOKEN_PREFIX + secrets.token_urlsafe(32)
    with transaction.atomic():
        ApiToken.objects.filter(user=user, revoked_at__isnull=True).update(revoked_at=timezone.now())
        ApiToken.objects.create(
            user=user, digest=ApiToken.digest_of(raw), prefix=raw[: len(TOKEN_PREFIX) + 4], expires_at=expires_at
        )
    return raw


def revoke_api_token(user) -> int:
    """Revoke the user's tokens; returns how many were still unrevoked."""
    return ApiToken.objects.filter(user=user, revoked_at__isnull=True).update(revoked_at=timezone.now())


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
    return pvc


def delete_pvc(project: Project, pk: int) -> None:
    PersistentVolumeClaim.objects.filter(project=project, pk=pk).delete()


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
