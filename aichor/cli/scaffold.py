"""`aichor local-repo init`: a minimal project that runs as it is on a docker engine."""

from pathlib import Path

DEFAULT_BASE_IMAGE = "python:3.12-slim"

DOCKERFILE = """\
FROM {base_image}
WORKDIR /app
# Dependencies first, in layers of their own: a code edit reuses them instead of reinstalling.
COPY src/requirements.txt /app/src/requirements.txt
RUN if [ -s /app/src/requirements.txt ] && command -v pip >/dev/null; then pip install --no-cache-dir -r /app/src/requirements.txt; fi
COPY . /app/
"""

MANIFEST = """\
kind: AIchorManifest
apiVersion: 0.2.3

builder:
  image: {name}
  dockerfile: ./Dockerfile
  context: .

spec:
  operator: {operator}
  image: {name}
  command: "sh src/run.sh"
  types:
{types}"""

# The operators AIchor offers today (its legacy `tf` still runs, but is not for new code), first
# the default: AIchor's own minimal manifest is a jobset.
OPERATORS = ("jobset", "jax", "pytorch", "xgboost", "kuberay")
RESOURCES = "{indent}resources:\n{indent}  cpus: {cpus}\n{indent}  ramRatio: {ram_ratio}\n"


def manifest_types(operator: str, count: int, cpus: int, ram_ratio: float) -> str:
    """The `types` block for `operator`: `count` processes (KubeRay: worker nodes beside the
    head) of `cpus` CPUs and `ram_ratio` GB per CPU each."""
    ram = int(ram_ratio) if float(ram_ratio).is_integer() else ram_ratio
    if operator == "kuberay":
        head = "    Head:\n" + RESOURCES.format(indent="      ", cpus=cpus, ram_ratio=ram)
        pool = RESOURCES.format(indent="        ", cpus=cpus, ram_ratio=ram)
        return f"{head}    Workers:\n      - name: workers\n        count: {count}\n{pool}"
    return f"    worker:\n      count: {count}\n" + RESOURCES.format(indent="      ", cpus=cpus, ram_ratio=ram)


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


def init_repo(
    directory: Path,
    base_image: str,
    *,
    operator: str = OPERATORS[0],
    count: int = 1,
    cpus: int = 1,
    ram_ratio: float = 2,
) -> list[str]:
    """Write the files; refuse to overwrite any that exist. Returns what was written."""
    name = "".join(c if c.isalnum() or c in "-_" else "-" for c in directory.resolve().name.lower()) or "experiment"
    types = manifest_types(operator, count, cpus, ram_ratio)
    files = {
        "Dockerfile": DOCKERFILE.format(base_image=base_image),
        "aichor_manifests/manifest.yaml": MANIFEST.format(name=name, operator=operator, types=types),
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
