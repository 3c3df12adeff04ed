"""Metric series from real workloads on the local engine: `AICHOR_METRIC` lines printed to
stdout, and TensorBoard event files (filesystem and S3), read through the API, live while the
workload runs; outsiders get 404."""

import sys
from pathlib import Path

import pytest

from experiments import logs
from experiments.models import Experiment, Status
from metrics import parse
from tests.experiments.test_pipeline_local import push_and_wait
from tests.helpers import github_push, manifest_yaml, wait_for

pytestmark = pytest.mark.django_db(transaction=True)

WORKLOAD = f"{sys.executable} {Path(__file__).with_name('workload.py')}"


def metrics(client, user, experiment_id, **params):
    client.force_login(user)
    response = client.get(f"/api/v1/experiments/{experiment_id}/metrics", params)
    assert response.status_code == 200, response.content
    return {s["name"]: s for s in response.json()["series"]}, response.json()


def test_metric_lines_become_series(client, project, git_repo, member_user, outsider_user, celery_worker_thread):
    command = (
        'echo starting; for i in 0 1 2 3 4; do echo "AICHOR_METRIC loss=0.$((9 - i)) acc=0.$i step=$((i * 10))"; done; '
        "echo 'AICHOR_METRIC lr=0.001'; echo 'AICHOR_METRIC lr=0.0005'; echo 'AICHOR_METRIC broken=abc step=1'"
    )
    experiment = push_and_wait(client, project, git_repo, command)
    assert experiment.status == Status.SUCCEEDED, experiment.failure_reason

    series, body = metrics(client, member_user, experiment.pk)
    assert set(series) == {"loss", "acc", "lr"}
    loss = series["loss"]
    assert loss["steps"] == [0, 10, 20, 30, 40]
    assert loss["values"] == [0.9, 0.8, 0.7, 0.6, 0.5]
    assert (loss["last_value"], loss["best_value"], loss["source"]) == (0.5, 0.5, "stdout")
    assert series["acc"]["best_value"] == 0.4  # higher is better for accuracy
    assert series["lr"]["steps"] == [0, 1]  # no step given: the next one
    assert body["is_terminal"] is True

    # Polling with the cursor: nothing changed since, nothing sent (beyond the overlap window).
    _, later = metrics(client, member_user, experiment.pk, since=body["cursor"])
    assert later["cursor"] >= body["cursor"]

    client.force_login(outsider_user)
    assert client.get(f"/api/v1/experiments/{experiment.pk}/metrics").status_code == 404
    assert client.post(f"/api/v1/experiments/{experiment.pk}/metrics").status_code == 405


def test_tensorboard_event_files_become_series(client, project, backend, git_repo, member_user, celery_worker_thread):
    experiment = push_and_wait(client, project, git_repo, f"{WORKLOAD} 0 30")
    assert experiment.status == Status.SUCCEEDED, logs.log_text(experiment.pk, "process:worker-0")

    series, _ = metrics(client, member_user, experiment.pk)
    assert set(series) == {"train/loss", "eval/accuracy"}
    loss, accuracy = series["train/loss"], series["eval/accuracy"]
    assert loss["steps"] == list(range(30)) and loss["source"] == "tensorboard"
    assert loss["values"][3] == pytest.approx(0.25)
    assert accuracy["last_value"] == pytest.approx(0.29) and accuracy["best_value"] == pytest.approx(0.29)
    # Read again: the offsets are kept, nothing is counted twice.
    series, _ = metrics(client, member_user, experiment.pk)
    assert series["train/loss"]["count"] == 30


def test_series_grow_while_the_workload_runs(client, project, git_repo, member_user, tmp_path, celery_worker_thread):
    flag = tmp_path / "go-on"
    message = "aichor[train.yaml]: live"
    sha = git_repo.commit(
        {
            "aichor_manifests/train.yaml": manifest_yaml(
                f"for i in 0 1 2; do echo AICHOR_METRIC reward=$i; done; {WORKLOAD} 0 20 {flag}"
            ),
            "Dockerfile": "FROM scratch\n",
        },
        message,
    )
    experiment_id = github_push(client, project, sha=sha, message=message).json()["experiment"]

    def seen(name, count):
        series, body = metrics(client, member_user, experiment_id)
        return body if name in series and series[name]["count"] == count else None

    first = wait_for(lambda: seen("train/loss", 20), timeout=60, message="the first event file points")
    assert first["is_terminal"] is False
    assert wait_for(lambda: seen("reward", 3), message="the printed points").get("is_terminal") is False
    flag.touch()
    wait_for(lambda: seen("train/loss", 40), timeout=60, message="the points written after the flag")
    experiment = wait_for(
        lambda: Experiment.objects.filter(pk=experiment_id, status=Status.SUCCEEDED).first(), message="the end"
    )
    series, _ = metrics(client, member_user, experiment.pk)
    assert series["train/loss"]["steps"] == list(range(40))


def test_records_wait_for_a_whole_record():
    import io

    from tensorboard.summary.writer.record_writer import RecordWriter

    buffer = io.BytesIO()
    writer = RecordWriter(buffer)
    for payload in (b"first", b"second"):
        writer.write(payload)
    data = buffer.getvalue()
    assert parse.records(data) == ([b"first", b"second"], len(data))
    assert parse.records(data[:-3]) == ([b"first"], len(data) - 3 - (12 + 6 + 1))


def test_downsampling_keeps_spikes_and_bounds_points():
    steps = list(range(100_000))
    values = [0.0] * 100_000
    values[54_321] = 9.0
    out_steps, out_values = parse.downsample(steps, values, 1000)
    assert len(out_steps) <= 1000 and 9.0 in out_values and 54_321 in out_steps
    assert out_steps == sorted(out_steps)


def test_an_event_file_swapped_for_a_folder_since_the_listing_is_skipped(client, project, member_user, monkeypatch):
    """The workload owns its TensorBoard folder: an event file it replaced by a folder between the
    listing and the read leaves the other files' series and the chart API answering."""
    from tensorboard.summary.writer.event_file_writer import EventFileWriter

    from datasets.services import ensure_buckets
    from datasets.storage import bucket_root
    from experiments.services import create_experiment
    from metrics import services
    from tests.metrics.workload import scalar

    ensure_buckets(project)
    experiment = create_experiment(project=project, message="aichor[t.yaml]: x", manifest_path="t.yaml")
    bucket, folder = services.tensorboard_location(experiment)
    writer = EventFileWriter(str(bucket_root(bucket) / folder / "train"))
    for step in range(3):
        writer.add_event(scalar("loss", 1.0 / (step + 1), step))
    writer.close()
    listing = services.event_files(bucket, folder)
    swapped = bucket_root(bucket) / folder / "eval" / "events.out.tfevents.1"
    swapped.mkdir(parents=True)  # listed as a file a moment ago
    monkeypatch.setattr(services, "event_files", lambda *_: [("eval/events.out.tfevents.1", 500), *listing])

    series, _ = metrics(client, member_user, experiment.pk)
    assert series["train/loss"]["steps"] == [0, 1, 2]
