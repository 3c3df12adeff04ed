import secrets

from django.db import transaction

from aichor.lib.crypto import encrypt
from projects.models import Engine, Membership, Project, new_namespace


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
    return project


def rotate_webhook_secret(project: Project) -> str:
    secret = secrets.token_hex(20)
    Project.objects.filter(pk=project.pk).update(webhook_secret_encrypted=encrypt(secret))
    project.webhook_secret_encrypted = encrypt(secret)
    return secret


def add_member(project: Project, user, role: str = Membership.Role.MEMBER) -> Membership:
    membership, _ = Membership.objects.update_or_create(user=user, project=project, defaults={"role": role})
    return membership
