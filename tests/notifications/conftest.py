import pytest

from tests.notifications.fakes import FakeGitHub, FakeGitLab, Receiver

TOKEN = "github_pat_11ABCDEFG0123456789_tokenEnding9z7Q"
GITLAB_TOKEN = "glpat-0123456789abcdefWXYZ"


@pytest.fixture
def fast_retries(settings):
    """Backoff in tenths of seconds, with room for a host that stays down for a while."""
    settings.NOTIFY_RETRY_BASE_SECONDS = 0.1
    settings.NOTIFY_RETRY_MAX_SECONDS = 0.5
    settings.NOTIFY_MAX_ATTEMPTS = 40
    settings.NOTIFY_HTTP_TIMEOUT_SECONDS = 5.0


@pytest.fixture
def github():
    """The fake GitHub API for the `project` fixture's repository (https://github.com/acme/vision)."""
    fake = FakeGitHub(TOKEN, "acme/vision")
    yield fake
    fake.close()


@pytest.fixture
def gitlab():
    fake = FakeGitLab(GITLAB_TOKEN, "acme/ml/vision")
    yield fake
    fake.close()


@pytest.fixture
def receiver():
    fake = Receiver()
    yield fake
    fake.close()


@pytest.fixture
def github_statuses(project, github):
    """The project posts commit statuses to the fake GitHub (kind and repository from its URLs)."""
    from notifications.services import save_git_host

    return save_git_host(project, kind="", api_url=github.url, repository="", token=TOKEN)
