"""`manage.py k8s_render MANIFEST [--project SLUG] [--engine NAME]`: the Kubernetes objects an
experiment with this manifest would create, as multi-document YAML (a dry run for cluster
admins, like `kubectl create --dry-run`). The same path as submit: the manifest is validated as
Cloning validates it, the Workload built by `build_workload`, the objects by
`k8s_objects.render`. Only the experiment id and the image digest are placeholders.

Writes nothing anywhere: without --project the project is an in-memory stand-in with no
variables; with --project its variables and PVCs are read (sensitive values are masked)."""

import uuid
from pathlib import Path

import yaml
from django.core.management.base import BaseCommand, CommandError

from experiments.engines.k8s_objects import render, render_warnings
from experiments.limits import check_processes
from experiments.manifest import ManifestError, parse_manifest
from experiments.models import Experiment
from experiments.workload import build_workload
from projects.models import Engine, Project, ProjectVariable

PLACEHOLDER_ID = uuid.UUID(int=0)
PLACEHOLDER_DIGEST = "sha256:" + "0" * 64
MASKED = "<sensitive: set at submit>"


class Command(BaseCommand):
    help = "Print, as YAML, the Kubernetes objects the engine would create for a manifest."

    def add_arguments(self, parser):
        parser.add_argument("manifest", help="path of an AIchor manifest (YAML)")
        parser.add_argument("--project", help="slug of the project whose namespace, variables and PVCs to use")
        parser.add_argument("--engine", help="name of the Kubernetes engine (default: the project's default engine)")

    def handle(self, *args, manifest, project=None, engine=None, **options):
        try:
            text = Path(manifest).read_text(errors="replace")
        except OSError as exc:
            raise CommandError(f"cannot read {manifest}: {exc}") from None
        project_obj = _project(project)
        engine_obj = _engine(engine, project_obj)
        pvcs = set(project_obj.pvcs.values_list("name", flat=True)) if project_obj.pk else None
        try:
            parsed = parse_manifest(text, known_pvcs=pvcs)
            too_many = check_processes(parsed, engine_obj) if engine_obj else None
            if too_many:
                raise ManifestError([too_many])
        except ManifestError as exc:
            for error in exc.errors:
                self.stderr.write(error)
            raise CommandError(f"{manifest}: invalid manifest", returncode=2) from None

        config = dict(engine_obj.config or {}) if engine_obj else {}
        registry = (config.get("registry") or "registry.invalid").rstrip("/")
        image = f"{registry}/{project_obj.namespace}/{parsed.builder.image or 'image'}@{PLACEHOLDER_DIGEST}"
        experiment = Experiment(
            id=PLACEHOLDER_ID,
            project=project_obj,
            engine=engine_obj,
            manifest=parsed.to_dict(),
            message="k8s_render dry run",
            image=image,
        )
        workload = build_workload(experiment)
        objects = render(
            workload, namespace=project_obj.namespace, image=image, experiment_id=str(experiment.id), config=config
        )
        for obj in objects:
            if obj["kind"] == "Secret" and "stringData" in obj:
                obj["stringData"] = dict.fromkeys(obj["stringData"], MASKED)
        self.stdout.write(
            f"# k8s_render {manifest}: experiment id {PLACEHOLDER_ID} and image digest {PLACEHOLDER_DIGEST}"
            " are placeholders\n"
        )
        for warning in workload.warnings + render_warnings(workload, config):
            self.stdout.write(f"# warning: {warning}\n")
        self.stdout.write(yaml.safe_dump_all(objects, sort_keys=False, default_flow_style=False), ending="")


def _project(slug: str | None) -> Project:
    if slug:
        try:
            return Project.objects.get(slug=slug)
        except Project.DoesNotExist:
            raise CommandError(f"no project with slug {slug!r}") from None
    # In memory only: pk 0 lets the variables relation be asked, and the prefetched empty set
    # answers it without a query.
    project = Project(pk=0, name="example", slug="example", namespace="example-0000000000000000")
    project._prefetched_objects_cache = {"variables": ProjectVariable.objects.none()}
    return project


def _engine(name: str | None, project: Project) -> Engine | None:
    if name:
        try:
            engine = Engine.objects.get(name=name)
        except Engine.DoesNotExist:
            raise CommandError(f"no engine named {name!r}") from None
    elif project.pk:
        # The engine submit would use: the default one, else the project's Kubernetes engine.
        engine = project.default_engine
        if not engine or engine.kind != Engine.Kind.KUBERNETES:
            engine = project.engines.filter(kind=Engine.Kind.KUBERNETES).first()
    else:
        engine = None
    if engine and engine.kind != Engine.Kind.KUBERNETES:
        raise CommandError(f"engine {engine.name!r} is a {engine.kind} engine, not kubernetes")
    return engine
