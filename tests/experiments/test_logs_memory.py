"""Workload logs are read and stored in bounded pieces (issue 10, finding 8): a workload printing
hundreds of megabytes must not take the worker's memory with it, and no line may be lost,
repeated or split on the way."""

import hashlib
import io
import struct
import tracemalloc
from datetime import UTC, datetime

import pytest

from experiments import logs
from experiments.engines import docker as docker_engine
from experiments.engines.docker import DockerEngine
from experiments.engines.local import LocalEngine
from experiments.logview import total_lines
from experiments.models import LogChunk, Status
from tests.helpers import TEST_IMAGE, ended, push, wait_for

MiB = 1024 * 1024
PAD = "0" * 90
# Docker cuts a line over 16 KiB into messages that share one timestamp.
LONG = PAD * 512


def workload(lines: int) -> str:
    """A shell command printing `lines` numbered lines (every 5000th 46 KB long) and an
    unfinished last line; expected_output() is the same text, made independently."""
    return (
        'awk \'BEGIN { pad = sprintf("%090d", 0); long = pad; while (length(long) < 40000) long = long long; '
        f"for (i = 0; i < {lines}; i++) {{ if (i % 5000 == 7) print i, long; else print i, pad }}; "
        'printf "the end, no newline" }\''
    )


def expected_output(lines: int) -> str:
    body = "".join(f"{i} {LONG if i % 5000 == 7 else PAD}\n" for i in range(lines))
    return body + "the end, no newline\n"


def forget_open_streams() -> None:
    """As if the next call ran in another worker: it must start again from the cursor alone."""
    kept = getattr(docker_engine, "_OPEN_READERS", {})
    readers = [kept.pop(key, None) for key in list(kept)]
    for reader in filter(None, readers):
        reader.close()


@pytest.fixture
def container(docker_client):
    started = []

    def run(command: str) -> dict:
        api = docker_client.api
        created = api.create_container(
            TEST_IMAGE,
            entrypoint=["/bin/sh", "-c"],
            command=[command],
            host_config=api.create_host_config(network_mode="none"),
        )
        api.start(created["Id"])
        started.append(created["Id"])
        return {"containers": {"worker-0": created["Id"]}}

    yield run
    for cid in started:
        docker_client.api.remove_container(cid, force=True)


def exited(docker_client, handle: dict) -> bool:
    cid = handle["containers"]["worker-0"]
    return docker_client.api.inspect_container(cid)["State"]["Status"] == "exited"


@pytest.mark.docker
def test_docker_log_read_in_many_bounded_calls_loses_repeats_and_splits_no_line(docker_client, container, monkeypatch):
    monkeypatch.setattr(docker_engine, "LOG_BUDGET_BYTES", MiB, raising=False)
    lines = 300_000  # 30 MB
    handle = container(workload(lines))
    engine = DockerEngine({})
    cursor, pieces, calls = None, [], 0
    # Read while the workload prints, and on after it exited, as the watch loop does.
    while True:
        piece, cursor = engine.logs(handle, "worker-0", cursor)
        calls += 1
        pieces.append("".join(piece))
        if calls % 3 == 0:
            forget_open_streams()
        if not piece and exited(docker_client, handle):
            break
    pieces.append("".join(engine.final_logs(handle, "worker-0", cursor)))
    text = "".join(pieces)
    expected = expected_output(lines)
    assert len(text) == len(expected)
    assert hashlib.sha256(text.encode()).hexdigest() == hashlib.sha256(expected.encode()).hexdigest()
    assert calls >= 25
    # Each piece stops at the budget, give or take the line that crossed it.
    assert max(len(piece) for piece in pieces) < MiB + len(LONG) + 64


@pytest.mark.docker
def test_docker_logs_call_allocates_a_bounded_amount_with_30_mb_pending(docker_client, container):
    handle = container(workload(300_000))
    wait_for(lambda: exited(docker_client, handle), message="the workload to print 30 MB")
    engine = DockerEngine({})
    engine.client.ping()  # the client's own set-up is not the read's
    tracemalloc.start()
    try:
        piece, cursor = engine.logs(handle, "worker-0", None)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        forget_open_streams()
    assert sum(len(line) for line in piece) >= 3 * MiB  # it made progress...
    assert peak < 16 * MiB, f"one logs() call allocated {peak / MiB:.1f} MiB"  # ...not 30 MB at once
    assert cursor is not None


