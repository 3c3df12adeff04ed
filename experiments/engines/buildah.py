"""Image builds with build secrets on a Docker host.

The Docker Engine's classic builder has no secret mounts, and BuildKit is not packaged in
Debian 12. buildah is, and reads the same `RUN --mount=type=secret,id=...` syntax. So a build
with secrets runs with buildah on the worker host: its base images come from the Docker Engine
(the engine's images are the truth: it pulls with its own registry credentials), and the result
is copied back into the Docker Engine, which then runs it like any other image.

The secrets reach buildah as one file (id `_env`, a `.env` of `KEY="value"` lines) that only
exists, private, for the duration of the build; a secret mount is never committed to a layer.
"""

import os
import re
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

from docker.errors import APIError, DockerException, ImageNotFound, NotFound

from experiments.engines.base import Cancelled, EngineError

SECRET_ID = "_env"
MASK = "******"
# buildah stops the RUN container and removes its working containers on SIGTERM; SIGKILL
# would leave both behind, so it is only the fallback.
TERMINATE_GRACE = 10.0

_VARIABLE = re.compile(r"\$(?:\{(\w+)\}|(\w+))")


def dotenv(secrets: dict[str, str]) -> str:
    """`KEY="value"` lines, escaped the way dotenv parsers (python-dotenv, godotenv, compose)
    read double-quoted values back: a quote or newline inside a value cannot end the line."""
    lines = []
    for name, value in secrets.items():
        escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\r", "\\r").replace("\n", "\\n")
        lines.append(f'{name}="{escaped}"\n')
    return "".join(lines)


