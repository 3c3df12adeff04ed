"""`aichor local-repo init`: a minimal project that runs as it is on a docker engine."""

from pathlib import Path

DEFAULT_BASE_IMAGE = "python:3.12-slim"

DOCKERFILE = """\
FROM {base_image}
WORKDIR /app
# Install dependencies first so code edits do not invalidate this layer.
COPY src/ /app/src/
RUN if [ -s /app/src/requirements.txt ] && command -v pip >/dev/null; then pip install --no-cache-dir -r /app/src/requirements.txt; fi
"""

MANIFEST = """\
kind: AIchorManifest
apiVersion: 0.2.3

builder:
  image: {name}
  dockerfile: ./Dockerfile
  context: .

spec:
  operator: batch
  image: {name}
  command: "sh src/run.sh"
  types:
    worker:
      count: 1
      resources:
        cpus: 1
        ramRatio: 2
"""

RUN_SH = """\
#!/bin/sh
# The experiment's entry point. AICHOR_OUTPUT_PATH, AICHOR_INPUT_PATH and AICHOR_EXPERIMENT_ID
# are set by aichor.
set -e
if command -v python3 >/dev/null 2>&1; then
  exec python3 -u src/main.py "$@"
fi
echo "hello from aichor experiment $AICHOR_EXPERIMENT_ID (this image has no python3)"
"""

MAIN_PY = """\
import os

print(f"hello from aichor experiment {os.environ.get('AICHOR_EXPERIMENT_ID')}")
print(f"write results under {os.environ.get('AICHOR_OUTPUT_PATH')}")
"""

GITIGNORE = "__pycache__/\n*.pyc\n.venv/\n"


def init_repo(directory: Path, base_image: str) -> list[str]:
    """Write the files; refuse to overwrite any that exist. Returns what was written."""
    name = "".join(c if c.isalnum() or c in "-_" else "-" for c in directory.resolve().name.lower()) or "experiment"
    files = {
        "Dockerfile": DOCKERFILE.format(base_image=base_image),
        "aichor_manifests/manifest.yaml": MANIFEST.format(name=name),
        "src/run.sh": RUN_SH,
        "src/main.py": MAIN_PY,
        "src/requirements.txt": "",
        ".gitignore": GITIGNORE,
    }
    existing = [rel for rel in files if (directory / rel).exists()]
    if existing:
        raise FileExistsError(f"{directory / existing[0]} already exists")
    for rel, text in files.items():
        path = directory / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    (directory / "src/run.sh").chmod(0o755)
    return list(files)
