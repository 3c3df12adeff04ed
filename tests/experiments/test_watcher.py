"""The engine watcher at unit level: the docker engine's batched states, the watcher's lease,
reconcile's hand-over to the engine's watcher, and an interval's cost whatever the number of
quiet experiments (the stats line the benchmark reads)."""

import logging
import re
import threading
import time
from datetime import timedelta

import pytest
from celery.worker import state as worker_state
from django.db import connection
from django.utils import timezone

from aichor.celery import app
from experiments import logs, services
from experiments.engines import docker as docker_engine_module
from experiments.engines import get_engine
from experiments.models import EngineWatch, Experiment, Status
from experiments.pipeline import complete, reconcile
from experiments.pipeline.complete import collect_logs, watch_state_of
from experiments.pipeline.watcher import Watcher, watch_engine
from tests.experiments.test_terminal import start_running_experiment
from tests.helpers import wait_for

pytestmark = pytest.mark.django_db(transaction=True)
STATS = re.compile(r"watch engine=\d+ experiments=(\d+) changes=(\d+) docker_calls=(\d+) queries=(\d+) seconds=[\d.]+")


@pytest.fixture
def sent(monkeypatch) -> list[tuple[str, list]]:
    """The tasks sent through the broker, with their arguments (no worker runs them)."""
    calls: list[tuple[str, list]] = []
    monkeypatch.setattr(app, "send_task", lambda name, args=(), **k: calls.append((name, list(args))))
    return calls


@pytest.fixture
def cleanup():
    started: list[Experiment] = []
    yield started
    for experiment in started:
        get_engine(experiment.engine).cleanup_experiment(str(experiment.pk))


def run_many(project, engine_model, cleanup, count: int, command: str = "sleep 600") -> list[Experiment]:
    for _ in range(count):
        cleanup.append(start_running_experiment(project, engine_model, command=command))
    return cleanup[-count:]


def states_counted(engine, experiments: list[Experiment]) -> tuple[dict, int]:
    before = engine.calls()
    states = engine.states({str(e.pk): e.handle for e in experiments})
    return states, engine.calls() - before


@pytest.mark.docker
def test_docker_states_make_one_request_for_one_or_ten_experiments(docker_project, docker_engine, cleanup, monkeypatch):
    # No full list falls due however slowly the machine starts the containers.
    monkeypatch.setattr(docker_engine_module, "FULL_LIST_SECONDS", 3600.0)
    engine = get_engine(docker_engine)
    one = run_many(docker_project, docker_engine, cleanup, 1)
    states, calls = states_counted(engine, one)
    assert calls == 1 and [s.phase for s in states[str(one[0].pk)]] == ["running"]
    ten = one + run_many(docker_project, docker_engine, cleanup, 9)
    # The nine just submitted are looked up together: one request more, once.
    states, calls = states_counted(engine, ten)
    assert calls == 2 and all([s.phase for s in states[str(e.pk)]] == ["running"] for e in ten)
    states, calls = states_counted(engine, ten)
    assert calls == 1 and all([s.phase for s in states[str(e.pk)]] == ["running"] for e in ten)
    failing = run_many(docker_project, docker_engine, cleanup, 1, command="exit 3")
    wait_for(lambda: engine.status(failing[0].handle)[0].phase == "exited", message="the workload to exit")
    states, calls = states_counted(engine, ten + failing)
    assert calls == 1 and [(s.phase, s.exit_code) for s in states[str(failing[0].pk)]] == [("exited", 3)]


@pytest.mark.docker
def test_docker_states_see_an_exit_at_once_and_a_removed_container_by_the_next_full_list(
    docker_project, docker_engine, docker_client, cleanup, monkeypatch
):
    monkeypatch.setattr(docker_engine_module, "FULL_LIST_SECONDS", 2.0)
    engine = get_engine(docker_engine)
    running = run_many(docker_project, docker_engine, cleanup, 2)
    states, _calls = states_counted(engine, running)
    assert all([s.phase for s in states[str(e.pk)]] == ["running"] for e in running)
    exiting, removed = running
    docker_client.api.kill(exiting.handle["containers"]["worker-0"])
    docker_client.api.remove_container(removed.handle["containers"]["worker-0"], force=True)
    # Between full lists an interval reads only the containers that stopped: the exit is seen
    # in the very next one (a cancel, an end), the removal by the next full list.
    states, calls = states_counted(engine, running)
    assert calls == 1 and states[str(exiting.pk)][0].phase == "exited"
    wait_for(
        lambda: engine.states({str(removed.pk): removed.handle})[str(removed.pk)][0].phase == "missing",
        timeout=2.0 + 2.0,
        interval=0.2,
        message="the removed container reported missing",
    )