class Masker:
    """Replaces secret values in build output: a second line of defence should a Dockerfile
    print one (`cat /etc/secrets/.env`)."""

    def __init__(self, secrets: dict[str, str]) -> None:
        needles = set()
        for value in secrets.values():
            # The raw value, the form it has in the .env file, and each line of a multi-line
            # value (output is masked line by line).
            needles.update({value, dotenv({"_": value})[3:-2], *value.splitlines()})
        # Longest first: a secret containing another must be masked whole.
        self.needles = sorted((n for n in needles if n.strip()), key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for needle in self.needles:
            text = text.replace(needle, MASK)
        return text


def _instructions(text: str) -> list[list[str]]:
    """The Dockerfile's instructions as word lists, continuation lines joined, comments dropped."""
    instructions, current = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        instructions.append((current + stripped).split())
        current = ""
    if current.strip():
        instructions.append(current.split())
    return instructions


def external_images(text: str, build_args: dict[str, str]) -> tuple[list[str], list[str]]:
    """Images a Dockerfile reads that are not its own stages: FROM, COPY --from and
    RUN --mount=...,from=. Returns (images, references that build args could not resolve)."""
    args: dict[str, str] = {}
    stages: set[str] = set()
    refs: list[str] = []
    seen_from = False
    for words in _instructions(text):
        op, rest = words[0].upper(), words[1:]
        if op == "ARG" and not seen_from:
            # Only ARGs before the first FROM may be used in FROM lines.
            for word in rest:
                name, has_default, default = word.partition("=")
                if name in build_args:
                    args[name] = build_args[name]
                elif has_default:
                    args[name] = default.strip("\"'")
        elif op == "FROM":
            seen_from = True
            plain = [w for w in rest if not w.startswith("--")]
            if plain:
                refs.append(plain[0])
            if len(plain) >= 3 and plain[1].upper() == "AS":
                stages.add(plain[2].lower())
        elif op in ("COPY", "ADD", "RUN"):
            for word in rest:
                if not word.startswith("--"):
                    break
                if word.startswith("--from="):
                    refs.append(word.removeprefix("--from="))
                elif word.startswith("--mount="):
                    options = dict(p.partition("=")[::2] for p in word.removeprefix("--mount=").split(","))
                    if options.get("from"):
                        refs.append(options["from"])
    images, unresolved = [], []
    for ref in refs:
        expanded = _VARIABLE.sub(lambda m: args.get(m.group(1) or m.group(2), m.group(0)), ref)
        if "$" in expanded:
            unresolved.append(ref)
        elif expanded.lower() in stages or expanded.isdigit() or expanded == "scratch":
            continue
        elif expanded not in images:
            images.append(expanded)
    return images, unresolved


def with_tag(image: str) -> str:
    """The docker-daemon transport needs a tag or a digest; Docker's default tag is latest."""
    if "@" in image or ":" in image.rsplit("/", 1)[-1]:
        return image
    return f"{image}:latest"


class _Runner:
    """Runs buildah commands, streaming masked output lines into the step log and stopping
    them when the experiment is cancelled."""

    def __init__(self, docker_host: str, log: Callable[[str], None], cancelled: Callable[[], bool], mask: Masker):
        self.log, self.cancelled, self.mask = log, cancelled, mask
        # The docker-daemon transport must talk to the engine's daemon, not the default socket.
        self.env = {**os.environ, "DOCKER_HOST": docker_host}

    def run(self, args: list[str], *, quiet: bool = False) -> tuple[int, str]:
        """The exit code and (masked) output; the output is logged unless `quiet`."""
        proc = subprocess.Popen(
            ["buildah", *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=self.env,
        )
        output: list[str] = []

        def read() -> None:
            for raw in proc.stdout:
                line = self.mask(raw.decode("utf-8", "replace"))
                output.append(line)
                if not quiet:
                    self.log(line)

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        try:
            while reader.is_alive():
                reader.join(0.3)
                if reader.is_alive() and self.cancelled():
                    proc.terminate()
                    try:
                        proc.wait(TERMINATE_GRACE)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                    raise Cancelled()
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            reader.join(5)
        return proc.returncode, "".join(output)


def build(
    *,
    docker_api,
    docker_host: str,
    context_dir: str,
    dockerfile: str,
    tag: str,
    build_args: dict[str, str],
    target: str | None,
    secrets: dict[str, str],
    log: Callable[[str], None],
    cancelled: Callable[[], bool],
    network: str = "none",
) -> str:
    """Build `tag` with buildah, the secrets mounted as `_env`, and load it into the Docker
    Engine behind `docker_api` (a docker.APIClient). `network` is the Docker engine's: `host`
    and `none` mean the same to buildah; a Docker network name (`bridge`) becomes buildah's own
    isolated namespace, since buildah runs on the worker and knows no Docker network."""
    if not shutil.which("buildah"):
        raise EngineError("build secrets need buildah on the worker host (apt-get install buildah)")
    mask = Masker(secrets)
    runner = _Runner(docker_host, log, cancelled, mask)
    log("build secrets present: building with buildah (secret id _env)\n")
    text = Path(context_dir, dockerfile).read_text(errors="replace")
    images, unresolved = external_images(text, build_args)
    for ref in unresolved:
        log(f"cannot tell which image {ref} is before the build: it must already be known to buildah\n")
    for image in images:
        _provide_base_image(docker_api, runner, with_tag(image))

    fd, env_file = tempfile.mkstemp(prefix="aichor-secrets-", suffix=".env")  # created 0600
    iid_fd, iid_file = tempfile.mkstemp(prefix="aichor-iid-")
    os.close(iid_fd)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(dotenv(secrets))
        args = [
            "bud",
            "--layers",
            # Base images were copied from the Docker Engine above: buildah must not reach for
            # a registry (unreachable here, and without the engine's credentials anyway).
            "--pull=never",
            f"--network={network if network in ('host', 'none') else 'private'}",
            "--force-rm",
            f"--secret=id={SECRET_ID},src={env_file}",
            f"--iidfile={iid_file}",
            "--file",
            os.path.join(context_dir, dockerfile),
        ]
        for name, value in (build_args or {}).items():
            args += ["--build-arg", f"{name}={value}"]
        if target:
            args += ["--target", target]
        code, _ = runner.run([*args, context_dir])
        if code != 0:
            raise EngineError(f"buildah build failed (exit code {code})")
        image_id = Path(iid_file).read_text().strip().removeprefix("sha256:")
    finally:
        os.unlink(env_file)
        os.unlink(iid_file)
    log(f"loading {tag} into the Docker Engine\n")
    code, output = runner.run(["push", "--quiet", image_id, f"docker-daemon:{tag}"], quiet=True)
    if code != 0:
        raise EngineError(f"could not load the image into the Docker Engine: {output.strip()}")
    log(f"Successfully built {image_id[:12]} with buildah\nSuccessfully tagged {tag}\n")
    return tag


def _provide_base_image(docker_api, runner: _Runner, image: str) -> None:
    """Make buildah's copy of `image` the one the Docker Engine has (pulling it into the engine
    first when it lacks it). Skipped when buildah already holds the same image id: copying a
    multi-GB base out of the daemon costs more than the build."""
    try:
        docker_id = docker_api.inspect_image(image)["Id"]
    except (ImageNotFound, NotFound):
        runner.log(f"pulling {image} into the Docker Engine\n")
        try:
            docker_api.pull(image)
            docker_id = docker_api.inspect_image(image)["Id"]
        except (APIError, DockerException) as exc:
            raise EngineError(
                f"base image {image} is not in the Docker Engine and cannot be pulled: "
                f"{getattr(exc, 'explanation', None) or exc}"
            ) from None
    code, known = runner.run(["inspect", "--type", "image", "--format", "{{.FromImageID}}", image], quiet=True)
    if code == 0 and known.strip() and docker_id.endswith(known.strip()):
        return
    runner.log(f"copying base image {image} from the Docker Engine to buildah\n")
    code, output = runner.run(["pull", "--quiet", f"docker-daemon:{image}"], quiet=True)
    if code != 0:
        raise EngineError(f"could not copy base image {image} from the Docker Engine: {output.strip()}")
