"""The dashboard in Chromium against the real ASGI server and a real Celery worker (local
engine): what a researcher sees, without reloading the page."""

import contextlib
import re

import pytest
from playwright.sync_api import expect

from experiments.logs import append_log
from experiments.models import Experiment, Status
from tests.helpers import github_push, manifest_yaml, wait_for

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


@contextlib.contextmanager
def worker():
    """A Celery worker started when the test says so (the celery_worker_thread fixture starts
    at setup, too early to see an experiment wait in the queue)."""
    from celery.contrib.testing.worker import start_worker

    from aichor.celery import app

    with start_worker(app, pool="threads", concurrency=4, perform_ping_check=False, shutdown_timeout=30):
        yield


def push(client, project, git_repo, command: str, message: str = "aichor[train.yaml]: try lr 3e-4") -> Experiment:
    sha = git_repo.commit(
        {"aichor_manifests/train.yaml": manifest_yaml(command), "Dockerfile": "FROM scratch\n"}, message
    )
    response = github_push(client, project, sha=sha, message=message)
    assert response.status_code == 201, response.content
    return Experiment.objects.get(pk=response.json()["experiment"])


def test_login_then_switch_project_and_engine(page, live_asgi, member_user, project, screenshot):
    from projects.models import Engine
    from projects.services import create_project

    gpu = Engine.objects.create(name="gpu-box", kind=Engine.Kind.DOCKER)
    local = project.default_engine
    create_project(name="Audio", slug="audio", engines=[local, gpu], default_engine=local, members=[member_user])

    page.goto("/")
    expect(page).to_have_url(re.compile(r"/login/"))
    screenshot(page, "login")
    page.get_by_label("E-mail").fill("member@example.com")
    page.get_by_label("Password").fill("pw-member-123")
    page.get_by_role("button", name="Log in").click()
    # The first of the user's projects, by name, on All engines (the default filter).
    expect(page).to_have_url(re.compile(r"/p/audio/$"))
    expect(page.get_by_label("Engine", exact=True)).to_have_value("")
    page.get_by_label("Project", exact=True).select_option("vision")
    expect(page).to_have_url(re.compile(r"/p/vision/$"))
    expect(page.get_by_role("heading", name=re.compile("No experiment in Vision"))).to_be_visible()
    screenshot(page, "empty-project")

    page.get_by_label("Project", exact=True).select_option("audio")
    expect(page).to_have_url(re.compile(r"/p/audio/$"))
    # By keyboard: arrows do not navigate at every step, Enter does.
    engine_select = page.get_by_label("Engine", exact=True)
    engine_select.focus()
    page.keyboard.press("ArrowDown")  # All engines, then the engines by name: gpu-box, local
    expect(engine_select).to_have_value("gpu-box")
    expect(page).to_have_url(re.compile(r"/p/audio/$"))
    page.keyboard.press("Enter")
    expect(page).to_have_url(re.compile(r"/p/audio/\?engine=gpu-box$"))
    expect(page.get_by_role("heading", name=re.compile("Experiments"))).to_contain_text("on gpu-box")
    # Remembered: the home page and the bare project URL come back to the last choice.
    page.goto("/")
    expect(page).to_have_url(re.compile(r"/p/audio/\?engine=gpu-box$"))
    screenshot(page, "switched")


def test_webhook_experiment_goes_from_waiting_to_succeeded_live_then_logs_search_and_resubmit(
    client, logged_in_page, live_asgi, project, git_repo, screenshot
):
    page = logged_in_page
    experiment = push(
        client,
        project,
        git_repo,
        "for i in $(seq 1 300); do echo \"step $i loss 0.$i\"; done; printf '\\033[32mtraining done\\033[0m\\n'",
    )
    page.goto("/p/vision/")
    row = page.locator(f"#exp-{experiment.pk}")
    expect(row).to_contain_text("Waiting")
    expect(row).to_contain_text("Created")
    screenshot(page, "list-waiting")
    page.evaluate("window.__not_reloaded = true")

    with worker():
        expect(row).to_contain_text("Succeeded", timeout=60_000)
    assert page.evaluate("window.__not_reloaded") is True
    expect(row).to_contain_text("Completed")
    expect(page.locator("#experiment-rows")).to_have_attribute("data-active", "false")
    screenshot(page, "list-succeeded")

    row.get_by_role("link", name=experiment.short_id).focus()
    page.keyboard.press("Enter")
    expect(page.locator("#experiment-status")).to_have_text("Status: Succeeded")
    log = page.locator("#log")
    expect(log).to_contain_text("training done")
    expect(log.locator(".ansi-2", has_text="training done")).to_be_visible()
    expect(page.locator("#log-state")).to_contain_text("log complete")
    screenshot(page, "experiment-succeeded")

    page.get_by_label("Search the whole log").fill("loss 0.42")
    page.get_by_role("button", name="Search").click()
    hit = page.locator("#log-search-results button[data-line]").first
    expect(hit).to_contain_text("step 42 loss 0.42")
    hit.click()
    expect(log.locator(".line.hit")).to_contain_text("step 42 loss 0.42")
    screenshot(page, "log-search")

    page.locator("[data-show-stream='step:Cloning']").click()
    expect(log).to_contain_text("aichor_manifests/train.yaml")

    with worker():
        page.get_by_role("button", name="Resubmit").click()
        expect(page.get_by_text("Resubmission of")).to_be_visible()
        new = Experiment.objects.get(resubmitted_from=experiment)
        expect(page).to_have_url(re.compile(f"/experiments/{new.pk}/$"))
        expect(page.locator("#experiment-status")).to_have_text("Status: Succeeded", timeout=60_000)
        expect(page.locator("#log")).to_contain_text("training done")
    screenshot(page, "resubmitted")