def followed_by_events(project, engine_model, cleanup, monkeypatch):
    """(engine, experiment, container id, experiment id) of one running container, seen running
    once (which starts the engine's event stream) and no full list due for the rest of the test."""
    monkeypatch.setattr(docker_engine_module, "FULL_LIST_SECONDS", 3600.0)
    engine = get_engine(engine_model)
    (experiment,) = run_many(project, engine_model, cleanup, 1)
    cid, pk = experiment.handle["containers"]["worker-0"], str(experiment.pk)
    assert engine.states({pk: experiment.handle})[pk][0].phase == "running"
    wait_for(engine._exit_feed().connected.is_set, timeout=10, message="the events stream")
    return engine, experiment, cid, pk


@pytest.mark.docker
def test_docker_states_count_an_exit_from_its_event_while_the_daemons_list_still_says_running(
    docker_project, docker_engine, docker_client, cleanup, monkeypatch
):
    engine, experiment, cid, pk = followed_by_events(docker_project, docker_engine, cleanup, monkeypatch)
    # What a busy daemon answers for seconds after a container died (measured, docker_exits):
    # the container still running. No test can make a daemon lag on cue, so the list leaves it
    # out of the stopped ones here.
    real = engine.client.api.containers
    # Undone before the cleanup, which must see the container to remove it.
    with monkeypatch.context() as patch:
        patch.setattr(
            engine.client.api,
            "containers",
            lambda **kw: [c for c in real(**kw) if c["Id"] != cid or c["State"] == "running"],
        )
        docker_client.api.kill(cid)
        states = wait_for(
            lambda: (s := engine.states({pk: experiment.handle})[pk]) and s[0].phase == "exited" and s,
            timeout=10,
            message="the exit, from the daemon's die event",
        )
    assert [(s.phase, s.exit_code) for s in states] == [("exited", 137)]


@pytest.mark.docker
def test_docker_states_follow_a_container_started_again_and_see_its_removal_without_a_full_list(
    docker_project, docker_engine, docker_client, cleanup, monkeypatch
):
    engine, experiment, cid, pk = followed_by_events(docker_project, docker_engine, cleanup, monkeypatch)

    def phase() -> str:
        return engine.states({pk: experiment.handle})[pk][0].phase

    docker_client.api.kill(cid)
    wait_for(lambda: phase() == "exited", timeout=10, message="the exit")
    # An exit the feed keeps must not outlive a start: the container runs again.
    docker_client.api.start(cid)
    wait_for(lambda: phase() == "running", timeout=10, message="the container running again")
    docker_client.api.remove_container(cid, force=True)
    wait_for(lambda: phase() == "missing", timeout=10, message="the removal, long before the next full list")


@pytest.mark.docker
def test_a_cancel_stops_the_processes_at_once_and_removes_them_once_the_completions_under_way_are_done(
    docker_project, docker_engine, docker_client, cleanup, sent, monkeypatch
):
    monkeypatch.setattr(complete, "REMOVAL_WAIT_SECONDS", 60.0)
    (experiment,) = run_many(docker_project, docker_engine, cleanup, 1)
    cid = experiment.handle["containers"]["worker-0"]
    services.cancel_experiment(experiment)
    # A completion of another experiment under way on a finisher, until `done`.
    done = threading.Event()
    complete.COMPLETIONS.begin()
    threading.Thread(target=complete.COMPLETIONS.run, args=(done.wait,)).start()

    def stop() -> None:
        try:
            complete.stop(experiment.pk)
        finally:
            connection.close()  # this thread's own

    stopping = threading.Thread(target=stop)
    try:
        stopping.start()
        wait_for(
            lambda: docker_client.api.inspect_container(cid)["State"]["Status"] == "exited",
            timeout=10,
            message="the cancelled experiment's container stopped",
        )
        stopping.join(1.0)
        # The removal waits: in a wave of exits the daemon serves the final log reads first.
        assert stopping.is_alive() and docker_client.api.inspect_container(cid)
    finally:
        done.set()
    stopping.join(10)
    assert not stopping.is_alive() and not docker_client.api.containers(all=True, filters={"id": cid})


def test_a_stop_run_inline_by_a_completion_does_not_wait_for_itself():
    # AICHOR_CELERY_EAGER runs the stop task that a completion enqueues inside that completion.
    waited = []
    complete.COMPLETIONS.begin()
    inline = threading.Thread(
        target=complete.COMPLETIONS.run, args=(lambda: waited.append(complete.COMPLETIONS.wait_idle(60)),)
    )
    inline.start()
    inline.join(10)
    assert not inline.is_alive() and waited == [False] and complete.COMPLETIONS.count == 0


