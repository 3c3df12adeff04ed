"""Browser fixtures: the real ASGI application (HTTP and WebSockets) served by uvicorn, and
Chromium driven by Playwright.

The server runs in a thread of the test process, not a subprocess, on purpose:
- it shares the test database (PostgreSQL, or SQLite's shared-cache in-memory database),
- it shares the in-memory Celery broker, so a webhook or a Cancel clicked in the browser reaches
  the `celery_worker_thread` worker of the same test.
The server lives for the whole session; tests that use it must run with a transactional database (`live_asgi` requests `transactional_db`; pytest-django reserves the name live_server).

Use:  def test_x(logged_in_page, live_asgi, screenshot): ...
      logged_in_page.goto(live_asgi.url + "/p/vision/"); screenshot(logged_in_page, "list")
"""

import os
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.helpers import settle_live_server, unavailable

CHROMIUM = os.environ.get("AICHOR_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"

# Playwright's sync API keeps an event loop in the main thread, which makes Django believe the
# ORM is called from async code. The tests only use the ORM for setup and assertions.
os.environ.setdefault("DJANGO_ALLOW_ASYNC_UNSAFE", "true")


@dataclass
class LiveServer:
    url: str
    ws_url: str


@pytest.fixture
def live_asgi(asgi_server_url, transactional_db):
    """The dashboard over real HTTP + WebSockets, seeing this test's committed data."""
    yield LiveServer(url=asgi_server_url, ws_url=asgi_server_url.replace("http://", "ws://", 1))
    # Torn down after the browser page and before the database flush (which needs it settled).
    settle_live_server()


@pytest.fixture(scope="session")
def _playwright():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        unavailable("playwright is not installed")
    if not Path(CHROMIUM).exists():
        unavailable(f"no Chromium at {CHROMIUM}")
    with sync_playwright() as pw:
        yield pw


@pytest.fixture(scope="session")
def browser(_playwright):
    browser = _playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
    yield browser
    browser.close()


@dataclass
class ConsoleLog:
    errors: list[str] = field(default_factory=list)


@pytest.fixture
def console_errors() -> ConsoleLog:
    return ConsoleLog()


@pytest.fixture
def page(browser, live_asgi, console_errors):
    """A fresh browser context (no cookies) whose JS errors fail the test."""
    context = browser.new_context(viewport={"width": 1366, "height": 800}, base_url=live_asgi.url)
    context.set_default_timeout(15_000)
    page = context.new_page()
    page.on("pageerror", lambda exc: console_errors.errors.append(f"pageerror: {exc}"))
    page.on(
        "console",
        lambda msg: console_errors.errors.append(f"console.{msg.type}: {msg.text}") if msg.type == "error" else None,
    )
    yield page
    context.close()
    assert not console_errors.errors, "JavaScript errors in the browser:\n" + "\n".join(console_errors.errors)


def login_context(page, user, base_url: str) -> None:
    """Log `user` in without the form: a server-side session whose cookie goes to the browser."""
    from django.conf import settings
    from django.test import Client

    client = Client()
    client.force_login(user)
    cookie = client.cookies[settings.SESSION_COOKIE_NAME]
    page.context.add_cookies([{"name": settings.SESSION_COOKIE_NAME, "value": cookie.value, "url": base_url}])


@pytest.fixture
def logged_in_page(page, live_asgi, member_user, project):
    """`page` logged in as member@example.com, a member of the "vision" project."""
    login_context(page, member_user, live_asgi.url)
    return page


@pytest.fixture
def admin_page(page, live_asgi, admin_user, project):
    login_context(page, admin_user, live_asgi.url)
    return page


@pytest.fixture
def screenshot(request):
    """screenshot(page, "name") saves test-artifacts/<test>-<name>.png and returns its path."""

    def take(page, name: str) -> Path:
        ARTIFACTS.mkdir(exist_ok=True)
        path = ARTIFACTS / f"{request.node.name}-{name}.png"
        page.screenshot(path=str(path), full_page=True)
        return path

    return take
