"""Real Ray from PyPI for the KubeRay tests. For the docker engine, a Python image: no registry is
reachable, so a Debian root made by debootstrap is imported, then Ray is pip installed into it.
For the local engine, a virtualenv of the test's own Python. Each is named by a hash of what made
it, so a machine builds it once and reuses it."""

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.helpers import unavailable

RAY_VERSION = "2.23.0"  # what AIchor's public KubeRay demos pin
SUITE = "bookworm"
PACKAGES = "python3,python3-venv,ca-certificates"
# The host's CA bundle reaches PyPI however this machine's egress is set up; used by pip only.
RAY_DOCKERFILE = f"""FROM {{base}}
COPY ca.crt /tmp/ca.crt
RUN python3 -m venv /opt/ray && /opt/ray/bin/pip install --no-cache-dir --cert /tmp/ca.crt \\
    'ray[default]=={RAY_VERSION}' && rm /tmp/ca.crt
ENV PATH=/opt/ray/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
WORKDIR /app
"""
CA_BUNDLE = os.environ.get("PIP_CERT") or os.environ.get("SSL_CERT_FILE") or "/etc/ssl/certs/ca-certificates.crt"
_LOCK = Path(tempfile.gettempdir()) / "aichor-ray-image.lock"
RAY_REQUIREMENT = f"ray[default]=={RAY_VERSION}"
# Outside /tmp, which tests and benchmarks sweep: the venv is worth keeping between runs.
CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "aichor-test"


def _tag(repository: str, *parts: str) -> str:
    return f"{repository}:{hashlib.sha256(chr(0).join(parts).encode()).hexdigest()[:16]}"


def _exists(client, tag: str) -> bool:
    from docker.errors import ImageNotFound

    try:
        client.images.get(tag)
        return True
    except ImageNotFound:
        return False


def ray_image(client) -> str:
    """The tag of an image with python3 and `ray[default]`; built on first use."""
    base = _tag("aichor-test/python", SUITE, PACKAGES)
    dockerfile = RAY_DOCKERFILE.format(base=base)
    image = _tag("aichor-test/ray", dockerfile)
    with _LOCK.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _exists(client, image):
            return image
        if not _exists(client, base):
            _import_base(base)
        with tempfile.TemporaryDirectory() as context:
            Path(context, "Dockerfile").write_text(dockerfile)
            shutil.copy(CA_BUNDLE, Path(context, "ca.crt"))
            # pip reaches PyPI only through the host's network (no bridge here).
            done = subprocess.run(
                ["docker", "build", "--network", "host", "-t", image, context], capture_output=True, text=True
            )
            if done.returncode:
                unavailable(f"cannot build the Ray image: {done.stderr[-2000:]}")
    return image


def _import_base(tag: str) -> None:
    debootstrap = shutil.which("debootstrap") or "/usr/sbin/debootstrap"
    if not Path(debootstrap).exists():
        unavailable("debootstrap is not installed (apt-get install debootstrap)")
    with tempfile.TemporaryDirectory() as root:
        made = subprocess.run(
            [debootstrap, "--variant=minbase", f"--include={PACKAGES}", SUITE, root],
            capture_output=True,
            text=True,
        )
        if made.returncode:
            unavailable(f"debootstrap failed: {made.stdout[-2000:]}{made.stderr[-2000:]}")
        tar = subprocess.Popen(["tar", "-C", root, "-c", "."], stdout=subprocess.PIPE)
        subprocess.run(["docker", "import", "-", tag], stdin=tar.stdout, check=True, capture_output=True)
        tar.wait()


def ray_venv() -> Path:
    """A virtualenv with `ray[default]` for the local engine's processes (its `bin` goes first
    on their PATH); built on first use, keyed by the interpreter and the pinned requirement.
    A venv cannot be moved (its scripts name their interpreter), so it is built in place and
    marked complete last: a half-built one is built again."""
    venv = CACHE_DIR / _tag("ray-venv", sys.base_prefix, sys.version, RAY_REQUIREMENT).replace(":", "-")
    done = venv / ".complete"
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with (CACHE_DIR / "ray-venv.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if done.exists():
            return venv
        shutil.rmtree(venv, ignore_errors=True)
        made = subprocess.run([sys.executable, "-m", "venv", str(venv)], capture_output=True, text=True)
        if made.returncode:
            unavailable(f"cannot make the Ray virtualenv: {made.stderr[-2000:]}")
        installed = subprocess.run(
            [str(venv / "bin" / "pip"), "install", "--no-cache-dir", "--cert", CA_BUNDLE, RAY_REQUIREMENT],
            capture_output=True,
            text=True,
        )
        if installed.returncode:
            shutil.rmtree(venv, ignore_errors=True)
            unavailable(f"cannot pip install {RAY_REQUIREMENT}: {installed.stdout[-1000:]}{installed.stderr[-2000:]}")
        done.write_text(RAY_REQUIREMENT)
    return venv
