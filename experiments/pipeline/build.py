"""Building: the image the workload runs in (or one reused with skipBuild)."""

import re
from uuid import UUID

from experiments import services
from experiments.engines import get_engine
from experiments.engines.base import Cancelled, EngineError
from experiments.logs import LogWriter
from experiments.manifest import Manifest, ManifestError
from experiments.models import Experiment, StepName
from experiments.pipeline.clone import fetch_code
from experiments.pipeline.common import Liveness, StepFailed, enter, inside, workdir_of
from experiments.queue import next_step
from projects.models import ProjectVariable


def image_tag(experiment: Experiment, manifest: Manifest) -> str:
    name = re.sub(r"[^a-z0-9._-]+", "-", (manifest.builder.image or "image").lower()).strip("-._") or "image"
    return f"aichor/{experiment.project.namespace}/{name}:{experiment.pk}"


def build_variables(experiment: Experiment) -> tuple[dict[str, str], dict[str, str]]:
    args, secrets = {}, {}
    for var in experiment.project.variables.filter(kind=ProjectVariable.Kind.BUILD):
        (secrets if var.sensitive else args)[var.name] = var.plain_value()
    return args, secrets


def run_build(experiment_id: UUID) -> None:
    experiment = enter(experiment_id, StepName.BUILDING)
    if experiment is None:
        return
    cancelled = Liveness(experiment_id)
    with LogWriter(experiment_id, f"step:{StepName.BUILDING}") as writer:
        try:
            image = _build(experiment, writer, cancelled)
        except Cancelled:
            writer.line("build cancelled")
            return
        except (StepFailed, EngineError, ManifestError) as exc:
            writer.line(str(exc))
            writer.flush()  # the reason is in the log before anyone sees Failed
            services.fail_experiment(experiment_id, f"Build failed: {str(exc).strip().splitlines()[-1]}")
            return
    if not services.record_image(experiment_id, image):
        return
    next_step("submit", experiment_id)


def _build(experiment: Experiment, writer: LogWriter, cancelled: Liveness) -> str:
    manifest = experiment.typed_manifest
    engine = get_engine(experiment.engine)
    if not engine.needs_image:
        writer.line(f"the {experiment.engine.kind} engine runs the code as it is: no image to build")
        return ""
    skip = manifest.builder.skip_build
    if skip.enabled:
        other = Experiment.objects.filter(project=experiment.project, pk=_uuid_or_none(skip.experiment_id)).first()
        if other and other.image and engine.image_exists(other.image):
            writer.line(f"skipBuild: reusing the image of experiment {other.short_id}: {other.image}")
            return other.image
        if skip.fail_if_not_found:
            raise StepFailed(f"skipBuild: no image of experiment {skip.experiment_id} to reuse")
        writer.line(f"skipBuild: no image of experiment {skip.experiment_id}; building instead")
    workdir = workdir_of(experiment.pk)
    if not workdir.exists():
        # A resumed build on another worker: fetch the code again.
        fetch_code(experiment, workdir, writer, cancelled)
    builder = manifest.builder
    context = inside(workdir, builder.context, "builder.context")
    dockerfile = inside(context, builder.dockerfile, "builder.dockerfile")
    if not dockerfile.is_file():
        raise StepFailed(f"Dockerfile {builder.dockerfile} not found in {builder.context}")
    args, secrets = build_variables(experiment)
    tag = image_tag(experiment, manifest)
    writer.line(f"building {tag}")
    return engine.build(
        context_dir=str(context),
        dockerfile=str(dockerfile.relative_to(context)),
        tag=tag,
        build_args={**args, **builder.build_args},
        target=builder.target,
        secrets=secrets,
        log=writer.write,
        cancelled=lambda: writer.flush_if_due() or cancelled(),
    )


def _uuid_or_none(value: object) -> UUID | None:
    try:
        return UUID(str(value))
    except ValueError:
        return None
