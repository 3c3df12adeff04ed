"""The metrics in Chromium: the experiment page's Metrics card (charts with the latest and best
values, new points arriving while the workload runs, without reloading; outsiders get 404), the
TensorBoard tab, and a comparison chosen in the experiments table."""

import re

import pytest
from playwright.sync_api import expect

from experiments.models import Experiment, Status
from tests.helpers import github_push, manifest_yaml, wait_for
from tests.metrics.test_compare import two_runs  # noqa: F401 (a fixture)

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

POINTS = (
    "awk -v a={a} -v b={b} 'BEGIN {{ for (i = a; i < b; i++) "
    'printf "AICHOR_METRIC loss=%.6f accuracy=%.6f step=%d\\n", 2 / (i + 2), 1 - 1 / (i + 1.5), i }}\''
)


def test_charts_show_series_and_update_live(
    logged_in_page, live_asgi, client, project, git_repo, outsider_user, tmp_path, screenshot, celery_worker_thread
):
    flag = tmp_path / "go-on"
    command = f"{POINTS.format(a=0, b=200)}; while [ ! -f {flag} ]; do sleep 0.1; done; {POINTS.format(a=200, b=400)}"
    message = "aichor[train.yaml]: charts"
    sha = git_repo.commit(
        {"aichor_manifests/train.yaml": manifest_yaml(command), "Dockerfile": "FROM scratch\n"}, message
    )
    experiment_id = github_push(client, project, sha=sha, message=message).json()["experiment"]
    wait_for(
        lambda: Experiment.objects.filter(pk=experiment_id, metric_series__count=200).count() == 2,
        message="the first points stored",
    )

    page = logged_in_page
    page.goto(f"/experiments/{experiment_id}/")
    card = page.locator("#metrics")
    loss = card.locator('.metric-card[data-series="loss"]')
    expect(loss.locator("canvas")).to_be_visible()
    expect(card.locator('.metric-card[data-series="accuracy"] canvas')).to_be_visible()
    expect(card.locator("#metrics-empty")).to_be_hidden()
    expect(loss.locator("dd").nth(0)).to_have_text("0.00995")  # latest: 2 / 201, printed with 6 decimals
    expect(loss.locator("dd").nth(2)).to_have_text("200")
    expect(card.locator("#metrics-state")).to_have_text("updating live")
    screenshot(page, "running")

    flag.touch()
    # The same page, not reloaded: the poll brings the new points.
    expect(loss.locator("dd").nth(2)).to_have_text("400", timeout=30_000)
    expect(loss.locator("dd").nth(1)).to_have_text("0.004988")  # best of a loss: its smallest, 2 / 401
    wait_for(lambda: Experiment.objects.filter(pk=experiment_id, status=Status.SUCCEEDED).exists(), message="the end")
    expect(card.locator("#metrics-state")).to_have_text("", timeout=15_000)  # polling stopped
    screenshot(page, "ended")

    client.force_login(outsider_user)
    assert client.get(f"/experiments/{experiment_id}/").status_code == 404


def test_tensorboard_tab_shows_the_scalars(
    logged_in_page, live_asgi, client, project, git_repo, screenshot, celery_worker_thread
):
    import sys
    from pathlib import Path

    from metrics import tensorboard
    from tests.experiments.test_pipeline_local import push_and_wait

    workload = f"{sys.executable} {Path(__file__).parents[1] / 'metrics' / 'workload.py'} 0 50"
    experiment = push_and_wait(client, project, git_repo, workload)
    assert experiment.status == Status.SUCCEEDED
    page = logged_in_page
    try:
        page.goto(f"/experiments/{experiment.pk}/")
        with page.expect_popup() as popup:
            page.get_by_role("link", name="Open TensorBoard").click()
        board = popup.value
        # The Time Series dashboard: one card per tag, each with both runs' legend.
        expect(board.get_by_text("loss", exact=True).first).to_be_visible(timeout=30_000)
        expect(board.get_by_text("accuracy", exact=True).first).to_be_visible()
        board.wait_for_load_state("networkidle")
        screenshot(board, "tensorboard")
    finally:
        tensorboard.stop_all()


def test_comparison_page_overlays_the_curves(logged_in_page, live_asgi, project, two_runs, screenshot):  # noqa: F811
    first, second = two_runs
    page = logged_in_page
    # Chosen in the experiments table: ticks, then Compare (enabled from two runs).
    page.goto(f"/p/{project.slug}/")
    compare = page.get_by_role("button", name="Compare")
    expect(compare).to_be_disabled()
    page.get_by_label(f"Compare {first.short_id}").check()
    expect(compare).to_be_disabled()
    page.get_by_label(f"Compare {second.short_id}").check()
    compare.click()
    expect(page).to_have_url(re.compile(rf"/p/{project.slug}/compare/\?e="))
    assert {first.short_id, second.short_id} <= set(re.findall(r"[0-9a-f]{8}", page.url))
    chart = page.locator('#compare-grid .metric-card[data-series="loss"]')
    expect(chart.locator("canvas")).to_be_visible()
    # uPlot's legend names each run drawn on the chart.
    expect(chart.locator(".u-legend")).to_contain_text(first.short_id)
    expect(chart.locator(".u-legend")).to_contain_text(second.short_id)
    expect(page.locator("#compare-manifests tr.differs", has_text="spec.env.LR")).to_be_visible()
    screenshot(page, "compare")


def test_project_tensorboard_over_two_runs(
    logged_in_page, live_asgi, client, project, git_repo, outsider_user, screenshot, celery_worker_thread
):
    import sys
    from pathlib import Path

    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect

    from metrics import tensorboard
    from tests.experiments.test_pipeline_local import push_and_wait

    workload = f"{sys.executable} {Path(__file__).parents[1] / 'metrics' / 'workload.py'}"
    first = push_and_wait(client, project, git_repo, f"{workload} 0 50")
    second = push_and_wait(client, project, git_repo, f"{workload} 0 25")
    assert first.status == second.status == Status.SUCCEEDED
    page = logged_in_page
    try:
        page.goto(f"/p/{project.slug}/compare/?e={first.pk}&e={second.pk}")
        with page.expect_popup() as popup:
            page.get_by_role("link", name="Open TensorBoard over these runs").click()
        board = popup.value
        key = "_".join(sorted([first.pk.hex, second.pk.hex]))
        expect(board).to_have_url(re.compile(rf"/p/{project.slug}/tensorboard/{key}/"))
        # Both experiments' runs, grouped under their short ids, in TensorBoard's run selector.
        for e in (first, second):
            expect(board.get_by_text(f"{e.short_id}/train").first).to_be_visible(timeout=60_000)
        expect(board.get_by_text("loss", exact=True).first).to_be_visible()
        board.wait_for_load_state("networkidle")
        screenshot(board, "project-tensorboard")

        # Outsiders: 404 on the page and its data, and no WebSocket is served under it.
        client.force_login(outsider_user)
        for path in ("", "data/runs"):
            assert client.get(f"/p/{project.slug}/tensorboard/{key}/{path}").status_code == 404
        with pytest.raises(InvalidStatus):
            connect(f"{live_asgi.ws_url}/p/{project.slug}/tensorboard/{key}/", open_timeout=10).close()
    finally:
        tensorboard.stop_all()
