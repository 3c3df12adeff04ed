"""The terminal in a real browser: xterm.js from npm, uvicorn, a WebSocket, real containers.
The test image is busybox: its sh has $RANDOM and stty, but no tput, so the size is read with
`stty size` (what `tput lines`/`tput cols` would report)."""

import re

import pytest

from experiments import pipeline, services
from experiments.engines import get_engine
from experiments.manifest import parse_manifest
from experiments.models import Experiment
from tests.experiments.test_terminal import start_running_experiment
from tests.helpers import containers_of, manifest_yaml, wait_for

pytestmark = [pytest.mark.browser, pytest.mark.docker]

SIZE = re.compile(r"S=(\d+) (\d+)=")


def screen_text(page) -> str:
    return page.locator("#terminal-screen .xterm-rows").inner_text()


def wait_screen(page, pattern: str, timeout: float = 15) -> re.Match:
    return wait_for(
        lambda: re.search(pattern, screen_text(page)), timeout=timeout, message=f"{pattern!r} on the terminal"
    )


def type_line(page, text: str) -> None:
    page.locator("#terminal-screen .xterm-helper-textarea").press_sequentially(text)
    page.keyboard.press("Enter")


def stty_size(page, previous: tuple[int, int] | None = None) -> tuple[int, int]:
    """The size the shell sees, asked until it differs from `previous` (a resize reaches the
    shell asynchronously: the browser's resize, then the WebSocket, then the engine)."""

    def ask():
        type_line(page, "clear; echo S=$(stty size)=")
        match = wait_screen(page, SIZE.pattern)
        size = (int(match.group(1)), int(match.group(2)))
        return size if size != previous else None

    return wait_for(ask, timeout=20, interval=0.3, message="the shell to see the new size")


def open_terminal(page, live_asgi, experiment, process: str = "worker-0") -> None:
    page.goto(f"{live_asgi.url}/experiments/{experiment.pk}/")
    # xterm.js (half a megabyte) is fetched when a terminal opens, not with every page view.
    assert page.evaluate("typeof Terminal") == "undefined"
    page.select_option("#terminal-process", process)
    page.click("#terminal-open")
    page.locator("#terminal-state").get_by_text(f"Connected to {process}.").wait_for()
    wait_screen(page, r"# ")  # the shell's prompt


@pytest.fixture
def running_docker(docker_project, docker_engine, docker_client):
    experiment = start_running_experiment(docker_project, docker_engine, processes=("worker-0", "worker-1"))
    yield experiment
    get_engine(docker_engine).cleanup_experiment(str(experiment.pk))


def test_terminal_on_a_running_experiment_types_and_resizes(logged_in_page, live_asgi, running_docker, screenshot):
    page = logged_in_page
    open_terminal(page, live_asgi, running_docker, "worker-1")
    type_line(page, "echo hello-$RANDOM")
    wait_screen(page, r"hello-\d+")
    screenshot(page, "typed")

    before = stty_size(page)
    page.set_viewport_size({"width": 900, "height": 700})
    after = stty_size(page, previous=before)
    assert after[1] < before[1]  # a narrower window, fewer columns
    page.click("#terminal-fullscreen")
    full = stty_size(page, previous=after)
    assert full[0] > after[0]  # full screen, more rows
    screenshot(page, "fullscreen")

    # A full-screen program draws, takes keys, and gives the screen back.
    type_line(page, "top")
    wait_screen(page, r"PID\s+PPID\s+USER")
    screenshot(page, "top")
    page.keyboard.press("q")
    type_line(page, "clear; echo back-$((2*21))")
    wait_screen(page, r"back-42")

    # The session is in the experiment's timeline once closed.
    page.click("#terminal-fullscreen")
    page.click("#terminal-close")
    page.locator("#terminal-state").get_by_text("Session ended.").wait_for()
    wait_for(lambda: running_docker.events.filter(data__terminal="close", data__process="worker-1").exists())


def test_terminal_on_a_held_failed_experiment(
    logged_in_page,
    live_asgi,
    docker_project,  # noqa: F811
    docker_engine,
    docker_client,
    screenshot,
    request,  # noqa: F811
):
    experiment = start_running_experiment(
        docker_project, docker_engine, command="echo crash-report > /tmp/crash.txt; exit 3"
    )
    request.addfinalizer(lambda: get_engine(docker_engine).cleanup_experiment(str(experiment.pk)))
    held = manifest_yaml("exit 3", extra_spec="  debug:\n    holdOnFailure: 600\n")
    assert services.record_manifest(experiment.pk, parse_manifest(held), held)
    wait_for(
        lambda: all(s.phase == "exited" for s in get_engine(docker_engine).status(experiment.handle)),
        message="the workload to fail",
    )
    assert pipeline.watch_once(experiment.engine)  # one interval of the engine's watcher: Failed, held
    experiment = Experiment.objects.get(pk=experiment.pk)
    assert experiment.status == "Failed" and experiment.is_held

    page = logged_in_page
    open_terminal(page, live_asgi, experiment)
    assert "Held for debugging until" in page.locator("#terminal-card .hold").inner_text()
    type_line(page, "cat /tmp/crash.txt; echo size=$RANDOM")
    wait_screen(page, r"crash-report")
    wait_screen(page, r"size=\d+")
    screenshot(page, "held")

    # The worker the release needs starts only now: started with the test, it would take the
    # clone task start_running_experiment enqueues and race its steps (it assumes no worker).
    request.getfixturevalue("celery_worker_thread")
    with page.expect_navigation():  # the POST redirects back to this same page
        page.click("#terminal-card .hold button")
    page.locator("#terminal-card").wait_for(state="detached")
    wait_for(lambda: not containers_of(docker_client, experiment.pk), timeout=30, message="the held containers to go")


def test_terminal_card_appears_when_the_workload_starts(
    client, logged_in_page, live_asgi, project, git_repo, member_user, celery_worker_thread
):
    from experiments.services import cancel_experiment
    from tests.helpers import github_push, manifest_yaml

    message = "aichor[train.yaml]: long"
    sha = git_repo.commit({"aichor_manifests/train.yaml": manifest_yaml("echo started; sleep 60")}, message)
    experiment_id = github_push(client, project, sha=sha, message=message).json()["experiment"]
    page = logged_in_page
    page.goto(f"{live_asgi.url}/experiments/{experiment_id}/")
    page.evaluate("window.__not_reloaded = true")
    # Opened before Running: the card shows up on its own once the workload starts, swapped in
    # by the live update (no reload), and works like one rendered with the page.
    page.locator("#terminal-card").wait_for(timeout=60_000)
    assert page.evaluate("window.__not_reloaded") is True
    assert Experiment.objects.get(pk=experiment_id).current_step == "Running"
    page.click("#terminal-open")
    page.locator("#terminal-state").get_by_text("Connected to").wait_for()
    type_line(page, "echo oob-$((6*7))")
    wait_screen(page, r"oob-42")
    assert page.evaluate("window.__not_reloaded") is True
    cancel_experiment(Experiment.objects.get(pk=experiment_id), actor=member_user)
