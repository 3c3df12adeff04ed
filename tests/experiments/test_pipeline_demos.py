"""AIchor's public demos in shape, on the single-host engines: a builder context with relative
paths, a shared volume between processes, jobset completions held to `parallelisms`. The
repositories are made here, in the demos' layout (issue 14)."""

import threading
import time

import pytest

from experiments import logs
from experiments.engines.docker import VOLUME_LABEL
from experiments.models import Status, StepName
from tests.helpers import DOCKERFILE, containers_of, ended, github_push, manifest_yaml, wait_for

pytestmark = pytest.mark.django_db(transaction=True)

RES = "      resources:\n        cpus: 1\n        ramRatio: 1\n"
SHARED = "  storage:\n    sharedVolume:\n      mountPoint: /mnt/shared\n      sizeGB: 1\n"
# Completion 0 of the job writes into the shared volume, completion 1 (run after it: one at a
# time) reads it back.
WRITE_THEN_READ = (
    'if [ "$JOB_COMPLETION_INDEX" = 0 ]; then echo "written by $JOB_COMPLETION_INDEX" > "$AICHOR_SHARED_VOLUME_PATH/note";'
    ' else echo "read: $(cat "$AICHOR_SHARED_VOLUME_PATH/note")"; fi'
)
ONE_AT_A_TIME = f"    pair:\n      count: 1\n      completions: 2\n      parallelisms: 1\n{RES}"
PARALLEL = f"    workers:\n      count: 2\n      completions: 6\n      parallelisms: 2\n{RES}"


def run(client, project, git_repo, files: dict[str, str], timeout: float = 180):
    message = "aichor[train.yaml]: demo"
    sha = git_repo.commit(files, message)
    response = github_push(client, project, sha=sha, message=message)
    assert response.status_code == 201, response.content
    return ended(response.json()["experiment"], timeout=timeout)


def completions(experiment, job_count: int, completions_per_job: int) -> dict[str, list[int]]:
    """JOB_COMPLETION_INDEX as each completion's process printed it, by job."""
    seen: dict[str, list[int]] = {}
    for job in range(job_count):
        for completion in range(completions_per_job):
            output = logs.log_text(experiment.pk, f"process:workers-{job}-{completion}")
            fields = dict(part.split("=", 1) for part in output.split() if "=" in part)
            seen.setdefault(fields["job"], []).append(int(fields["index"]))
    return {job: sorted(indexes) for job, indexes in seen.items()}


def most_at_once(spans: list[tuple[float, float]]) -> int:
    edges = sorted([(start, 1) for start, _ in spans] + [(end, -1) for _, end in spans])
    running = peak = 0
    for _, step in edges:  # an end sorts before a start at the same instant
        running += step
        peak = max(peak, running)
    return peak


# --- local engine ------------------------------------------------------------------------
def test_local_engine_runs_from_the_builder_context(client, project, git_repo, celery_worker_thread):
    manifest = manifest_yaml("python3 src/main.py && cat ../top.txt", operator="batch").replace(
        "  context: .\n", "  context: ./sub\n"
    )
    files = {
        "aichor_manifests/train.yaml": manifest,
        "top.txt": "beside the context\n",
        "sub/Dockerfile": "FROM scratch\n",
        "sub/src/main.py": "import os\nprint('main from', os.path.basename(os.getcwd()))\n",
    }
    experiment = run(client, project, git_repo, files)
    output = logs.log_text(experiment.pk, "process:worker-0")
    assert experiment.status == Status.SUCCEEDED, (experiment.failure_reason, output)
    assert "main from sub" in output
    assert "beside the context" in output


def test_local_shared_volume_is_written_by_one_process_and_read_by_another(
    client, project, git_repo, celery_worker_thread
):
    manifest = manifest_yaml(WRITE_THEN_READ, operator="jobset", types=ONE_AT_A_TIME, extra_spec=SHARED)
    experiment = run(client, project, git_repo, {"aichor_manifests/train.yaml": manifest, "Dockerfile": DOCKERFILE})
    assert experiment.status == Status.SUCCEEDED, experiment.failure_reason
    assert logs.log_text(experiment.pk, "process:pair-0-1").strip() == "read: written by 0"
    submitting = logs.log_text(experiment.pk, f"step:{StepName.SUBMITTING}")
    assert "warning: sharedVolume: the local engine mounts nothing" in submitting


