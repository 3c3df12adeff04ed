"""Issue 15's dashboard points in Chromium, at a laptop's 1440 px and a phone's 390 px: the
engine filter, the New experiment page, the experiments table on a phone, labelled chips, the
log pane, the forms, the Datasets page and the error pages. Screenshots go to test-artifacts/."""

import re

import pytest
from playwright.sync_api import expect

from experiments import services
from experiments.logs import append_log
from experiments.models import Experiment, StepName
from projects.models import Engine
from tests.helpers import manifest_yaml

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

LAPTOP = {"width": 1440, "height": 900}
PHONE = {"width": 390, "height": 844}


def both_widths(page, screenshot, name: str) -> None:
    for label, size in (("1440", LAPTOP), ("390", PHONE)):
        page.set_viewport_size(size)
        screenshot(page, f"{name}-{label}")
        # Nothing may push the page sideways: the layout fits the window at both widths.
        width = page.evaluate("document.documentElement.scrollWidth")
        assert width <= size["width"], f"{name} is {width} px wide at {size['width']} px"
    page.set_viewport_size(LAPTOP)


def answered(console_errors, status: int) -> None:
    """Chromium logs every 4xx page as a console error: drop the one this test asked for."""
    expected = f"status of {status} "
    console_errors.errors[:] = [e for e in console_errors.errors if expected not in e]


def experiment_on(project, engine=None, message="aichor[train.yaml]: try lr 3e-4", **kwargs) -> Experiment:
    return services.create_experiment(
        project=project,
        engine=engine,
        commit_sha="a" * 40,
        branch="main",
        author_name="researcher",
        message=message,
        manifest_path="aichor_manifests/train.yaml",
        **kwargs,
    )


def test_engine_filter_all_by_default_hint_and_opening_an_experiment_keeps_it(
    logged_in_page, live_asgi, project, screenshot
):
    page = logged_in_page
    gpu = Engine.objects.create(name="gpu-docker", kind=Engine.Kind.DOCKER)
    project.engines.add(gpu)
    on_local = experiment_on(project, message="baseline on the laptop engine")
    on_gpu = experiment_on(project, gpu, message="a much longer run with a long message on the gpu engine")

    page.goto("/p/vision/")
    engine = page.get_by_label("Engine", exact=True)
    expect(engine).to_have_value("")
    expect(engine.locator("option:checked")).to_have_text("All engines")
    expect(page.locator(f"#exp-{on_local.pk} td.engine")).to_have_text("local")
    expect(page.locator(f"#exp-{on_gpu.pk} td.engine")).to_have_text("gpu-docker")
    both_widths(page, screenshot, "all-engines")

    engine.select_option("local")
    expect(page).to_have_url(re.compile(r"/p/vision/\?engine=local$"))
    expect(page.locator(f"#exp-{on_gpu.pk}")).to_have_count(0)
    hint = page.locator("#elsewhere")
    expect(hint).to_contain_text("1 run on other engines")
    both_widths(page, screenshot, "one-engine")

    # Opening the other engine's experiment leaves the filter alone.
    page.goto(f"/experiments/{on_gpu.pk}/")
    expect(page.get_by_label("Engine", exact=True)).to_have_value("local")
    page.get_by_role("link", name="Vision experiments").click()
    expect(page).to_have_url(re.compile(r"/p/vision/\?engine=local$"))

    hint.get_by_role("link", name="show all engines").click()
    expect(page).to_have_url(re.compile(r"/p/vision/\?engine=$"))
    expect(page.locator(f"#exp-{on_gpu.pk}")).to_be_visible()
    expect(page.get_by_label("Engine", exact=True)).to_have_value("")


def test_new_experiment_from_the_dashboard(logged_in_page, live_asgi, project, git_repo, screenshot, console_errors):
    page = logged_in_page
    head = git_repo.commit(
        {"aichor_manifests/train.yaml": manifest_yaml("python train.py"), "aichor_manifests/eval.yaml": "kind: x\n"},
        "add manifests",
    )
    git_repo._git("checkout", "-q", "-b", "dev")
    git_repo.commit({"aichor_manifests/sweep.yaml": "kind: x\n"}, "dev only", branch="dev")
    git_repo._git("checkout", "-q", "main")

    page.goto("/p/vision/")
    page.get_by_role("link", name="New experiment").click()
    expect(page).to_have_url(re.compile(r"/p/vision/new/$"))
    expect(page.get_by_label("Branch")).to_have_value("main")
    manifest = page.get_by_label("Manifest")
    expect(manifest.locator("option")).to_have_text(["aichor_manifests/eval.yaml", "aichor_manifests/train.yaml"])
    both_widths(page, screenshot, "new-experiment")

    # Another branch lists its own manifests.
    page.get_by_label("Branch").select_option("dev")
    expect(page.get_by_label("Manifest").locator("option")).to_have_count(3)
    page.get_by_label("Branch").select_option("main")
    expect(page.get_by_label("Manifest").locator("option")).to_have_count(2)

    # An unknown commit is refused in words, on the same page, keeping what was typed.
    page.get_by_label("Commit").fill("deadbeef")
    page.get_by_label("Manifest").select_option("aichor_manifests/train.yaml")
    page.get_by_label("Message").fill("first run from the dashboard")
    page.get_by_role("button", name="Start experiment").click()
    expect(page.get_by_role("alert").filter(has_text="commit deadbeef not found on branch main")).to_be_visible()
    answered(console_errors, 400)
    expect(page.get_by_label("Message")).to_have_value("first run from the dashboard")
    both_widths(page, screenshot, "new-experiment-unknown-commit")
    assert not Experiment.objects.exists()

    page.get_by_label("Commit").fill("")
    page.get_by_role("button", name="Start experiment").click()
    expect(page).to_have_url(re.compile(r"/experiments/[0-9a-f-]{36}/$"))
    experiment = Experiment.objects.get()
    assert (experiment.commit_sha, experiment.manifest_path) == (head, "aichor_manifests/train.yaml")
    expect(page.get_by_role("heading", level=1)).to_contain_text("first run from the dashboard")


