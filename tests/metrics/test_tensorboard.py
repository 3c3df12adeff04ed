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


def set_get(client, url: str, path: str = "", **params):
    response = client.get(f"{url}{path}", params)
    body = b"".join(response.streaming_content) if response.streaming else response.content
    return response.status_code, body


def test_project_tensorboard_shows_the_chosen_runs_to_members_only(
    client, project, backend, git_repo, member_user, outsider_user, local_engine, celery_worker_thread
):
    from experiments.services import create_experiment
    from projects.services import create_project

    first = run_workload(client, project, git_repo, steps=30)
    second = run_workload(client, project, git_repo, steps=20)
    entry = f"/p/{project.slug}/tensorboard/?e={first.pk}&e={second.pk}"
    key = "_".join(sorted([first.pk.hex, second.pk.hex]))
    url = f"/p/{project.slug}/tensorboard/{key}/"

    client.force_login(outsider_user)
    assert client.get(entry).status_code == 404
    for path in ("", "data/runs", "data/plugin/scalars/tags", "font-roboto/x.woff2"):
        assert set_get(client, url, path)[0] == 404, path
    assert client.post(f"{url}data/plugin/scalars/scalars_multirun").status_code == 404
    assert tensorboard.running() == []  # an outsider never starts one

    client.force_login(member_user)
    # Chosen in either order, the set has one URL: viewers of the same set share it.
    assert client.get(entry).headers["Location"] == url
    assert client.get(f"/p/{project.slug}/tensorboard/?e={second.pk}&e={first.pk}").headers["Location"] == url
    assert client.post(entry).status_code == 405  # a link to follow: it changes nothing
    status, page = set_get(client, url)
    assert status == 200 and b"<title>TensorBoard</title>" in page
    runs = {f"{first.short_id}/train", f"{first.short_id}/eval", f"{second.short_id}/train", f"{second.short_id}/eval"}
    wait_for(
        lambda: set(json.loads(set_get(client, url, "data/runs")[1])) == runs,
        timeout=60,
        message="TensorBoard to load both experiments",
    )
    # What the frontend posts for a chart: the loss of every run, one request.
    response = client.post(
        f"{url}data/plugin/scalars/scalars_multirun",
        {"tag": "loss", "runs": [f"{first.short_id}/train", f"{second.short_id}/train"]},
        headers={"X-XSRF-Protected": "1"},
    )
    assert response.status_code == 200
    curves = json.loads(b"".join(response.streaming_content))
    assert [p[1] for p in curves[f"{first.short_id}/train"]] == list(range(30))
    assert [p[1] for p in curves[f"{second.short_id}/train"]] == list(range(20))
    assert set_get(client, url, "data/plugin/scalars/scalars", run=f"{second.short_id}/train", tag="loss")[0] == 200
    assert tensorboard.running() == [f"{project.slug}/{key}"]  # one for the set, shared

    # A set naming another project's experiment, or one that does not exist: the same 404.
    elsewhere = create_project(name="Other", slug="other", engines=[local_engine], members=[member_user])
    foreign = create_experiment(project=elsewhere, engine=local_engine, author=member_user, manifest_path="m.yaml")
    assert client.get(f"/p/{project.slug}/tensorboard/?e={first.pk}&e={foreign.pk}").status_code == 404
    mixed = "_".join(sorted([first.pk.hex, foreign.pk.hex]))
    assert set_get(client, f"/p/{project.slug}/tensorboard/{mixed}/", "data/runs")[0] == 404
    unknown = "_".join(sorted([first.pk.hex, "0" * 32]))
    assert set_get(client, f"/p/{project.slug}/tensorboard/{unknown}/")[0] == 404
    unsorted = "_".join(sorted([first.pk.hex, second.pk.hex], reverse=True))
    assert set_get(client, f"/p/{project.slug}/tensorboard/{unsorted}/")[0] == 404
    assert tensorboard.running() == [f"{project.slug}/{key}"]


def test_a_spare_tensorboard_serves_the_first_view(
    client, project, git_repo, member_user, monkeypatch, settings, celery_worker_thread
):
    settings.AICHOR_TENSORBOARD_SPARE = True  # off for the rest of the suite (tests/conftest.py)
    experiment = run_workload(client, project, git_repo, steps=5)
    client.force_login(member_user)
    monkeypatch.setattr(tensorboard, "REFILL_SECONDS", 0.1)
    tensorboard.stop_all()
    tensorboard.prewarm()
    spare = tensorboard._spare
    assert spare is not None and spare.poll() is None
    assert get(client, experiment, "data/runs")[0] == 200
    # The spare became this experiment's TensorBoard, and another one is warming for the next view.
    assert tensorboard._instances[str(experiment.pk)].process is spare
    wait_for(lambda: tensorboard._spare not in (None, spare), message="a new spare")
    tags = wait_for(
        lambda: (
            (body := json.loads(get(client, experiment, "data/plugin/scalars/tags")[1])) and len(body) == 2 and body
        ),
        timeout=60,
        message="TensorBoard to load both runs",
    )
    assert "loss" in tags["train"]
