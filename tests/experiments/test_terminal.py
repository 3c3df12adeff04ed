"""The terminal consumer against real containers, through the whole ASGI stack (origin check,
session cookie, routing), driven by channels' WebsocketCommunicator."""

import asyncio
import hashlib
import json
import re
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from asgiref.testing import ApplicationCommunicator
from channels.testing import WebsocketCommunicator
from django.conf import settings
from django.test import Client

from experiments import services, terminal
from experiments.engines import get_engine
from experiments.manifest import parse_manifest
from experiments.models import Event, Experiment, Status, StepName
from experiments.pipeline import reconcile
from experiments.workload import build_workload
from tests.helpers import TEST_IMAGE, containers_of, github_push, manifest_yaml, wait_for

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.docker]


# --- helpers shared with tests/browser/test_terminal.py and test_portforward.py -------------
def start_running_experiment(
    project, engine_model, processes=("worker-0",), command="sleep 600", *, commands=None, image=TEST_IMAGE
) -> Experiment:
    """An experiment in Running whose processes (worker-0, worker-1...) are real, submitted as
    the pipeline does: its workload built from a manifest, moved there through the services the
    pipeline uses (no Celery: the clone task it enqueues finds no worker). `commands` gives each
    process its own command."""
    commands = commands or {name: command for name in processes}
    assert list(commands) == [f"worker-{rank}" for rank in range(len(commands))]
    script = next(iter(commands.values()))
    if len(set(commands.values())) > 1:
        script = 'case "$RANK" in ' + " ".join(f"{rank}) {c};;" for rank, c in enumerate(commands.values())) + " esac"
    types = f"    worker:\n      count: {len(commands)}\n      resources:\n        cpus: 1\n        ramRatio: 1\n"
    manifest = parse_manifest(manifest_yaml(script, operator="pytorch", types=types))
    experiment = services.create_experiment(project=project, engine=engine_model, manifest_path="m.yaml")
    for step in (StepName.CLONING, StepName.BUILDING, StepName.SUBMITTING):
        assert services.begin_step(experiment.pk, step)
    # What Cloning and Building record.
    Experiment.objects.filter(pk=experiment.pk).update(manifest=manifest.to_dict(), image=image)
    engine = get_engine(engine_model)
    workload = build_workload(Experiment.objects.get(pk=experiment.pk), path_of=engine.volume_path)
    handle = engine.submit(workload, log=lambda _: None)
    assert services.record_submission(experiment.pk, handle, None, {})
    assert services.begin_step(experiment.pk, StepName.RUNNING)
    return Experiment.objects.get(pk=experiment.pk)


def target_of(experiment: Experiment, process: str) -> str:
    return next(p.target for p in get_engine(experiment.engine).processes(experiment.handle) if p.name == process)


@pytest.fixture
def running(docker_project, docker_engine, docker_client):
    experiment = start_running_experiment(docker_project, docker_engine, processes=("worker-0", "worker-1"))
    yield experiment
    get_engine(docker_engine).cleanup_experiment(str(experiment.pk))