def test_experiment_page_chips_short_log_and_short_id(logged_in_page, live_asgi, project, screenshot):
    page = logged_in_page
    experiment = experiment_on(project)
    services.begin_step(experiment.pk, StepName.CLONING)
    append_log(experiment.pk, "step:Cloning", "$ git fetch\nfetched\n")
    services.cancel_experiment(experiment)

    page.goto(f"/experiments/{experiment.short_id}/")
    expect(page).to_have_url(re.compile(rf"/experiments/{experiment.pk}/$"))
    expect(page.locator("#experiment-status")).to_have_text("Status: Cancelled")
    step = page.locator('.exp-status [data-chip="step"]')
    expect(step).to_have_text("Step: Cloning")
    expect(step).to_have_class(re.compile("badge-cancelled"))
    page.locator('[data-show-stream="step:Cloning"]').click()
    expect(page.locator("#log")).to_contain_text("fetched")
    # Two lines of log: the pane is about their height, not a 32rem black box.
    assert page.locator("#log").bounding_box()["height"] < 120
    both_widths(page, screenshot, "experiment-cancelled")

    page.goto("/p/vision/")
    expect(page.locator(f'#exp-{experiment.pk} [data-chip="status"]')).to_have_text("Status: Cancelled")
    expect(page.locator(f'#exp-{experiment.pk} [data-chip="step"]')).to_have_text("Step: Cloning")

    # Resubmit on another engine: the original's is preselected.
    project.engines.add(Engine.objects.create(name="gpu-docker", kind=Engine.Kind.DOCKER))
    page.goto(f"/experiments/{experiment.pk}/")
    chooser = page.get_by_label("on engine")
    expect(chooser).to_have_value("local")
    chooser.select_option("gpu-docker")
    both_widths(page, screenshot, "resubmit-engine")
    page.get_by_role("button", name="Resubmit").click()
    expect(page).not_to_have_url(re.compile(str(experiment.pk)))
    new = Experiment.objects.get(resubmitted_from=experiment)
    expect(page).to_have_url(re.compile(rf"/experiments/{new.pk}/$"))
    assert new.engine.name == "gpu-docker"


def test_experiments_table_at_390px(logged_in_page, live_asgi, project, screenshot):
    page = logged_in_page
    page.set_viewport_size(PHONE)
    for i in range(4):
        experiment_on(project, message=f"aichor[train.yaml]: sweep lr {i}e-4 with warmup and a cosine schedule")
    page.goto("/p/vision/")
    table = page.locator("table.experiments")
    expect(table).to_be_visible()
    assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
    box = table.bounding_box()
    assert box["x"] >= 0 and box["x"] + box["width"] <= PHONE["width"]
    # The columns that matter stay; the message wraps instead of being cut to nothing, with
    # the engine under it.
    for name in ("ID", "Message", "Status"):
        expect(table.get_by_role("columnheader", name=name, exact=True)).to_be_visible()
    for name in ("Engine", "Memory", "Duration"):
        expect(table.get_by_role("columnheader", name=name, exact=True)).to_be_hidden()
    message = table.locator("td.message").first
    expect(message).to_contain_text("cosine schedule")
    expect(message.locator(".phone-meta")).to_have_text("local")
    expect(table.locator('[data-chip="status"]').first).to_be_visible()
    screenshot(page, "table-390")


def test_forms_datasets_and_error_pages(logged_in_page, live_asgi, project, screenshot, console_errors):
    page = logged_in_page
    page.goto("/p/vision/variables/")
    check = page.get_by_label("Sensitive")
    label_box = page.locator("label.check").bounding_box()
    help_box = page.locator(".field-checkbox .helptext").bounding_box()
    assert check.bounding_box()["y"] < help_box["y"] and label_box["y"] + label_box["height"] <= help_box["y"] + 1
    both_widths(page, screenshot, "variables")

    page.goto("/account/tokens/")
    both_widths(page, screenshot, "tokens")

    page.goto("/p/vision/datasets/?bucket=inputs")
    expect(page.locator(".ds-empty")).to_contain_text("experiments read this bucket at $AICHOR_INPUT_PATH")
    page.get_by_role("button", name="Upload", exact=True).click()
    expect(page.locator("#ds-upload-message")).to_have_text("No file chosen: choose one or more files, then Upload.")
    main_width = page.locator("main").bounding_box()["width"]
    assert page.locator(".datasets").bounding_box()["width"] >= main_width - 60
    page.get_by_label("New folder").fill("images")
    page.get_by_role("button", name="Create folder").click()
    page.get_by_role("link", name="↑ up").click()
    expect(page.locator("a.ds-folder svg.ds-icon")).to_be_visible()
    both_widths(page, screenshot, "datasets")

    page.goto("/experiments/d9977b02/")
    expect(page.get_by_role("heading", name="Not found")).to_be_visible()
    expect(page.locator("header.topbar")).to_be_visible()
    answered(console_errors, 404)
    both_widths(page, screenshot, "not-found")
