"""`make run` as a user meets it in a terminal (a real pseudo-terminal, so Ctrl-C is the
terminal's own SIGINT to the foreground job): the login box comes last, once the server
answers, without the broker's "No hostname was supplied" noise; Ctrl-C ends with exit 0 and no
`make: *** Error`; a later start names the command that resets the password."""

import fcntl
import os
import select
import signal
import socket
import subprocess
import termios
import time
from pathlib import Path

import pytest

from tests.helpers import wait_for

ROOT = Path(__file__).resolve().parents[2]
BOX_END = "┘"


class Terminal:
    def __init__(self, env: dict[str, str]) -> None:
        self.master: int | None
        self.master, slave = os.openpty()

        def controlling_terminal() -> None:  # in the child, after setsid
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)

        self.process = subprocess.Popen(
            # The virtualenv is set up already: make must not reinstall it (nor npm) here.
            ["make", "-o", ".venv/.installed", "-o", "node_modules/.installed", "run"],
            cwd=ROOT,
            env=env,
            stdin=slave,
            stdout=slave,
            stderr=slave,
            start_new_session=True,
            preexec_fn=controlling_terminal,
        )
        os.close(slave)
        self.output = b""

    def read(self) -> str:
        while self.master is not None and select.select([self.master], [], [], 0.05)[0]:
            try:
                piece = os.read(self.master, 65536)
            except OSError:  # the other side closed: everything is read
                break
            if not piece:
                break
            self.output += piece
        return self.output.decode(errors="replace")

    def ctrl_c_and_wait(self, timeout: float = 60) -> int:
        os.write(self.master, b"\x03")
        deadline = time.monotonic() + timeout
        while self.process.poll() is None and time.monotonic() < deadline:
            self.read()
        self.read()
        return self.process.wait(timeout=1)

    def close(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self.read()
        os.close(self.master)
        self.master = None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def run_env(tmp_path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL", "CI", "MAKEFLAGS")}
    # The embedded defaults, in a data folder of the test's own; no Docker, so the demo runs on
    # the local engine at once (bootstrap would otherwise try to pull its base image).
    env |= {"AICHOR_DATA_DIR": str(tmp_path / "data"), "PORT": str(free_port()), "DOCKER_HOST": "unix:///nonexistent"}
    env |= {"TERM": "dumb"}
    return env


def start_until_box(env: dict[str, str]) -> tuple[Terminal, str]:
    terminal = Terminal(env)
    try:
        wait_for(
            lambda: BOX_END in terminal.read() or terminal.process.poll() is not None,
            timeout=180,
            interval=0.2,
            message="the login box",
        )
        assert terminal.process.poll() is None, terminal.read()
    except BaseException:
        terminal.close()
        raise
    return terminal, terminal.read()


def box_lines(output: str) -> list[str]:
    lines = output.splitlines()
    end = max(i for i, line in enumerate(lines) if BOX_END in line)
    start = max(i for i in range(end) if "┌" in lines[i])
    return [line.strip("│ \r") for line in lines[start + 1 : end]]


def test_make_run_prints_the_login_box_last_and_ctrl_c_exits_0(run_env):
    port = run_env["PORT"]
    terminal, output = start_until_box(run_env)
    try:
        # Served before the box is shown: the address in it works when the user reads it.
        assert "Uvicorn running on" in output.split("┌")[0]
        lines = box_lines(output)
        assert lines[0] == f"aichor is running at http://127.0.0.1:{port}/"
        assert lines[1].startswith("Log in as admin@example.com with password ")
        assert output.count("with password") == 1  # the password is shown once, in the box
        status = terminal.ctrl_c_and_wait()
    finally:
        terminal.close()
    output = terminal.read()
    assert status == 0, output
    assert "make: ***" not in output
    assert "No hostname was supplied" not in output
    assert "[tasks]" not in output  # no worker banners either

    terminal, output = start_until_box(run_env)
    try:
        lines = box_lines(output)
        assert lines[1] == "Log in as admin@example.com"
        assert lines[2] == "Lost the password? .venv/bin/python manage.py changepassword admin@example.com"
        assert "with password" not in output
        assert terminal.ctrl_c_and_wait() == 0
    finally:
        terminal.close()
