"""A live aichor server for the CLI: uvicorn (the production ASGI server) in a thread of the
test process, so it serves the test database, plus the in-process Celery worker. The CLI runs
as a real subprocess (the installed `aichor` console script) with its own config folder."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import wait_for

AICHOR = str(Path(sys.executable).with_name("aichor"))


@pytest.fixture(scope="session")
def server_url(asgi_server_url) -> str:
    return asgi_server_url


class Cli:
    def __init__(self, home: Path, url: str) -> None:
        self.url, self.home = url, home
        self.env = {**os.environ, "XDG_CONFIG_HOME": str(home), "COLUMNS": "200"}

    def run(self, *args: str, check: bool = True, cwd: Path | None = None, timeout: float = 120):
        result = subprocess.run([AICHOR, *args], env=self.env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"aichor {' '.join(args)} failed ({result.returncode}): {result.stderr}")
        return result

    def json(self, *args: str, **kwargs):
        return json.loads(self.run(*args, "--json", **kwargs).stdout)

    def popen(self, *args: str) -> subprocess.Popen:
        return subprocess.Popen(
            [AICHOR, *args], env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )

    def wait_status(self, experiment_id: str, statuses: tuple[str, ...], timeout: float = 90) -> dict:
        return wait_for(
            lambda: (data := self.json("experiments", "status", experiment_id))["status"] in statuses and data,
            timeout=timeout,
            interval=0.3,
            message=f"experiment {experiment_id} to reach {statuses}",
        )


@pytest.fixture
def cli(tmp_path, server_url) -> Cli:
    return Cli(tmp_path / "config", server_url)


@pytest.fixture
def logged_in(cli, project, member_user) -> Cli:
    """The member, authenticated, with project vision selected."""
    from projects.services import create_api_token

    cli.run("auth", "key", "--apikey", create_api_token(member_user), "--url", cli.url)
    cli.run("context", "set", "project", "vision")
    return cli
