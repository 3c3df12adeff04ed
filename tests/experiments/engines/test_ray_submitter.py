"""The Ray submitter's own logic, against a stand-in for Ray's JobSubmissionClient whose follower
ends early as Ray's does. The real Ray cluster runs it in test_pipeline_kuberay and
test_local_kuberay."""

import subprocess
import sys
from dataclasses import dataclass

from experiments.engines import ray_submitter
from experiments.engines.single_host import RAY_SUBMITTER


@dataclass
class Status:
    value: str

    def is_terminal(self) -> bool:
        return self.value in ("SUCCEEDED", "FAILED", "STOPPED")


class EarlyFollower:
    """Ray's follower that stopped before the driver's last lines; the log holds them all."""

    LOG = "starting\nepoch 1\nepoch 2\naccuracy 0.93\n"
    submitted: list[str] = []

    def __init__(self, address: str):
        assert address == "http://127.0.0.1:8265"
        self.polls = ["RUNNING", self.final]

    final = "SUCCEEDED"

    def submit_job(self, *, entrypoint: str) -> str:
        self.submitted.append(entrypoint)
        return "raysubmit_1"

    async def tail_job_logs(self, job: str):
        yield "starting\nepo"
        yield "ch 1\n"

    def get_job_status(self, job: str) -> Status:
        return Status(self.polls.pop(0) if len(self.polls) > 1 else self.polls[0])

    def get_job_logs(self, job: str) -> str:
        return self.LOG


def run(monkeypatch, capsys, client_class, command: str) -> tuple[int, str]:
    monkeypatch.setenv("RAY_DASHBOARD_ADDRESS", "http://127.0.0.1:8265")
    monkeypatch.setattr(ray_submitter.time, "sleep", lambda seconds: None)
    code = ray_submitter.main(command, client_class=client_class)
    return code, capsys.readouterr().out


def test_the_lines_the_follower_missed_are_printed_once_after_it(monkeypatch, capsys):
    EarlyFollower.submitted.clear()
    command = "python train.py --name 'two words' && echo \"done in $PWD\""
    code, out = run(monkeypatch, capsys, EarlyFollower, command)
    assert code == 0
    assert EarlyFollower.submitted == [command]  # the job's shell runs the command as written
    job_output = out.split("its output follows.\n", 1)[1].rsplit("Job 'raysubmit_1'", 1)[0]
    assert job_output == EarlyFollower.LOG  # every line, once, in order
    assert out.endswith("Job 'raysubmit_1' succeeded\n")


def test_a_job_that_did_not_succeed_exits_1_with_its_output(monkeypatch, capsys):
    class Failing(EarlyFollower):
        final = "FAILED"

    code, out = run(monkeypatch, capsys, Failing, "python train.py")
    assert code == 1
    assert "accuracy 0.93\nJob 'raysubmit_1' failed\n" in out


def test_the_text_the_engine_passes_runs_as_a_script_with_the_command():
    # What the container runs: `python -c <this file's text> COMMAND`. The test's Python has no
    # Ray: the text parses and runs as far as Ray's import.
    done = subprocess.run([sys.executable, "-c", RAY_SUBMITTER, "python x.py"], capture_output=True, text=True)
    assert done.returncode == 1
    assert "No module named 'ray'" in done.stderr
