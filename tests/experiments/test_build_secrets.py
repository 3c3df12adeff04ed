"""Build secrets on the Docker engine (SPEC §7): sensitive build-time variables reach the build as
one secret `_env` (a .env file) through buildah, and nowhere else: not in a layer, the history,
the logs or the database."""

import io
import os
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest
from django.core.management import call_command

from experiments import logs
from experiments.engines.base import Cancelled
from experiments.engines.docker import DockerEngine
from experiments.models import Experiment, Status
from experiments.services import cancel_experiment
from projects.services import set_variable
from tests.helpers import TEST_IMAGE, ended, push, unavailable, wait_for

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.docker]

MOUNT = "--mount=type=secret,id=_env,dst=/etc/secrets/.env"


@pytest.fixture
def buildah():
    if not shutil.which("buildah"):
        unavailable("buildah is not installed (apt-get install buildah)")


def processes_running(marker: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and marker.encode() in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue  # exited meanwhile
    return found


def test_sensitive_build_variable_is_mounted_as_env_secret_and_stored_nowhere(
    client, docker_project, git_repo, docker_client, buildah, celery_worker_thread
):
    secret = f"s3cr3t-value-{uuid.uuid4().hex}"
    plain = f"plain-value-{uuid.uuid4().hex}"
    set_variable(docker_project, name="API_TOKEN", kind="build", value=secret, sensitive=True)
    set_variable(docker_project, name="PLAIN_ARG", kind="build", value=plain, sensitive=False)
    dockerfile = (
        f"FROM {TEST_IMAGE}\n"
        "ARG PLAIN_ARG\n"
        f"RUN {MOUNT} grep -c API_TOKEN /etc/secrets/.env > /count && cat /count\n"
        # A careless Dockerfile printing the secret: the build log must still not show it.
        f"RUN {MOUNT} cat /etc/secrets/.env\n"
        'RUN echo "$PLAIN_ARG" > /plain\n'
    )
    command = "cat /count /plain; test -e /etc/secrets/.env && echo secret-file-left || echo no-secret-file"
    experiment = ended(push(client, docker_project, git_repo, command, dockerfile=dockerfile))
    assert experiment.status == Status.SUCCEEDED, experiment.failure_reason

    output = logs.log_text(experiment.pk, "process:worker-0").split()
    assert output == ["1", plain, "no-secret-file"]
    build_log = logs.log_text(experiment.pk, "step:Building")
    assert "buildah" in build_log
    assert 'API_TOKEN="******"' in build_log  # printed, then masked

    history = subprocess.run(
        ["docker", "history", "--no-trunc", experiment.image], check=True, capture_output=True, text=True
    ).stdout
    assert "--mount=type=secret,id=_env" in history
    assert secret not in history
    saved = b"".join(docker_client.images.get(experiment.image).save())
    assert plain.encode() in saved  # the layers are searched uncompressed: a leak would show
    assert secret.encode() not in saved

    for chunk in logs.LogChunk.objects.all():
        assert secret not in chunk.text, chunk.stream
    dump = io.StringIO()
    call_command("dumpdata", stdout=dump)
    assert secret not in dump.getvalue()
    assert "API_TOKEN" in dump.getvalue()  # the variable is there, encrypted
    # The private .env file given to buildah is gone.
    leftovers = Path(tempfile.gettempdir()).glob("aichor-secrets-*")
    assert not [p for p in leftovers if secret in p.read_text(errors="replace")]


def test_build_without_secrets_keeps_the_classic_builder(
    client, docker_project, git_repo, docker_client, celery_worker_thread
):
    plain = f"plain-value-{uuid.uuid4().hex}"
    set_variable(docker_project, name="PLAIN_ARG", kind="build", value=plain, sensitive=False)
    dockerfile = f'FROM {TEST_IMAGE}\nARG PLAIN_ARG\nRUN echo "$PLAIN_ARG" > /plain\n'
    experiment = ended(push(client, docker_project, git_repo, "cat /plain", dockerfile=dockerfile))
    assert experiment.status == Status.SUCCEEDED, experiment.failure_reason
    assert logs.log_text(experiment.pk, "process:worker-0").strip() == plain
    build_log = logs.log_text(experiment.pk, "step:Building")
    assert "Step 1/" in build_log
    assert "buildah" not in build_log


def test_failing_secret_build_fails_at_building_with_buildah_output(
    client, docker_project, git_repo, docker_client, buildah, celery_worker_thread
):
    set_variable(docker_project, name="API_TOKEN", kind="build", value="tok", sensitive=True)
    dockerfile = f"FROM {TEST_IMAGE}\nRUN {MOUNT} grep -q NOT_THERE /etc/secrets/.env\n"
    experiment = ended(push(client, docker_project, git_repo, "true", dockerfile=dockerfile))
    assert experiment.status == Status.FAILED
    assert "Build failed" in experiment.failure_reason
    assert "grep -q NOT_THERE" in logs.log_text(experiment.pk, "step:Building")


def test_cancel_while_building_with_secrets_stops_buildah(
    client, docker_project, git_repo, docker_client, member_user, buildah, celery_worker_thread
):
    set_variable(docker_project, name="API_TOKEN", kind="build", value="tok", sensitive=True)
    marker = f"building-{uuid.uuid4().hex}"
    # The marker after the sleep keeps the shell (and the marker in its command line) alive.
    dockerfile = f"FROM {TEST_IMAGE}\nRUN {MOUNT} sleep 120 && echo {marker}\n"
    experiment_id = push(client, docker_project, git_repo, "echo never", dockerfile=dockerfile)
    wait_for(lambda: processes_running(marker), timeout=60, message="the build to run")
    cancel_experiment(Experiment.objects.get(pk=experiment_id), actor=member_user)
    wait_for(lambda: not processes_running(marker), timeout=30, message="the build to stop")
    experiment = ended(experiment_id, timeout=30)
    assert experiment.status == Status.CANCELLED
    assert not experiment.image


def test_multi_stage_secret_build_with_target(docker_client, buildah, tmp_path):
    """Engine level: stages are not mistaken for base images, --target picks the stage, and a
    value with quotes survives the .env escaping."""
    (tmp_path / "Dockerfile").write_text(
        f"FROM {TEST_IMAGE} AS base\n"
        f'RUN {MOUNT} grep -cF \'QUOTED="a \\"b\\" c"\' /etc/secrets/.env > /quoted\n'
        "FROM base AS final\n"
        "COPY --from=base /quoted /copied\n"
        "FROM final AS unused\n"
        "RUN exit 9\n"
    )
    tag = f"aichor-test/secret-stages:{uuid.uuid4().hex[:12]}"
    lines: list[str] = []
    try:
        DockerEngine({"network": "none"}).build(
            context_dir=str(tmp_path),
            dockerfile="Dockerfile",
            tag=tag,
            build_args={},
            target="final",
            secrets={"QUOTED": 'a "b" c'},
            log=lines.append,
            cancelled=lambda: False,
        )
        out = docker_client.containers.run(tag, ["cat", "/copied"], remove=True)
        assert out.strip() == b"1", "".join(lines)
    finally:
        docker_client.images.remove(tag, force=True)


def test_cancelled_before_build_raises_and_leaves_no_secret_file(docker_client, buildah, tmp_path):
    (tmp_path / "Dockerfile").write_text(f"FROM {TEST_IMAGE}\nRUN {MOUNT} sleep 60\n")
    before = set(os.listdir(tempfile.gettempdir()))
    with pytest.raises(Cancelled):
        DockerEngine({"network": "none"}).build(
            context_dir=str(tmp_path),
            dockerfile="Dockerfile",
            tag=f"aichor-test/secret-cancel:{uuid.uuid4().hex[:12]}",
            build_args={},
            target=None,
            secrets={"API_TOKEN": "tok"},
            log=lambda _: None,
            cancelled=lambda: True,
        )
    created = set(os.listdir(tempfile.gettempdir())) - before
    assert not [n for n in created if n.startswith(("aichor-secrets-", "aichor-iid-"))]


def test_secret_build_uses_the_docker_engines_current_base_image(docker_client, buildah, tmp_path):
    """buildah gets its base images from the Docker Engine, and a base image replaced there (same
    tag, new content) is the one the next build starts from, not a stale copy."""
    base = f"aichor-test/secret-base:{uuid.uuid4().hex[:12]}"
    tag = f"aichor-test/secret-derived:{uuid.uuid4().hex[:12]}"
    (tmp_path / "Dockerfile").write_text(f"FROM {base}\nRUN {MOUNT} cat /version > /seen\n")
    try:
        for version in ("v1", "v2"):
            docker_client.images.build(
                fileobj=io.BytesIO(f"FROM {TEST_IMAGE}\nRUN echo {version} > /version\n".encode()), tag=base, rm=True
            )
            DockerEngine({"network": "none"}).build(
                context_dir=str(tmp_path),
                dockerfile="Dockerfile",
                tag=tag,
                build_args={},
                target=None,
                secrets={"API_TOKEN": "tok"},
                log=lambda _: None,
                cancelled=lambda: False,
            )
            assert docker_client.containers.run(tag, ["cat", "/seen"], remove=True).strip() == version.encode()
    finally:
        for image in (tag, base):
            docker_client.images.remove(image, force=True)
        # buildah's copy of this test's base image (and the layers built on it) is of no further use.
        subprocess.run(["buildah", "rmi", "--force", base], capture_output=True)
