"""The local engine's jobset completions held back to `parallelisms` (issue 14): they are not
processes until an earlier completion of their job ends (so only the running ones count against
the process limit), they start as room frees even after a worker restart, and a cancel leaves
none of them behind nor lets one start afterwards."""

import os
import stat

import pytest

from experiments.engines.local import LocalEngine
from experiments.manifest import parse_manifest
from experiments.workload import Workload, groups_of
from tests.helpers import manifest_yaml, wait_for

# Completion 0 ends at once; the others run until cancelled.
COMMAND = '[ "$JOB_COMPLETION_INDEX" = 0 ] && exit 0; echo "secret is $TOKEN"; sleep 60'
TYPES = "    workers:\n      count: 1\n      completions: 4\n      parallelisms: 2\n      resources:\n        cpus: 1\n        ramRatio: 1\n"


def group_members(pids) -> set[int]:
    """Live processes of the process groups `pids` lead."""
    members = set()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) in pids and fields[0] != "Z":
            members.add(int(entry.name))
    return members


@pytest.fixture
def engine(tmp_path):
    return LocalEngine({"root": str(tmp_path)})


@pytest.fixture
def submitted(engine):
    spec = parse_manifest(manifest_yaml(COMMAND, operator="jobset", types=TYPES)).spec
    workload = Workload("held-back", "p", "jobset", "", spec.command, groups_of(spec), {"TOKEN": "t0ken"}, [])
    handle = engine.submit(workload, log=lambda text: None)
    yield handle
    engine.cancel(engine.find("held-back") or handle)
    engine.cleanup(handle)


def phases(engine, handle) -> dict[str, str]:
    return {s.name: s.phase for s in engine.status(handle)}


def test_held_back_completions_are_no_processes_until_room_frees(engine, submitted, tmp_path):
    started = {name: pid for name, pid in submitted["pids"].items() if pid}
    assert sorted(started) == ["workers-0-0", "workers-0-1"]  # only `parallelisms` of them
    # Their plan holds the environment (secrets too): only the server's user reads it.
    plan = tmp_path / "held-back" / "workers-0-3.plan"
    assert stat.S_IMODE(plan.stat().st_mode) == 0o600
    # Completion 0 exits: the next one starts, never more than 2 running at once.
    seen = wait_for(
        lambda: (p := phases(engine, submitted))["workers-0-2"] == "running" and p,
        timeout=30,
        message="completion 2 started once completion 0 ended",
    )
    assert seen == {
        "workers-0-0": "exited",
        "workers-0-1": "running",
        "workers-0-2": "running",
        "workers-0-3": "pending",
    }
    waiting = next(s for s in engine.status(submitted) if s.name == "workers-0-3")
    assert waiting.reason == "next of its job once a running completion ends (completed 1/4)"
    assert engine.progress(submitted, engine.status(submitted)) == "completed 1/4"
    wait_for(lambda: "secret is t0ken" in "".join(engine.logs(submitted, "workers-0-2")[0]), timeout=10)


def test_a_restarted_worker_finds_and_cancels_the_completions_started_since(engine, submitted):
    wait_for(lambda: phases(engine, submitted)["workers-0-2"] == "running", timeout=30, message="completion 2 started")
    # A new worker knows only what is on disk: the recorded handle has no pid for completion 2.
    found = LocalEngine(engine.config).find("held-back")
    assert found["pids"]["workers-0-2"] == 0
    assert phases(LocalEngine(engine.config), found)["workers-0-2"] == "running"
    started = [pid for pid in [*submitted["pids"].values()] if pid]
    assert group_members(started)
    LocalEngine(engine.config).cancel(found)
    wait_for(lambda: not group_members(started), timeout=10, message="every started completion killed")
    # Cancelled: asking again starts nothing more (completion 3 stays a plan).
    assert phases(engine, found)["workers-0-3"] == "pending"
    assert not found["pids"]["workers-0-3"]