def run(scenario):
    """Run an async scenario on an event loop of its own thread: the browser tests' Playwright
    keeps a loop in the main thread, where asgiref's async_to_sync refuses to start."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, scenario()).result()


def session_cookie(user) -> str:
    client = Client()
    client.force_login(user)
    return client.cookies[settings.SESSION_COOKIE_NAME].value


def communicator(experiment_id, user=None, process: str = "", origin: bytes = b"http://testserver", resume: str = ""):
    from aichor.asgi import application

    headers = [(b"origin", origin), (b"host", b"testserver")]
    if user is not None:
        # The login writes a session row: ORM work, so off the event loop the tests run in.
        with ThreadPoolExecutor(1) as pool:
            cookie = pool.submit(session_cookie, user).result()
        headers.append((b"cookie", f"{settings.SESSION_COOKIE_NAME}={cookie}".encode()))
    query = f"?process={process}" if process else ""
    if resume:
        query += f"&resume={resume}"
    return WebsocketCommunicator(application, f"/ws/experiments/{experiment_id}/terminal/{query}", headers=headers)


async def read_until(comm, pattern: bytes, timeout: float = 15) -> bytes:
    """Output until `pattern` (a regex) shows up; fails on close or timeout with what came."""
    seen = b""
    deadline = time.monotonic() + timeout
    while not re.search(pattern, seen):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"no {pattern!r} in terminal output: {seen!r}")
        try:
            message = await comm.receive_output(timeout=remaining)
        except TimeoutError:
            raise AssertionError(f"no {pattern!r} in terminal output: {seen!r}") from None
        if message["type"] == "websocket.close":
            raise AssertionError(f"closed with {message.get('code')} before {pattern!r}; output: {seen!r}")
        seen += message.get("bytes") or (message.get("text") or "").encode()
    return seen


async def read_close(comm, timeout: float = 15) -> tuple[dict, bytes]:
    """Output up to the close frame, and the close frame."""
    seen = b""
    deadline = time.monotonic() + timeout
    while True:
        message = await comm.receive_output(timeout=max(0.01, deadline - time.monotonic()))
        if message["type"] == "websocket.close":
            return message, seen
        seen += message.get("bytes") or (message.get("text") or "").encode()


async def open_terminal(experiment_id, user, process: str = "", resume: str = ""):
    comm = communicator(experiment_id, user, process, resume=resume)
    connected, _ = await comm.connect()
    assert connected
    return comm


# --- tests ----------------------------------------------------------------------------------
def test_typed_command_output_arrives_and_session_is_recorded(running, member_user):
    async def scenario():
        comm = await open_terminal(running.pk, member_user, "worker-1")
        await comm.send_to(bytes_data=b"echo out-$((6*7)) $AICHOR_EXPERIMENT_ID\n")
        out = await read_until(comm, rb"out-42 " + str(running.pk).encode())
        # UTF-8 both ways, as text frames too.
        await comm.send_to(text_data="echo 'héllo ✓'\n")
        out += await read_until(comm, "héllo ✓\r\n".encode())
        await comm.disconnect()
        return out

    run(scenario)
    events = wait_for(
        lambda: (
            list(Event.objects.filter(experiment=running, data__terminal="close"))
            and list(Event.objects.filter(experiment=running, data__terminal__isnull=False).order_by("created_at"))
        ),
        message="the close event",
    )
    opened, closed = events
    assert opened.actor == closed.actor == member_user
    assert opened.data["process"] == closed.data["process"] == "worker-1"
    assert "opened a terminal on worker-1" in opened.reason
    assert closed.data["session"] == opened.data["session"]
    assert closed.data["seconds"] >= 0
    assert "member@example.com closed the terminal on worker-1 after" in closed.reason


def test_resize_changes_stty_size(running, member_user):
    async def scenario():
        comm = await open_terminal(running.pk, member_user)
        await comm.send_to(text_data=json.dumps({"type": "resize", "rows": 33, "cols": 101}))
        await comm.send_to(bytes_data=b"stty size\n")
        await read_until(comm, rb"\n33 101\r\n")
        await comm.send_to(text_data=json.dumps({"type": "resize", "rows": 50, "cols": 140}))
        await comm.send_to(bytes_data=b"stty size\n")
        await read_until(comm, rb"\n50 140\r\n")
        await comm.send_to(bytes_data=b"exit\n")
        message, output = await read_close(comm)
        assert message["code"] == 1000 and b"the shell exited" in output

    run(scenario)


def test_a_large_paste_arrives_whole(running, member_user):
    # Far more than a socket buffer holds: what does not fit at once must follow, in order.
    size = 300_000
    paste = bytes(b"abcdefghij"[i % 10] for i in range(size))

    async def scenario():
        comm = await open_terminal(running.pk, member_user)
        await read_until(comm, rb"# ")
        # A raw TTY first: a line-editing one holds at most 4 KiB of an unfinished line.
        command = f"stty raw -echo; echo raw-$((6*7)); head -c {size} > /tmp/paste; stty sane; md5sum /tmp/paste\n"
        await comm.send_to(bytes_data=command.encode())
        await read_until(comm, rb"raw-42")
        await comm.send_to(bytes_data=paste)
        return await read_until(comm, rb"[0-9a-f]{32}")

    output = run(scenario)
    assert hashlib.md5(paste).hexdigest().encode() in output


def test_ctrl_c_interrupts_the_foreground_program(running, member_user, docker_client):
    container = docker_client.containers.get(target_of(running, "worker-0"))

    def sleeping() -> bool:
        return any("sleep 31" in " ".join(p) for p in container.top()["Processes"])

    async def scenario():
        comm = await open_terminal(running.pk, member_user)
        await comm.send_to(bytes_data=b"sleep 31; echo not-interrupted\n")
        await asyncio.to_thread(wait_for, sleeping, 10, message="sleep to run in the terminal")
        await comm.send_to(bytes_data=b"\x03")
        await comm.send_to(bytes_data=b"echo after-$((1+1))\n")
        out = await read_until(comm, rb"after-2")
        assert b"\nnot-interrupted" not in out  # typed, echoed, never printed
        await comm.disconnect()

    run(scenario)


def test_outsider_anonymous_and_bad_origin_are_refused(running, outsider_user, member_user):
    async def refused(comm):
        connected, _ = await comm.connect()
        if not connected:
            return "handshake refused"
        message, output = await read_close(comm)
        assert output == b""  # nothing of the container leaks before the refusal
        return message["code"]

    async def scenario():
        assert await refused(communicator(running.pk, outsider_user)) == 4404
        assert await refused(communicator(running.pk, None)) == 4401
        assert await refused(communicator(running.pk, member_user, "master-0")) == 4400
        # Origin is checked before anything else: a page elsewhere cannot ride the cookie.
        assert await refused(communicator(running.pk, member_user, origin=b"http://evil.example")) == (
            "handshake refused"
        )

    run(scenario)
    assert not Event.objects.filter(experiment=running, data__terminal="open").exists()


def test_experiment_not_running_is_refused(docker_project, member_user):
    experiment = services.create_experiment(project=docker_project, manifest_path="m.yaml")

    async def scenario():
        connected, _ = await (comm := communicator(experiment.pk, member_user)).connect()
        assert connected
        message, _ = await read_close(comm)
        return message

    assert run(scenario)["code"] == 4409
    services.finish_experiment(experiment.pk, Status.SUCCEEDED)
    assert run(scenario)["code"] == 4409


def test_stopping_the_experiment_tells_the_terminal_and_closes_it(running, member_user, settings):
    settings.TERMINAL_STATE_POLL_SECONDS = 0.2

    async def scenario():
        comm = await open_terminal(running.pk, member_user)
        await comm.send_to(bytes_data=b"echo ready-$((2+2))\n")
        await read_until(comm, rb"ready-4")
        await asyncio.to_thread(services.cancel_experiment, running, actor=None)
        message, output = await read_close(comm)
        return message, output

    message, output = run(scenario)
    assert message["code"] == 1000
    assert b"the experiment stopped (Cancelled)" in output
    closed = wait_for(lambda: Event.objects.filter(experiment=running, data__terminal="close").first())
    assert "stopped" in closed.data["reason"]


def test_deadline_and_idle_timeout_are_enforced(running, member_user, settings):
    settings.TERMINAL_MAX_SECONDS = 1.5
    settings.TERMINAL_IDLE_SECONDS = 60

    async def session():
        comm = await open_terminal(running.pk, member_user)
        started = time.monotonic()
        # Busy typing does not extend the hard deadline.
        for _ in range(4):
            await comm.send_to(bytes_data=b"true\n")
            await asyncio.sleep(0.2)
        message, output = await read_close(comm, timeout=10)
        return message, output, time.monotonic() - started

    message, output, elapsed = run(session)
    assert message["code"] == 4410
    assert b"session time limit of 1s reached" in output
    assert elapsed < 4

    settings.TERMINAL_MAX_SECONDS = 60
    settings.TERMINAL_IDLE_SECONDS = 0.5
    message, output, _ = run(session)
    assert message["code"] == 4408
    assert b"idle for 0s: session closed" in output


def test_per_user_session_cap(running, member_user, admin_user, settings):
    settings.TERMINAL_MAX_SESSIONS_PER_USER = 1

    async def scenario():
        first = await open_terminal(running.pk, member_user)
        second = communicator(running.pk, member_user)
        await second.connect()
        refused, _ = await read_close(second)
        # Another user has a cap of their own.
        other = await open_terminal(running.pk, admin_user)
        await other.send_to(bytes_data=b"echo admin-$((3*3))\n")
        await read_until(other, rb"admin-9")
        await first.disconnect()
        await other.disconnect()
        return refused

    assert run(scenario)["code"] == 4429
    wait_for(lambda: Event.objects.filter(experiment=running, data__terminal="close").count() == 2)

    async def again():
        comm = await open_terminal(running.pk, member_user)
        await comm.send_to(bytes_data=b"echo again-$((5*5))\n")
        await read_until(comm, rb"again-25")
        await comm.disconnect()

    run(again)  # a closed session frees its slot


def test_dropped_connection_reattaches_to_the_same_shell(running, member_user, settings):
    settings.TERMINAL_REATTACH_SECONDS = 1.0
    token = "t0ken-" + "a" * 20

    async def scenario():
        comm = await open_terminal(running.pk, member_user, "worker-0", resume=token)
        await comm.send_to(bytes_data=b"MARK=kept-$((6*7)); cd /tmp\n")
        await read_until(comm, rb"/tmp # ")
        await comm.disconnect(code=1006)  # the network dropped: no close on purpose
        # Output while away is kept for the return.
        again = await open_terminal(running.pk, member_user, "worker-0", resume=token)
        await again.send_to(bytes_data=b"echo mark=$MARK in $(pwd)\n")
        out = await read_until(again, rb"mark=kept-42 in /tmp")
        # Another token (another page) gets a shell of its own.
        other = await open_terminal(running.pk, member_user, "worker-0", resume="b" * 32)
        await other.send_to(bytes_data=b"echo mark=[$MARK]\n")
        await read_until(other, rb"mark=\[\]")
        await other.disconnect()
        # A shell parked and never reclaimed is closed after the window, and recorded.
        await again.disconnect(code=1006)
        closed = Event.objects.filter(experiment=running, data__terminal="close")
        # The server's event loop must live on for the window to pass: wait inside it.
        await asyncio.to_thread(wait_for, lambda: closed.count() == 2, 15, message="both sessions closed")
        return out

    run(scenario)
    events = list(Event.objects.filter(experiment=running, data__terminal="close").order_by("created_at"))
    opened = Event.objects.filter(experiment=running, data__terminal="open")
    assert opened.count() == 2  # the re-attach was no new session
    assert events[-1].data["reason"] == "the browser went away"


def test_a_server_that_stops_records_the_shells_it_parked(running, member_user, settings):
    # uvicorn closes the connections first (1012: the terminal parks its shell for a reconnect),
    # then runs the lifespan shutdown: the shell is closed and its session recorded at once,
    # not lost with the process nor left for the reattach window.
    from aichor.asgi import application

    settings.TERMINAL_REATTACH_SECONDS = 600

    async def scenario():
        comm = await open_terminal(running.pk, member_user, "worker-0", resume="p" * 24)
        await comm.send_to(bytes_data=b"echo parked-$((3*3))\n")
        await read_until(comm, rb"parked-9")
        await comm.disconnect(code=1012)
        assert terminal._PARKED
        server = ApplicationCommunicator(application, {"type": "lifespan"})
        await server.send_input({"type": "lifespan.startup"})
        assert (await server.receive_output(5))["type"] == "lifespan.startup.complete"
        await server.send_input({"type": "lifespan.shutdown"})
        assert (await server.receive_output(15))["type"] == "lifespan.shutdown.complete"
        assert not terminal._PARKED

    run(scenario)
    closed = Event.objects.get(experiment=running, data__terminal="close")
    assert closed.data["reason"] == "the server stopped"


@pytest.mark.django_db(transaction=True)
def test_local_engine_terminal_reads_through_a_thread(project, local_engine, member_user):
    # The local engine's PTY has no pollable descriptor in the session interface: the consumer
    # falls back to a reader thread, the path a Kubernetes exec stream would take too.
    experiment = start_running_experiment(project, local_engine)
    try:

        async def scenario():
            comm = await open_terminal(experiment.pk, member_user)
            await comm.send_to(text_data=json.dumps({"type": "resize", "rows": 21, "cols": 77}))
            await comm.send_to(bytes_data=b"echo local-$((4*4)) $(stty size)\n")
            await read_until(comm, rb"local-16 21 77")
            await comm.disconnect()

        run(scenario)
    finally:
        get_engine(local_engine).cleanup_experiment(str(experiment.pk))


def test_release_hold_endpoint_is_for_members_and_posts_only(client, running, outsider_user, member_user):
    services.finish_experiment(running.pk, Status.FAILED, reason="worker-0 exited with code 1", exit_code=1)
    assert services.hold_for_debugging(running.pk, 600)
    url = f"/experiments/{running.pk}/release-hold/"
    client.force_login(outsider_user)
    assert client.post(url).status_code == 404
    client.force_login(member_user)
    assert client.get(url).status_code == 405
    assert Experiment.objects.get(pk=running.pk).is_held
    response = client.post(url)
    assert response.status_code == 302 and response["Location"] == f"/experiments/{running.pk}/"
    assert Experiment.objects.get(pk=running.pk).hold_until is None


# --- debug hold -----------------------------------------------------------------------------
def test_failed_experiment_is_held_for_debugging_then_released(
    client, docker_project, git_repo, docker_client, member_user, celery_worker_thread, request
):
    dockerfile = f"FROM {TEST_IMAGE}\nWORKDIR /app\nCOPY . /app\n"
    message = "aichor[train.yaml]: will fail"
    sha = git_repo.commit(
        {
            "aichor_manifests/train.yaml": manifest_yaml(
                "echo crash-report > /app/crash.txt; exit 4", extra_spec="  debug:\n    holdOnFailure: 10m\n"
            ),
            "Dockerfile": dockerfile,
        },
        message,
    )
    response = github_push(client, docker_project, sha=sha, message=message)
    assert response.status_code == 201, response.content
    engine = get_engine(docker_project.default_engine)
    request.addfinalizer(lambda: engine.cleanup_experiment(response.json()["experiment"]))
    experiment = wait_for(
        lambda: Experiment.objects.filter(pk=response.json()["experiment"], hold_until__isnull=False).first(),
        timeout=120,
        message="the failed experiment to be held",
    )
    assert experiment.status == Status.FAILED and experiment.exit_code == 4
    assert 590 < (experiment.hold_until - experiment.finished_at).total_seconds() < 610
    assert experiment.is_held
    assert Event.objects.filter(experiment=experiment, reason__startswith="held for debugging until").exists()

    async def inspect():
        # The terminal opens in the failed process's container, its files as the process left them.
        comm = await open_terminal(experiment.pk, member_user, "worker-0")
        await comm.send_to(bytes_data=b"cat /app/crash.txt; echo pid1=$(cat /proc/1/comm)\n")
        out = await read_until(comm, rb"pid1=\w+")
        await comm.disconnect()
        return out

    assert b"crash-report" in run(inspect)
    assert any(c["State"] == "running" for c in containers_of(docker_client, experiment.pk))
    snapshots = docker_client.images.list(filters={"label": f"aichor.hold={experiment.pk}"})
    assert snapshots and not any(image.labels.get("aichor.build-key") for image in snapshots)  # never a build cache hit

    assert services.release_hold(experiment.pk, actor=member_user)
    wait_for(lambda: not containers_of(docker_client, experiment.pk), timeout=30, message="the held containers to go")
    # The snapshots go after the containers; the low-level list: the high-level one inspects
    # each image and fails on one removed between listing and inspection.
    snapshot_filter = {"label": f"aichor.hold={experiment.pk}"}
    wait_for(lambda: not docker_client.api.images(filters=snapshot_filter), timeout=30, message="the snapshots to go")
    assert Event.objects.filter(experiment=experiment, reason="debug hold released by member@example.com").exists()

    async def refused():
        comm = communicator(experiment.pk, member_user)
        await comm.connect()
        message, _ = await read_close(comm)
        return message["code"]

    assert run(refused) == 4409


def test_reconcile_releases_an_expired_hold(running, docker_client, celery_worker_thread):
    services.finish_experiment(running.pk, Status.FAILED, reason="worker-0 exited with code 1", exit_code=1)
    assert services.hold_for_debugging(running.pk, 0.2)
    wait_for(lambda: not Experiment.objects.get(pk=running.pk).is_held, message="the hold to expire")
    assert containers_of(docker_client, running.pk)
    reconcile()
    assert Experiment.objects.get(pk=running.pk).hold_until is None
    assert Event.objects.filter(experiment=running, reason="debug hold expired").exists()
    wait_for(lambda: not containers_of(docker_client, running.pk), timeout=30, message="the containers to go")
