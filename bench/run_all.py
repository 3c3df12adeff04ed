"""`make bench`: run every benchmark script in this folder, each in its own process, and close with
`bench: N/M targets met`. Every figure a script prints with a target (bench/_common.figure) counts;
a script that crashes or exits non-zero without a failed figure counts as one missed target of its
own. Exits non-zero when any target is missed."""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ORDER = ["pipeline_overhead.py", "list_page.py", "upload.py", "datasets.py", "terminal_rtt.py", "logs.py"]


def main() -> int:
    scripts = [HERE / name for name in ORDER if (HERE / name).exists()]
    scripts += sorted(p for p in HERE.glob("*.py") if p.name not in ORDER and not p.name.startswith(("_", "run_all")))
    if len(sys.argv) > 1:
        scripts = [s for s in scripts if s.stem in sys.argv[1:]]
    return run(scripts)


def run(scripts: list[Path]) -> int:
    met = total = 0
    missed: list[str] = []
    with tempfile.NamedTemporaryFile("r", prefix="aichor-bench-results-", suffix=".jsonl") as record:
        for script in scripts:
            print(f"== {script.name}", flush=True)
            before = record.tell()
            code = subprocess.run(
                [sys.executable, str(script)], cwd=HERE.parent, env={**os.environ, "BENCH_RESULTS": record.name}
            ).returncode
            record.seek(before)
            figures = [json.loads(line) for line in record.read().splitlines() if line.strip()]
            met += sum(1 for f in figures if f["passed"])
            total += len(figures)
            missed += [f"{script.stem}: {f['figure']}" for f in figures if not f["passed"]]
            if code != 0 and all(f["passed"] for f in figures):
                # A crash, or a failure the script did not state as a figure: a missed target too.
                total += 1
                missed.append(f"{script.stem}: exited {code} without a failed figure")
    for line in missed:
        print(f"FAIL {line}")
    print(f"bench: {met}/{total} targets met", flush=True)
    return 0 if total and met == total else 1


if __name__ == "__main__":
    sys.exit(main())
