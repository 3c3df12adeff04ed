"""Projects from the dashboard and named API tokens in Chromium, at 1440 px and 390 px: the New
project page, the Connect your repository panel and its test delivery, members on the project's
page, and a token shown once. Screenshots go to test-artifacts/."""

import pytest
from playwright.sync_api import expect

from experiments.models import WebhookDelivery
from projects.models import ApiToken, Project
from projects.tokens import authenticate_token
from tests.browser.conftest import login_context
from tests.browser.test_first_hour import both_widths

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


def test_organisation_admin_creates_a_project_and_sends_a_test_delivery(
    page, live_asgi, django_user_model, local_engine, git_repo, settings, screenshot
):
    # The server posts the test delivery to its public URL: here, the test's own server.
    settings.PUBLIC_URL = live_asgi.url
    boss = django_user_model.objects.create_superuser("boss@example.com", "boss@example.com", "pw-boss-123")
    login_context(page, boss, live_asgi.url)
    page.goto("/")
    page.get_by_role("link", name="New project").first.click()
    expect(page.get_by_role("heading", name="New project")).to_be_visible()
    page.get_by_label("Name").fill("Speech Lab")
    page.get_by_label("Repository URL").fill(git_repo.url)
    page.get_by_label(local_engine.name).check()
    both_widths(page, screenshot, "new-project")
    page.get_by_role("button", name="Create project").click()

    expect(page.get_by_role("heading", name="Connect your repository")).to_be_visible()
    project = Project.objects.get(slug="speech-lab")
    expect(page.locator("#webhook-github")).to_have_text(f"{live_asgi.url}/webhooks/github/speech-lab/")
    expect(page.locator("#webhook-gitlab")).to_have_text(f"{live_asgi.url}/webhooks/gitlab/speech-lab/")
    expect(page.locator("#webhook-secret")).to_have_text(project.webhook_secret)
    expect(page.get_by_text("No delivery received yet.")).to_be_visible()
    copy = page.locator('button[data-copy="#webhook-secret"]')
    copy.click()
    expect(copy).to_have_text("Copied")

    page.get_by_role("button", name="Send test delivery").click()
    expect(page.get_by_text("Test delivery arrived")).to_be_visible()
    delivery = WebhookDelivery.objects.get(project=project)
    row = page.locator("tr", has_text=delivery.delivery_id)
    expect(row).to_contain_text("github")
    expect(row).to_contain_text("started nothing")
    both_widths(page, screenshot, "connect")


def test_project_admin_adds_and_removes_a_member(page, live_asgi, admin_user, outsider_user, project, screenshot):
    login_context(page, admin_user, live_asgi.url)
    page.goto("/p/vision/details/")
    members = page.locator("ul.members")
    expect(members).not_to_contain_text("outsider@example.com")
    page.get_by_label("E-mail").fill("outsider@example.com")
    page.get_by_label("Role").select_option("member")
    page.get_by_role("button", name="Add or change member").click()
    expect(page.get_by_text("outsider@example.com is now member of Vision.")).to_be_visible()
    expect(members).to_contain_text("outsider@example.com")
    both_widths(page, screenshot, "members")

    page.get_by_role("button", name="Remove outsider@example.com").click()
    expect(page.get_by_text("outsider@example.com removed from Vision.")).to_be_visible()
    expect(members).not_to_contain_text("outsider@example.com")
    page.get_by_role("button", name="Remove admin@example.com").click()
    expect(page.get_by_text("A project must keep at least one admin")).to_be_visible()
    expect(members).to_contain_text("admin@example.com")


def test_a_named_token_is_shown_once_with_a_copy_button(logged_in_page, member_user, screenshot):
    page = logged_in_page
    page.goto("/account/tokens/")
    page.get_by_label("Name").fill("laptop")
    page.get_by_role("button", name="Create token").click()
    shown = page.locator("#new-token")
    expect(shown).to_be_visible()
    raw = shown.text_content().strip()
    assert authenticate_token(raw) == member_user
    expect(page.locator('button[data-copy="#new-token"]')).to_be_visible()
    page.get_by_label("Name").fill("CI")
    both_widths(page, screenshot, "token-once")
    page.reload()
    expect(page.locator("#new-token")).to_have_count(0)
    assert raw not in page.content()
    expect(page.get_by_role("button", name="Revoke laptop")).to_be_visible()
    assert ApiToken.objects.filter(user=member_user).count() == 1
    both_widths(page, screenshot, "tokens")
