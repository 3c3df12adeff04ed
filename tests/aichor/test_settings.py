"""Bad configuration stops start-up with a message naming the variable."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("DATABASE_URL", "nonsense://somewhere/db"),
        ("REDIS_URL", "http://127.0.0.1:6379"),
        ("AICHOR_DEBUG", "maybe"),
        ("AICHOR_WATCH_POLL_SECONDS", "fast"),
    ],
)
def test_bad_setting_fails_fast_naming_the_variable(tmp_path, name, value):
    env = {**os.environ, "AICHOR_DATA_DIR": str(tmp_path), name: value}
    result = subprocess.run(
        [sys.executable, "manage.py", "check"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode != 0
    assert name in result.stderr
    assert "ImproperlyConfigured" in result.stderr


def test_embedded_defaults_need_no_server(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")}
    env["AICHOR_DATA_DIR"] = str(tmp_path)
    result = subprocess.run(
        [sys.executable, "manage.py", "migrate", "--noinput"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "aichor.sqlite3").exists()