def test_a_second_watcher_returns_at_once_and_takes_over_an_expired_lease(project, local_engine, cleanup):
    run_many(project, local_engine, cleanup, 1)
    first = Watcher(local_engine)
    assert services.take_watch(local_engine.pk, first.owner)
    started = time.monotonic()
    assert Watcher(local_engine).run(30) is False
    assert time.monotonic() - started < 1
    EngineWatch.objects.filter(engine=local_engine).update(expires_at=timezone.now() - timedelta(seconds=1))
    second = Watcher(local_engine)
    assert second.run(0.3) is True  # a full slice: its successor is enqueued
    assert not services.renew_watch(local_engine.pk, first.owner)  # the first stops at its next interval


def test_reconcile_of_a_running_experiment_enqueues_the_engine_watcher(project, local_engine, cleanup, sent):
    experiment = run_many(project, local_engine, cleanup, 1)[0]
    Experiment.objects.filter(pk=experiment.pk).update(heartbeat_at=timezone.now() - timedelta(minutes=10))
    sent.clear()
    assert reconcile() == [str(experiment.pk)]
    assert sent == [("experiments.watch_engine", [local_engine.pk])]
    assert experiment.events.filter(reason="reconcile resumed Running").exists()
    # A live watcher: nothing more is enqueued, and nothing is reported resumed.
    assert services.take_watch(local_engine.pk, "alive")
    Experiment.objects.filter(pk=experiment.pk).update(heartbeat_at=timezone.now() - timedelta(minutes=10))
    assert reconcile() == []
    assert len(sent) == 1


def last_stats(caplog, engine_model) -> tuple[int, int, int, int]:
    lines = [r.getMessage() for r in caplog.records if r.name == "experiments.watcher"]
    assert lines, "no stats line"
    found = STATS.fullmatch(lines[-1])
    assert found, lines[-1]
    return tuple(int(n) for n in found.groups())


def stats_of_a_slice(caplog, engine_model) -> tuple[int, int, int, int]:
    caplog.clear()
    assert Watcher(engine_model).run(1.0)
    return last_stats(caplog, engine_model)


@pytest.mark.parametrize("kind", ["local", pytest.param("docker", marks=pytest.mark.docker)])
def test_an_interval_costs_the_same_for_2_and_12_quiet_experiments(kind, request, caplog, settings, cleanup, sent):
    settings.WATCH_STATS = True
    project = request.getfixturevalue("project" if kind == "local" else "docker_project")
    engine_model = request.getfixturevalue(f"{kind}_engine")
    caplog.set_level(logging.INFO, logger="experiments.watcher")
    run_many(project, engine_model, cleanup, 2)
    small = stats_of_a_slice(caplog, engine_model)
    run_many(project, engine_model, cleanup, 10)
    large = stats_of_a_slice(caplog, engine_model)
    assert (small[0], large[0]) == (2, 12)
    assert small[1] == large[1] == 0  # no changes
    assert small[2:] == large[2:]  # docker_calls, queries
    assert large[2] == (1 if kind == "docker" else 0)
    assert all(e.status == Status.PROCESSING for e in Experiment.objects.all())


def interval_with_exits(project, engine_model, cleanup, caplog, count: int) -> tuple[int, int, int, int]:
    """The stats of one watcher interval in which `count` experiments have exited."""
    engine = get_engine(engine_model)
    exited = run_many(project, engine_model, cleanup, count, command="exit 0")
    for experiment in exited:
        wait_for(lambda e=experiment: engine.status(e.handle)[0].phase == "exited", message="the workload to exit")
    caplog.clear()
    watcher = Watcher(engine_model)
    assert services.take_watch(engine_model.pk, watcher.owner)
    try:
        watcher.measured()
        watcher.settle()
    finally:
        services.release_watch(engine_model.pk, watcher.owner)
    assert all(e.status == Status.SUCCEEDED for e in Experiment.objects.filter(pk__in=[e.pk for e in exited]))
    lines = [
        r.getMessage() for r in caplog.records if r.name == "experiments.watcher" and STATS.fullmatch(r.getMessage())
    ]
    assert len(lines) == 1, lines
    return tuple(int(n) for n in STATS.fullmatch(lines[0]).groups())


def test_five_exits_in_one_interval_cost_the_watcher_the_queries_of_one(
    project, local_engine, cleanup, caplog, settings
):
    settings.WATCH_STATS = True
    caplog.set_level(logging.INFO, logger="experiments.watcher")
    one = interval_with_exits(project, local_engine, cleanup, caplog, 1)
    five = interval_with_exits(project, local_engine, cleanup, caplog, 5)
    assert (one[:2], five[:2]) == ((1, 1), (5, 5))  # experiments, changes
    assert five[3] == one[3]  # queries: the exits begin Completed together
    # Each still has its own timeline: Running ended Succeeded, Completed began and ended once.
    for experiment in cleanup:
        steps = list(
            experiment.events.filter(kind="step", step__in=["Running", "Completed"]).values_list("step", "old", "new")
        )
        assert steps == [
            ("Running", "Initialize", "Running"),
            ("Running", "Running", "Succeeded"),
            ("Completed", "Initialize", "Running"),
            ("Completed", "Running", "Succeeded"),
        ]


