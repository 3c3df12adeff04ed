"""The TensorBoard tab: a real TensorBoard per experiment behind aichor's proxy, reading the
event files a real workload wrote (filesystem and S3); outsiders get 404 on every path; shared,
capped and stopped when idle."""

import json
import sys
import time
from pathlib import Path

import pytest

from experiments import logs
from experiments.models import Status
from metrics import tensorboard
from tests.experiments.test_pipeline_local import push_and_wait
from tests.helpers import wait_for

pytestmark = pytest.mark.django_db(transaction=True)

WORKLOAD = f"{sys.executable} {Path(__file__).with_name('workload.py')}"


@pytest.fixture(autouse=True)
def _stop_tensorboards():
    yield
    tensorboard.stop_all()


def get(client, experiment, path: str, **params):
    response = client.get(f"/experiments/{experiment.pk}/tensorboard/{path}", params)
    body = b"".join(response.streaming_content) if response.streaming else response.content
    return response.status_code, body


def run_workload(client, project, git_repo, steps: int = 30):
    experiment = push_and_wait(client, project, git_repo, f"{WORKLOAD} 0 {steps}")
    assert experiment.status == Status.SUCCEEDED, logs.log_text(experiment.pk, "process:worker-0")
    return experiment


def test_tensorboard_serves_the_scalars_to_members_only(
    client, project, backend, git_repo, member_user, outsider_user, celery_worker_thread
):
    experiment = run_workload(client, project, git_repo)
    client.force_login(outsider_user)
    for path in ("", "data/runs", "data/plugin/scalars/tags", "font-roboto/x.woff2"):
        assert get(client, experiment, path)[0] == 404, path
    assert (
        client.post(f"/experiments/{experiment.pk}/tensorboard/data/plugin/scalars/scalars_multirun").status_code == 404
    )
    assert tensorboard.running() == []  # an outsider never starts one

    client.force_login(member_user)
    status, page = get(client, experiment, "")
    assert status == 200 and b"<title>TensorBoard</title>" in page
    tags = wait_for(
        lambda: (
            (body := json.loads(get(client, experiment, "data/plugin/scalars/tags")[1])) and len(body) == 2 and body
        ),
        timeout=60,
        message="TensorBoard to load both runs",
    )
    assert set(tags) == {"train", "eval"} and "loss" in tags["train"] and "accuracy" in tags["eval"]
    status, body = get(client, experiment, "data/plugin/scalars/scalars", run="train", tag="loss")
    points = json.loads(body)
    assert status == 200 and [p[1] for p in points] == list(range(30))
    assert points[3][2] == pytest.approx(0.25)
    # What the frontend posts: several runs in one request (TensorBoard's own XSRF header).
    response = client.post(
        f"/experiments/{experiment.pk}/tensorboard/data/plugin/scalars/scalars_multirun",
        {"tag": "loss", "runs": ["train"]},
        headers={"X-XSRF-Protected": "1"},
    )
    assert response.status_code == 200
    assert len(json.loads(b"".join(response.streaming_content))["train"]) == 30
    assert tensorboard.running() == [str(experiment.pk)]  # one, shared by every request


def test_tensorboards_are_capped_and_stopped_when_idle(
    client, project, git_repo, member_user, settings, celery_worker_thread
):
    settings.AICHOR_TENSORBOARD_MAX = 1
    first = run_workload(client, project, git_repo, steps=3)
    second = run_workload(client, project, git_repo, steps=3)
    client.force_login(member_user)
    assert get(client, first, "data/runs")[0] == 200
    assert tensorboard.running() == [str(first.pk)]
    assert get(client, second, "data/runs")[0] == 200
    assert tensorboard.running() == [str(second.pk)]  # the cap stopped the idle one
    assert get(client, second, "data/runs")[0] == 200
    assert tensorboard.stop_idle(now=time.monotonic() + 60) == []
    assert tensorboard.stop_idle(now=time.monotonic() + tensorboard.IDLE_SECONDS + 1) == [str(second.pk)]
    assert tensorboard.running() == []
    # Started again on the next view, after the experiment has ended.
    assert get(client, second, "data/runs")[0] == 200
