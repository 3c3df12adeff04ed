"""`make bench` tells the truth: every figure with a target counts, a missed one or a crashed
script makes the run fail, and the closing line says how many targets were met."""

import subprocess
import sys
from pathlib import Path

from bench import run_all

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = """
import sys
sys.path.insert(0, {root!r})
from bench._common import exit_status, figure
{body}
sys.exit(exit_status())
"""


def write(folder: Path, name: str, body: str) -> Path:
    path = folder / f"{name}.py"
    path.write_text(SCRIPT.format(root=str(ROOT), body=body))
    return path


def test_all_targets_met_exits_zero(tmp_path, capsys):
    fast = write(tmp_path, "fast", 'figure("p99", "12 ms", "<= 25 ms", True)\nfigure("idle RSS", "40 MiB")')
    assert run_all.run([fast]) == 0
    out = capsys.readouterr().out
    assert "bench: 1/1 targets met" in out


def test_a_missed_target_fails_the_run_and_is_named(tmp_path, capsys):
    good = write(tmp_path, "good", 'figure("ratio", "1.1", "<= 1.5", True)')
    bad = write(tmp_path, "bad", 'figure("ratio", "2.0", "<= 1.5", False)\nfigure("p50", "3 ms", "<= 5 ms", True)')
    assert run_all.run([good, bad]) == 1
    out = capsys.readouterr().out
    assert "bench: 2/3 targets met" in out
    assert "FAIL bad: ratio" in out


def test_a_crash_counts_as_a_missed_target(tmp_path, capsys):
    crash = write(tmp_path, "crash", 'figure("p50", "3 ms", "<= 5 ms", True)\nraise RuntimeError("server died")')
    assert run_all.run([crash]) == 1
    assert "bench: 1/2 targets met" in capsys.readouterr().out


def test_figure_prints_value_target_and_verdict_on_one_line(tmp_path):
    script = write(tmp_path, "one", 'figure("upload ratio", "0.75x", ">= 0.8x", False)')
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True)
    assert done.returncode == 1
    (line,) = [line for line in done.stdout.splitlines() if "upload ratio" in line]
    assert "0.75x" in line and "target >= 0.8x" in line and line.rstrip().endswith("FAIL")


def test_a_script_with_no_target_is_not_a_pass(tmp_path, capsys):
    empty = write(tmp_path, "empty", 'figure("informational", "1 s")')
    assert run_all.run([empty]) == 1
    assert "bench: 0/1 targets met" in capsys.readouterr().out