def test_local_parallelisms_hold_completions_back(client, project, git_repo, celery_worker_thread):
    # Each completion stamps its start and end (GNU date on the server's host).
    command = (
        'echo "job=$JOB_INDEX index=$JOB_COMPLETION_INDEX start=$(date +%s.%N)"; sleep 0.6; echo "end=$(date +%s.%N)"'
    )
    manifest = manifest_yaml(command, operator="jobset", types=PARALLEL)
    experiment = run(client, project, git_repo, {"aichor_manifests/train.yaml": manifest, "Dockerfile": DOCKERFILE})
    assert experiment.status == Status.SUCCEEDED, experiment.failure_reason
    assert completions(experiment, 2, 6) == {"0": list(range(6)), "1": list(range(6))}
    for job in range(2):
        spans = []
        for completion in range(6):
            fields = dict(
                part.split("=", 1)
                for part in logs.log_text(experiment.pk, f"process:workers-{job}-{completion}").split()
                if "=" in part
            )
            spans.append((float(fields["start"]), float(fields["end"])))
        assert most_at_once(spans) == 2, spans
    running = logs.log_text(experiment.pk, f"step:{StepName.RUNNING}")
    assert "completed " in running and "/12)" in running


# --- docker engine -----------------------------------------------------------------------
class ProcessEvents:
    """Start and die times of each process container of an experiment, as the daemon saw them."""

    def __init__(self, client) -> None:
        self.events: list[tuple[str, str, str, float]] = []  # experiment, process, action, time
        self._stream = client.events(
            since=int(time.time()) - 1,
            decode=True,
            filters={"type": "container", "label": "aichor.process", "event": ["start", "die"]},
        )
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for event in self._stream:
                attributes = event.get("Actor", {}).get("Attributes", {})
                self.events.append(
                    (
                        attributes.get("aichor.experiment", ""),
                        attributes.get("aichor.process", ""),
                        event.get("Action", ""),
                        event["timeNano"] / 1e9,
                    )
                )
        except Exception:  # the stream closed under the reader: the test is over
            pass

    def spans(self, experiment_id, prefix: str) -> list[tuple[float, float]]:
        starts, ends = {}, {}
        for experiment, process, action, at in list(self.events):
            if experiment == str(experiment_id) and process.startswith(prefix):
                (starts if action == "start" else ends)[process] = at
        return [(starts[name], ends[name]) for name in starts]

    def close(self) -> None:
        self._stream.close()


@pytest.mark.docker
def test_docker_parallelisms_hold_completions_back(
    client, docker_project, git_repo, docker_client, celery_worker_thread
):
    events = ProcessEvents(docker_client)
    try:
        command = 'echo "job=$JOB_INDEX index=$JOB_COMPLETION_INDEX"; sleep 1'
        manifest = manifest_yaml(command, operator="jobset", types=PARALLEL)
        experiment = run(
            client, docker_project, git_repo, {"aichor_manifests/train.yaml": manifest, "Dockerfile": DOCKERFILE}
        )
        assert experiment.status == Status.SUCCEEDED, experiment.failure_reason
        assert completions(experiment, 2, 6) == {"0": list(range(6)), "1": list(range(6))}
        for job in range(2):
            spans = wait_for(
                lambda job=job: len(s := events.spans(experiment.pk, f"workers-{job}-")) == 6 and s,
                timeout=30,
                message="every completion's start and end",
            )
            assert most_at_once(spans) == 2, spans
    finally:
        events.close()
    running = logs.log_text(experiment.pk, f"step:{StepName.RUNNING}")
    assert "completed " in running and "/12)" in running


@pytest.mark.docker
def test_docker_shared_volume_is_written_by_one_process_and_read_by_another(
    client, docker_project, git_repo, docker_client, celery_worker_thread
):
    command = WRITE_THEN_READ + '; echo "at $AICHOR_SHARED_VOLUME_PATH"; ls /mnt/shared'
    manifest = manifest_yaml(command, operator="jobset", types=ONE_AT_A_TIME, extra_spec=SHARED)
    experiment = run(
        client, docker_project, git_repo, {"aichor_manifests/train.yaml": manifest, "Dockerfile": DOCKERFILE}
    )
    assert experiment.status == Status.SUCCEEDED, experiment.failure_reason
    output = logs.log_text(experiment.pk, "process:pair-0-1")
    assert "read: written by 0" in output and "at /mnt/shared" in output
    submitting = logs.log_text(experiment.pk, f"step:{StepName.SUBMITTING}")
    assert "warning: a Docker volume has no size: sharedVolume.sizeGB ignored" in submitting
    wait_for(lambda: containers_of(docker_client, experiment.pk) == [], timeout=30, message="containers removed")
    # Cleanup removes the volume once the containers are gone: a moment after the check above.
    wait_for(
        lambda: not docker_client.api.volumes(filters={"label": f"{VOLUME_LABEL}={experiment.pk}"})["Volumes"],
        timeout=30,
        message="the shared volume removed with its experiment",
    )