# --- the cursor, against a daemon whose stamps repeat ----------------------------------------
def stamp(ns: int) -> bytes:
    seconds = datetime.fromtimestamp(ns // 1_000_000_000, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{seconds}.{ns % 1_000_000_000:09d}Z".encode()


class FakeResponse:
    def __init__(self, body: bytes) -> None:
        self.raw = io.BytesIO(body)

    def close(self) -> None:
        self.raw.close()


class FakeStream:
    def __init__(self, body: bytes) -> None:
        self._response = FakeResponse(body)

    def close(self) -> None:
        self._response.close()


class GrowingLog:
    """A container's log as the daemon serves it: stamped messages in the log's order, `since`
    applied to each, a non-follow read seeing the log as it was when it began. Messages are
    revealed a few at a time, like a workload still printing."""

    def __init__(self, messages: list[tuple[int, bytes]]) -> None:
        self.messages = messages
        self.visible = 0

    def logs(self, cid, *, stdout=True, stderr=True, timestamps=False, stream=False, follow=None, since=None):
        since_ns = int(since * 1e9) if since else 0
        frames = [stamp(ns) + b" " + text for ns, text in self.messages[: self.visible] if ns >= since_ns]
        if not stream:
            return b"".join(frames)
        return FakeStream(b"".join(struct.pack(">BxxxL", 1, len(frame)) + frame for frame in frames))

    # The logs endpoint as the engine requests it (APIClient._get, without logs()'s inspect).
    def _url(self, path: str, cid: str) -> str:
        return cid

    def _get(self, cid: str, *, params: dict, stream: bool) -> "FakeResponse":
        return self.logs(cid, timestamps=True, stream=True, since=params.get("since"))._response

    def _raise_for_status(self, response: "FakeResponse") -> None:
        pass


def messages_sharing_stamps() -> tuple[list[tuple[int, bytes]], str]:
    base = 1_700_000_000 * 1_000_000_000
    messages, expected = [], []
    for i in range(3000):
        ns = base + (i // 7) * 1_000  # seven lines per stamp
        if i % 50 == 3:
            ns -= 2_000_000  # stderr's copier lost the race to the file: stamped earlier, written later
        if i % 400 == 11:  # a long line: three messages, one stamp
            pieces = [f"{i} part one ".encode(), b"part two ", b"part three\n"]
            messages += [(ns, piece) for piece in pieces]
            expected.append(b"".join(pieces).decode())
        else:
            messages.append((ns, f"line {i}\n".encode()))
            expected.append(f"line {i}\n")
    return messages, "".join(expected)


class FakeClient:
    def __init__(self, api) -> None:
        self.api = api


def test_cursor_loses_and_repeats_no_line_when_lines_share_a_timestamp(monkeypatch):
    monkeypatch.setattr(docker_engine, "LOG_BUDGET_BYTES", 300, raising=False)
    messages, expected = messages_sharing_stamps()
    log = GrowingLog(messages)
    engine = DockerEngine({})
    engine._client = FakeClient(log)
    handle = {"containers": {"worker-0": "c0ffee"}}
    cursor, pieces, calls = None, [], 0
    while True:
        log.visible = min(len(messages), log.visible + 60)  # cut points fall inside a stamp's group
        piece, cursor = engine.logs(handle, "worker-0", cursor)
        calls += 1
        pieces.append("".join(piece))
        if calls % 2:
            forget_open_streams()
        if not piece and log.visible == len(messages):
            break
    pieces.append("".join(engine.final_logs(handle, "worker-0", cursor)))
    assert "".join(pieces) == expected
    assert calls > 90  # the budget, not the growth, bounded most calls


# --- storing ----------------------------------------------------------------------------------
@pytest.mark.django_db
def test_a_burst_is_stored_in_bounded_chunks_of_whole_lines(project, member_user):
    from experiments.services import create_experiment

    experiment = create_experiment(project=project, commit_sha="0" * 40, manifest_path="m.yaml", author=member_user)
    text = "".join(f"{i} {PAD}\n" for i in range(50_000)) + LONG * 10 + "\n"  # 5 MB, and one 460 KB line
    with logs.LogWriter(experiment.pk, "process:worker-0") as writer:
        writer.write(text)
    chunks = list(LogChunk.objects.filter(experiment=experiment).order_by("seq"))
    assert len(chunks) > 10
    assert all(chunk.text.endswith("\n") for chunk in chunks)
    assert max(len(chunk.text) for chunk in chunks if LONG not in chunk.text) <= logs.CHUNK_BYTES
    assert logs.log_text(experiment.pk, "process:worker-0") == text
    assert total_lines(experiment.pk, "process:worker-0") == 50_001


def test_local_engine_reads_a_large_log_in_bounded_pieces(tmp_path):
    lines = 300_000
    (tmp_path / "worker-0.log").write_text(expected_output(lines).removesuffix("\n"))
    engine, handle = LocalEngine({}), {"dir": str(tmp_path), "pids": {"worker-0": 0}}
    tracemalloc.start()
    try:
        piece, cursor = engine.logs(handle, "worker-0", None)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 * MiB, f"one logs() call allocated {peak / MiB:.1f} MiB"
    pieces = ["".join(piece)]
    while piece:
        piece, cursor = engine.logs(handle, "worker-0", cursor)
        pieces.append("".join(piece))
    pieces.append("".join(engine.final_logs(handle, "worker-0", cursor)))
    assert "".join(pieces) == expected_output(lines)
    assert len(pieces) > 5


# --- through the pipeline -----------------------------------------------------------------------
@pytest.mark.docker
@pytest.mark.django_db(transaction=True)
def test_docker_workload_log_is_stored_whole_through_the_pipeline(
    client, docker_project, git_repo, docker_client, celery_worker_thread, monkeypatch
):
    monkeypatch.setattr(docker_engine, "LOG_BUDGET_BYTES", 512 * 1024, raising=False)
    lines = 120_000  # 12 MB
    experiment = ended(push(client, docker_project, git_repo, workload(lines)), timeout=180)
    assert experiment.status == Status.SUCCEEDED, experiment.failure_reason
    stored = logs.log_text(experiment.pk, "process:worker-0")
    expected = expected_output(lines)
    assert stored.count("\n") == expected.count("\n")
    assert hashlib.sha256(stored.encode()).hexdigest() == hashlib.sha256(expected.encode()).hexdigest()
    assert total_lines(experiment.pk, "process:worker-0") == lines + 1
