"""`make bench`: run every benchmark script in this folder, each in its own process, and print
their figures. A failing benchmark is reported and the others still run."""

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ORDER = ["pipeline_overhead.py", "list_page.py", "upload.py", "datasets.py", "terminal_rtt.py", "logs.py"]


def main() -> int:
    scripts = [HERE / name for name in ORDER if (HERE / name).exists()]
    scripts += sorted(p for p in HERE.glob("*.py") if p.name not in ORDER and not p.name.startswith(("_", "run_all")))
    if len(sys.argv) > 1:
        scripts = [s for s in scripts if s.stem in sys.argv[1:]]
    failed = []
    for script in scripts:
        print(f"== {script.name}", flush=True)
        if subprocess.run([sys.executable, str(script)], cwd=HERE.parent).returncode != 0:
            failed.append(script.name)
    if failed:
        print("failed: " + ", ".join(failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
