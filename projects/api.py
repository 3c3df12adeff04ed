"""API routes for the caller's account, projects and engines."""

from django.http import HttpRequest
from ninja import Router, Schema

from projects.access import get_project
from projects.models import Engine, Project

router = Router(tags=["projects"])


class UserOut(Schema):
    username: str
    email: str
    is_superuser: bool


class EngineOut(Schema):
    name: str
    kind: str


class ProjectOut(Schema):
    slug: str
    name: str
    role: str | None
    namespace: str
    repo_web_url: str
    default_engine: str | None
    engines: list[EngineOut]


def project_out(project: Project) -> dict:
    """`project` comes from the access helper or visible_projects: its `role` is annotated."""
    return {
        "slug": project.slug,
        "name": project.name,
        "role": project.role,
        "namespace": project.namespace,
        "repo_web_url": project.repo_web_url,
        "default_engine": project.default_engine.name if project.default_engine else None,
        "engines": [{"name": e.name, "kind": e.kind} for e in project.engines.all()],
    }


def visible_projects(user):
    return Project.objects.visible_to(user).select_related("default_engine").prefetch_related("engines")


@router.get("/me", response=UserOut, summary="The authenticated user")
def me(request: HttpRequest):
    return request.auth


@router.get("/projects", response=list[ProjectOut], summary="Projects the caller is a member of")
def list_projects(request: HttpRequest):
    return [project_out(p) for p in visible_projects(request.auth)]


@router.get("/projects/{slug}", response=ProjectOut, summary="One project")
def project_detail(request: HttpRequest, slug: str):
    project, _ = get_project(request.auth, slug)
    return project_out(project)


@router.get("/projects/{slug}/engines", response=list[EngineOut], summary="Engines a project may use")
def project_engines(request: HttpRequest, slug: str):
    project, _ = get_project(request.auth, slug)
    return project.engines.all()


@router.get("/engines", response=list[EngineOut], summary="Engines of the caller's projects")
def list_engines(request: HttpRequest):
    return Engine.objects.filter(projects__in=visible_projects(request.auth)).distinct()
