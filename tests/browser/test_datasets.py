"""The Datasets tab in Chromium (filesystem backend): create a folder, navigate, upload with the
progress bar, preview, download, delete."""

import os

import pytest

from datasets import services

pytestmark = pytest.mark.browser


def test_upload_navigate_preview_download_delete(logged_in_page, live_asgi, project, settings, screenshot, tmp_path):
    settings.AICHOR_STORAGE = "filesystem"
    settings.AICHOR_UPLOAD_PART_MB = 5
    services.ensure_buckets(project)
    page = logged_in_page
    big = tmp_path / "weights.bin"
    big.write_bytes(os.urandom(23 * 1024 * 1024))
    table = tmp_path / "scores.csv"
    table.write_text("name,score\nada,3\nbob,4\n")

    page.goto("/p/vision/datasets/")
    page.get_by_label("New folder").fill("data")
    page.get_by_role("button", name="Create folder").click()
    page.locator("#browser .ds-crumbs a[aria-current]", has_text="data").wait_for()
    page.get_by_role("link", name="inputs").first.click()
    page.get_by_role("link", name="data/", exact=True).click()
    page.locator("#browser[data-prefix='data/']").wait_for()

    # Every progress value the bar shows is recorded, to see it move rather than jump to done.
    page.evaluate(
        """() => { window.percents = [];
        new MutationObserver((ms) => ms.forEach((m) => window.percents.push(+m.target.dataset.percent)))
          .observe(document.getElementById('ds-upload-list'), {subtree: true, attributeFilter: ['data-percent']}); }"""
    )
    page.get_by_label("Upload files into the folder shown above").set_input_files([str(big), str(table)])
    page.get_by_role("button", name="Upload", exact=True).click()
    page.locator(".ds-upload-item.done[data-key='data/weights.bin']").wait_for()
    page.locator(".ds-upload-item.done[data-key='data/scores.csv']").wait_for()
    screenshot(page, "uploaded")
    percents = page.evaluate("window.percents")
    assert any(0 < p < 100 for p in percents), percents
    assert percents[-1] == 100
    assert page.locator(".ds-upload-item[data-key='data/weights.bin'] progress").evaluate("p => p.value === p.max")
    row = page.locator("#browser tr[data-key='data/weights.bin']")
    row.wait_for()
    assert "23.0\xa0MB" in row.inner_text()  # Django shows binary units

    page.get_by_role("link", name="scores.csv").click()
    page.locator("#preview table.ds-csv td", has_text="ada").wait_for()
    screenshot(page, "preview")

    with page.expect_download() as info:
        page.locator("#browser tr[data-key='data/scores.csv']").get_by_role("link", name="Download").click()
    assert open(info.value.path()).read() == "name,score\nada,3\nbob,4\n"

    page.once("dialog", lambda dialog: dialog.accept())
    page.get_by_role("button", name="Delete scores.csv").click()
    page.locator("#browser tr[data-key='data/scores.csv']").wait_for(state="detached")
    assert [e.name for e in services.list_objects(project.inputs_bucket, "data/").entries] == ["weights.bin"]

    page.get_by_role("link", name="inputs").first.click()
    page.once("dialog", lambda dialog: dialog.accept())
    page.get_by_role("button", name="Delete data").click()
    page.locator("#browser tr[data-key='data/']").wait_for(state="detached")
    screenshot(page, "emptied")
    assert services.list_objects(project.inputs_bucket).entries == []


def test_refused_name_shows_a_clear_message(logged_in_page, live_asgi, project, settings, console_errors):
    settings.AICHOR_STORAGE = "filesystem"
    services.ensure_buckets(project)
    page = logged_in_page
    page.goto("/p/vision/datasets/?bucket=inputs&prefix=../")
    assert "not allowed" in page.locator(".ds-error").inner_text()
    # The page answers 400 on purpose; Chromium logs every 4xx as a console error.
    console_errors.errors[:] = [e for e in console_errors.errors if "400 (Bad Request)" not in e]


def test_workload_link_shows_as_a_link_and_deletes_alone(logged_in_page, live_asgi, project, settings, tmp_path):
    settings.AICHOR_STORAGE = "filesystem"
    services.ensure_buckets(project)
    target = tmp_path / "host-secret.txt"
    target.write_text("not for the dashboard\n")
    run = services.bucket_root(project.outputs_bucket) / "output" / "run1"
    run.mkdir(parents=True)
    os.symlink("/", run / "hostroot")  # as `ln -s / $AICHOR_OUTPUT_PATH/hostroot` leaves it
    os.symlink(target, run / "x.txt")
    page = logged_in_page

    page.goto("/p/vision/datasets/?bucket=outputs&prefix=output/run1/")
    row = page.locator("#browser tr[data-key='output/run1/hostroot']")
    assert "link, not followed" in row.inner_text()
    assert row.get_by_role("link").count() == 0  # neither a folder to open nor a file to download
    assert page.locator("#browser tr[data-key='output/run1/x.txt']").get_by_role("link").count() == 0

    page.once("dialog", lambda dialog: dialog.accept())
    page.get_by_role("button", name="Delete x.txt").click()
    page.locator("#browser tr[data-key='output/run1/x.txt']").wait_for(state="detached")
    assert target.read_text() == "not for the dashboard\n"
    assert [e.name for e in services.list_objects(project.outputs_bucket, "output/run1/").entries] == ["hostroot"]