@pytest.mark.docker
def test_the_final_collection_of_a_followed_log_costs_one_request_and_keeps_the_unfinished_last_line(
    docker_project, docker_engine, cleanup
):
    engine = get_engine(docker_engine)
    experiment = run_many(docker_project, docker_engine, cleanup, 1, command="echo first; sleep 1; printf last")[0]
    handle, stream = experiment.handle, "process:worker-0"
    state = watch_state_of({}, engine.processes(handle))
    # Followed while it runs, as the watcher does.
    wait_for(
        lambda: (
            collect_logs(engine, experiment.pk, handle, state, follow=True) is not None
            and logs.log_text(experiment.pk, stream) == "first\n"
        ),
        message="the first line through the followed stream",
    )
    wait_for(lambda: engine.status(handle)[0].phase == "exited", message="the workload to exit")
    before = engine.calls()
    collect_logs(engine, experiment.pk, handle, state, final=True)
    assert engine.calls() - before == 1
    # The daemon often closes a followed stream before an exited process's last unfinished
    # line: the final collection reads the log itself.
    assert logs.log_text(experiment.pk, stream) == "first\nlast\n"


def test_the_watch_task_keeps_watching_across_slices_until_nothing_runs_without_a_successor(
    project, local_engine, cleanup, sent, settings, monkeypatch
):
    # A successor sent through the queue would wait behind a wave of exits' stop tasks, with
    # nothing watched meanwhile: the task goes on as long as an experiment runs.
    experiment = run_many(project, local_engine, cleanup, 1, command="sleep 2")[0]
    sent.clear()
    settings.WATCH_SLICE_SECONDS = 0.3
    slices, taken = [], []
    run, take = Watcher.run, services.take_watch
    monkeypatch.setattr(
        Watcher, "run", lambda watcher, *args, **kwargs: slices.append(1) or run(watcher, *args, **kwargs)
    )
    monkeypatch.setattr(services, "take_watch", lambda *args: taken.append(1) or take(*args))
    watch_engine(local_engine.pk)
    experiment.refresh_from_db()
    assert experiment.status == Status.SUCCEEDED
    assert len(slices) >= 3  # slice after slice in this task...
    assert len(taken) == 1  # ...under the one lease, taken once...
    assert [name for name, _args in sent] == ["experiments.stop"]  # ...and no successor
    assert EngineWatch.objects.get(engine=local_engine).owner == ""  # freed at the end


def test_a_worker_shutting_down_hands_the_watch_over_once(project, local_engine, cleanup, sent, settings, monkeypatch):
    run_many(project, local_engine, cleanup, 1)
    sent.clear()
    settings.WATCH_SLICE_SECONDS = 0.3
    slices = []
    run = Watcher.run

    def run_then_shut_down(watcher, seconds, **kwargs):
        slices.append(1)
        if len(slices) == 2:  # a warm shutdown (Ctrl-C, a deploy) during the second slice
            monkeypatch.setattr(worker_state, "should_stop", 0)
        return run(watcher, seconds, **kwargs)

    monkeypatch.setattr(Watcher, "run", run_then_shut_down)
    watch_engine(local_engine.pk)
    assert len(slices) == 2
    assert sent == [("experiments.watch_engine", [local_engine.pk])]
    assert not services.watcher_gone(local_engine.pk)  # the lease was freed for the successor
    assert EngineWatch.objects.get(engine=local_engine).owner == ""


def test_a_slice_that_goes_on_neither_waits_for_completions_nor_frees_the_lease(
    project, local_engine, cleanup, settings, monkeypatch
):
    # At the end of a slice in a wave of exits, waiting for every completion under way left
    # the exits after them unnoticed for as long (half a minute at 500).
    experiment = run_many(project, local_engine, cleanup, 1, command="true")[0]
    gate = threading.Event()
    monkeypatch.setattr("experiments.pipeline.watcher.finish", lambda *args: gate.wait(30))
    watcher = Watcher(local_engine)
    try:
        wait_for(lambda: watcher.run(0.3, going_on=True) and experiment.pk in watcher.finishing, message="an exit")
        started = time.monotonic()
        assert watcher.run(0.3, going_on=True)
        assert time.monotonic() - started < 2  # the completion is still under way
        assert not watcher.finishing[experiment.pk].done()
        assert EngineWatch.objects.get(engine=local_engine).owner == watcher.owner
    finally:
        gate.set()
        watcher.release()
    assert EngineWatch.objects.get(engine=local_engine).owner == ""