def test_cancel_a_running_experiment(client, logged_in_page, live_asgi, project, git_repo, screenshot):
    page = logged_in_page
    with worker():
        experiment = push(client, project, git_repo, "echo started; sleep 60; echo never")
        page.goto(f"/experiments/{experiment.pk}/")
        expect(page.locator("#log")).to_contain_text("started", timeout=60_000)
        expect(page.locator("#experiment-live")).to_have_attribute("data-step", "Running")
        screenshot(page, "running")
        page.once("dialog", lambda dialog: dialog.accept())
        page.get_by_role("button", name="Cancel experiment").click()
        expect(page.locator("#experiment-status")).to_have_text("Status: Cancelled")
        expect(page.get_by_text("Cancelled by member@example.com")).to_be_visible()
        expect(page.get_by_role("button", name="Resubmit")).to_be_visible()
        wait_for(lambda: Experiment.objects.get(pk=experiment.pk).status == Status.CANCELLED, 10)
    screenshot(page, "cancelled")


def test_a_100k_line_log_opens_at_the_tail_and_loads_earlier_lines(logged_in_page, live_asgi, project, screenshot):
    from experiments import services

    experiment = services.create_experiment(project=project, message="big log", manifest_path="manifest.yaml")
    for c in range(50):
        append_log(
            experiment.pk, "process:worker-0", "".join(f"row {c * 2000 + i} \x1b[33mwarn\x1b[0m\n" for i in range(2000))
        )
    page = logged_in_page
    page.goto(f"/experiments/{experiment.pk}/?stream=process:worker-0")
    log = page.locator("#log")
    expect(log.locator(".line").last).to_contain_text("row 99999")
    assert log.locator(".line").count() == 1000
    # Scrolling up pauses following; the button resumes it at the bottom.
    log.evaluate("el => { el.scrollTop = 0; }")
    expect(page.locator("#log-follow")).to_have_text("Paused: follow")
    page.locator("#log-follow").click()
    expect(page.locator("#log-follow")).to_have_text("Following")
    assert log.evaluate("el => el.scrollHeight - el.scrollTop - el.clientHeight") < 24
    page.get_by_role("button", name="Load earlier lines").click()
    expect(log.locator(".line").first).to_contain_text("row 98000")
    expect(page.locator("#log-follow")).to_have_text("Paused: follow")
    page.get_by_label("Search the whole log").fill("row 12345 ")
    page.get_by_role("button", name="Search").click()
    page.locator("#log-search-results button[data-line='12345']").click()
    expect(log.locator(".line.hit")).to_contain_text("row 12345")
    expect(page.locator("#log-follow")).to_have_text("Back to live tail")
    page.locator("#log-follow").click()
    expect(log.locator(".line").last).to_contain_text("row 99999")
    screenshot(page, "big-log")


def test_project_details_show_the_secret_to_admins_only(admin_page, live_asgi, project, member_user, screenshot):
    page = admin_page
    page.goto("/p/vision/details/")
    expect(page.locator("#webhook-secret")).to_have_text("s3cret-webhook")
    expect(page.locator("#webhook-github")).to_contain_text("/webhooks/github/vision/")
    page.locator("button[data-copy='#webhook-secret']").click()
    expect(page.locator("button[data-copy='#webhook-secret']")).to_have_text("Copied")
    expect(page.get_by_text(project.namespace, exact=True)).to_be_visible()
    screenshot(page, "project-details")
