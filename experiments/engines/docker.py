"""Docker engine: every process of an experiment is one container on a single Docker host,
labelled with the experiment id so it can always be found again (reconcile, cancel)."""

import hashlib
import json
import os
import select
import socket
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import docker
from docker.errors import APIError, DockerException, ImageNotFound, NotFound
from docker.types import DeviceRequest
from docker.types import Mount as DockerMount

from experiments.engines import buildah
from experiments.engines.base import Cancelled, Engine, EngineError, ExecSession, ProcessSpec, ProcessState

LABEL = "aichor.experiment"
BUILD_KEY_LABEL = "aichor.build-key"
# `docker info` is slow (tens of ms); cores, memory and runtimes do not change between steps.
_INFO_CACHE: dict[str, tuple[float, dict]] = {}
INFO_TTL = 60.0
PROCESS_LABEL = "aichor.process"
HOLD_LABEL = "aichor.hold"  # containers and images made for a debug hold


def parse_ts_ns(stamp: str) -> int:
    """Docker's RFC 3339 nano timestamp as integer nanoseconds (floats lose the last digits)."""
    main, _, frac = stamp.rstrip("Z").partition(".")
    seconds = int(datetime.strptime(main, "%Y-%m-%dT%H:%M:%S").replace(tzinfo=UTC).timestamp())
    return seconds * 1_000_000_000 + int((frac or "0").ljust(9, "0")[:9])


class DockerEngine(Engine):
    kind = "docker"

    def __init__(self, config: dict | None = None) -> None:
        super().__init__(config)
        self._client: docker.DockerClient | None = None

    @property
    def base_url(self) -> str:
        return self.config.get("docker_host") or os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"

    @property
    def client(self) -> docker.DockerClient:
        if self._client is None:
            try:
                self._client = docker.DockerClient(base_url=self.base_url, timeout=120)
            except DockerException as exc:
                raise EngineError(f"cannot reach the Docker Engine: {exc}") from None
        return self._client

    # --- build -------------------------------------------------------------------------
    def build(self, *, context_dir, dockerfile, tag, build_args, target, secrets, log, cancelled) -> str:
        if secrets:
            # The classic builder has no secret mounts (and BuildKit is not packaged in Debian 12):
            # buildah builds it with the secrets mounted, then loads it into this engine.
            return buildah.build(
                docker_api=self.client.api,
                docker_host=self.base_url,
                context_dir=context_dir,
                dockerfile=dockerfile,
                tag=tag,
                build_args=build_args,
                target=target,
                secrets=secrets,
                log=log,
                cancelled=cancelled,
            )
        key = self._build_key(context_dir, dockerfile, build_args, target)
        if key:
            cached = self.client.api.images(filters={"label": f"{BUILD_KEY_LABEL}={key}"}, quiet=True)
            if cached:
                # Same code, Dockerfile, build args and base images: exactly what Docker's own
                # layer cache would reuse, without sending the context again.
                self.client.api.tag(cached[0], *tag.rsplit(":", 1))
                log(f"reusing cached image {cached[0][:19]}: same code, Dockerfile, build args and base images\n")
                return tag
        api = docker.APIClient(base_url=self.base_url, version=self.client.api.api_version, timeout=None)
        stream = api.build(
            path=context_dir,
            dockerfile=dockerfile,
            tag=tag,
            buildargs=build_args or None,
            target=target or None,
            decode=True,
            rm=True,
            forcerm=True,
            pull=False,
            network_mode="host",
            labels={BUILD_KEY_LABEL: key} if key else None,
        )
        outcome: dict = {}

        def read() -> None:
            try:
                for chunk in stream:
                    if "stream" in chunk:
                        log(chunk["stream"])
                    elif "error" in chunk:
                        outcome["error"] = chunk.get("errorDetail", {}).get("message") or chunk["error"]
                        log(outcome["error"] + "\n")
                    elif "status" in chunk:
                        log(chunk["status"] + "\n")
                    if chunk.get("aux", {}).get("ID"):
                        outcome["image_id"] = chunk["aux"]["ID"]
            except Exception as exc:  # a closed socket after cancel lands here too
                outcome.setdefault("error", f"build stream failed: {exc}")

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        while reader.is_alive():
            reader.join(0.3)
            if reader.is_alive() and cancelled():
                _abort_stream(stream)
                reader.join(10)
                api.close()
                raise Cancelled()
        api.close()
        if "error" in outcome:
            raise EngineError(outcome["error"])
        return tag

    def _build_key(self, context_dir: str, dockerfile: str, build_args: dict, target: str | None) -> str | None:
        """A digest of everything a classic build depends on, or None when it cannot be known
        (a base image that is not local, a FROM computed from build args)."""
        root = Path(context_dir)
        digest = hashlib.sha256()
        bases = []
        for line in (root / dockerfile).read_text(errors="replace").splitlines():
            words = line.split()
            if not words or words[0].upper() != "FROM":
                continue
            image = next((w for w in words[1:] if not w.startswith("--")), "")
            if "$" in image or not image:
                return None
            if image.lower() in bases or image == "scratch":
                bases.append(image.lower())
                continue
            try:
                bases.append(self.client.api.inspect_image(image)["Id"])
            except (ImageNotFound, NotFound):
                return None
        digest.update(json.dumps([dockerfile, sorted((build_args or {}).items()), target, bases]).encode())
        for path in sorted(root.rglob("*")):
            if ".git" in path.relative_to(root).parts:
                continue
            info = path.lstat()
            digest.update(f"{path.relative_to(root)}\0{info.st_mode}\0".encode())
            if path.is_symlink():
                digest.update(os.readlink(path).encode())
            elif path.is_file():
                with path.open("rb") as fh:
                    for block in iter(lambda: fh.read(1 << 20), b""):
                        digest.update(block)
        return digest.hexdigest()

    def image_exists(self, image: str) -> bool:
        try:
            self.client.images.get(image)
            return True
        except ImageNotFound:
            return False

    # --- run -----------------------------------------------------------------------------
    def warnings_for(self, processes: list[ProcessSpec]) -> list[str]:
        warnings = set()
        for proc in processes:
            res = proc.resources or {}
            if res.get("tpu"):
                warnings.add("a Docker host has no TPUs: accelerators.tpu ignored")
            if res.get("extraSelectors"):
                warnings.add("a Docker host has no node selectors: extraSelectors ignored")
            if res.get("extraTolerations"):
                warnings.add("a Docker host has no tolerations: extraTolerations ignored")
            if res.get("rdma"):
                warnings.add("RDMA devices are not passed through on a Docker host: rdma ignored")
            if (res.get("gpu") or {}).get("count") and not self._has_gpu_runtime():
                warnings.add("this Docker host has no NVIDIA runtime: GPUs ignored")
        return sorted(warnings)

    def _info(self) -> dict:
        cached = _INFO_CACHE.get(self.base_url)
        if cached and time.monotonic() - cached[0] < INFO_TTL:
            return cached[1]
        info = self.client.info()
        _INFO_CACHE[self.base_url] = (time.monotonic(), info)
        return info

    def _has_gpu_runtime(self) -> bool:
        try:
            return "nvidia" in (self._info().get("Runtimes") or {})
        except DockerException:
            return False

    def _host_limits(self) -> tuple[int, int]:
        info = self._info()
        return int(info.get("NCPU") or os.cpu_count() or 1), int(info.get("MemTotal") or 0)

    def submit(self, *, experiment_id, image, processes, mounts, workdir, log) -> dict:
        # A retried submit must not start twins.
        self.cleanup_experiment(experiment_id)
        ncpu, _mem = self._host_limits()
        gpu_ok = self._has_gpu_runtime()
        containers = {}
        try:
            for proc in processes:
                res = proc.resources or {}
                kwargs: dict = {}
                cpus = float(res.get("cpus") or 0) * float(res.get("cpuLimitRatio") or 1)
                if cpus:
                    # The daemon refuses a limit above the host's cores; a laptop still runs it.
                    kwargs["nano_cpus"] = int(min(cpus, ncpu) * 1e9)
                if res.get("memoryGB"):
                    kwargs["mem_limit"] = int(float(res["memoryGB"]) * 1024**3)
                if res.get("shmSizeGB"):
                    kwargs["shm_size"] = int(float(res["shmSizeGB"]) * 1024**3)
                gpus = (res.get("gpu") or {}).get("count") or 0
                if gpus and gpu_ok:
                    kwargs["device_requests"] = [DeviceRequest(count=int(gpus), capabilities=[["gpu"]])]
                # The low-level API: the high-level one inspects after every call.
                api = self.client.api
                name = f"aichor-{experiment_id[:8]}-{proc.name}-{os.urandom(2).hex()}"
                host_config = api.create_host_config(
                    network_mode="host",
                    mounts=[DockerMount(m.target, m.source, type="bind", read_only=m.read_only) for m in mounts],
                    **kwargs,
                )
                created = api.create_container(
                    image,
                    entrypoint=["/bin/sh", "-c"],
                    command=[proc.command],
                    name=name,
                    labels={LABEL: experiment_id, PROCESS_LABEL: proc.name},
                    environment=proc.env,
                    host_config=host_config,
                    detach=True,
                )
                containers[proc.name] = created["Id"]
                log(f"created container {name} for {proc.name}\n")
            for name, cid in containers.items():
                self.client.api.start(cid)
                log(f"started {name}\n")
        except (APIError, DockerException) as exc:
            handle = {"containers": containers}
            self.cancel(handle)
            self.cleanup(handle)
            raise EngineError(f"could not start the containers: {_explain(exc)}") from None
        return {"containers": containers}

    def find(self, experiment_id: str) -> dict | None:
        found = self.client.api.containers(all=True, filters={"label": f"{LABEL}={experiment_id}"})
        if not found:
            return None
        return {"containers": {c["Labels"].get(PROCESS_LABEL, c["Id"]): c["Id"] for c in found}}

    def status(self, handle: dict) -> list[ProcessState]:
        states = []
        for name, cid in handle.get("containers", {}).items():
            try:
                attrs = self.client.api.inspect_container(cid)["State"]
            except NotFound:
                states.append(ProcessState(name, "missing"))
                continue
            status = attrs.get("Status")
            if status in ("exited", "dead"):
                states.append(ProcessState(name, "exited", int(attrs.get("ExitCode", -1))))
            elif status == "created":
                states.append(ProcessState(name, "pending"))
            else:
                states.append(ProcessState(name, "running"))
        return states

    def logs(self, handle: dict, process: str, cursor: int | None = None) -> tuple[list[str], int | None]:
        """New output lines of a process since `cursor` (nanoseconds of the last line seen)."""
        cid = handle.get("containers", {}).get(process)
        if not cid:
            return [], cursor
        # One second of overlap, then drop what was seen: `since` has second-ish precision.
        since = max(cursor / 1e9 - 1, 0.000001) if cursor else None
        try:
            raw = self.client.api.logs(cid, stdout=True, stderr=True, timestamps=True, since=since)
        except NotFound:
            return [], cursor
        lines = []
        for line in raw.decode("utf-8", "replace").splitlines(keepends=True):
            stamp, _, text = line.partition(" ")
            try:
                ns = parse_ts_ns(stamp)
            except ValueError:
                lines.append(line)
                continue
            if cursor is not None and ns <= cursor:
                continue
            cursor = ns
            lines.append(text if text.endswith("\n") else text + "\n")
        return lines, cursor

    def exec(self, handle: dict, process: str, *, command: list[str], tty: bool = True) -> ExecSession:
        cid = handle.get("containers", {}).get(process)
        if not cid:
            raise EngineError(f"no process named {process}")
        try:
            exec_id = self.client.api.exec_create(
                cid, command, stdin=True, tty=tty, stdout=True, stderr=True, environment={"TERM": "xterm-256color"}
            )["Id"]
            sock = self.client.api.exec_start(exec_id, tty=tty, socket=True)
        except (APIError, DockerException) as exc:
            raise EngineError(f"cannot open a shell: {_explain(exc)}") from None
        return DockerExecSession(self.client.api, exec_id, sock)

    def cancel(self, handle: dict) -> None:
        for cid in handle.get("containers", {}).values():
            try:
                self.client.api.kill(cid)
            except (NotFound, APIError):
                pass  # already gone or already stopped

    def hold(self, handle: dict, seconds: float) -> dict:
        """An exited container cannot be exec'd into, and restarting it would rerun the workload.
        So each exited process's container is committed to a temporary image (its files as the
        process left them) and a sibling is started from it with the same environment, mounts,
        working directory and labels, running only `sleep` for the hold; the sibling takes the
        process's place in the handle, so the terminal opens "in the failed container". Processes
        still running are kept as they are. The sleep ends the sibling on its own should every
        cleanup path be lost; images and originals are listed in the handle for cleanup."""
        held = {**handle, "containers": dict(handle.get("containers", {}))}
        originals, images = list(handle.get("held_originals", [])), list(handle.get("hold_images", []))
        try:
            for name, cid in handle.get("containers", {}).items():
                try:
                    container = self.client.containers.get(cid)
                except NotFound:
                    continue
                if container.status not in ("exited", "dead"):
                    continue
                experiment_id = container.labels.get(LABEL, "")
                image = container.commit(
                    repository=f"aichor-hold/{experiment_id[:8]}-{name}",
                    tag=os.urandom(3).hex(),
                    # A commit inherits the image's labels: blank the build key, or a later
                    # build of the same code would "reuse" this snapshot of a failed run.
                    changes=[f'LABEL {HOLD_LABEL}={experiment_id} {BUILD_KEY_LABEL}=""'],
                )
                images.append(image.id)
                config = container.attrs["Config"]
                sibling = self.client.containers.create(
                    image.id,
                    entrypoint=["sleep"],
                    command=[str(int(seconds) + 60)],
                    name=f"aichor-{experiment_id[:8]}-{name}-held-{os.urandom(2).hex()}",
                    labels={LABEL: experiment_id, PROCESS_LABEL: name, HOLD_LABEL: experiment_id},
                    environment=config.get("Env") or [],
                    working_dir=config.get("WorkingDir") or None,
                    network_mode="host",
                    mounts=[
                        DockerMount(m["Destination"], m["Source"], type="bind", read_only=not m.get("RW", True))
                        for m in container.attrs.get("Mounts") or []
                        if m.get("Type") == "bind"
                    ],
                    detach=True,
                )
                sibling.start()
                originals.append(cid)
                held["containers"][name] = sibling.id
        except (APIError, DockerException) as exc:
            self.cleanup({"containers": {}, "held_originals": [], "hold_images": images})
            raise EngineError(f"could not hold the failed containers: {_explain(exc)}") from None
        held["held_originals"], held["hold_images"] = originals, images
        return held

    def cleanup(self, handle: dict) -> None:
        for cid in [*handle.get("containers", {}).values(), *handle.get("held_originals", [])]:
            try:
                self.client.api.remove_container(cid, force=True)
            except NotFound:
                pass
        for image in handle.get("hold_images", []):
            try:
                self.client.api.remove_image(image, force=True)
            except (NotFound, APIError):
                pass  # gone already, or still used by a container a racing cleanup removes

    def cleanup_experiment(self, experiment_id: str) -> None:
        # Every labelled container, not find()'s one-per-process view: a held process has two.
        for found in self.client.api.containers(all=True, filters={"label": f"{LABEL}={experiment_id}"}):
            try:
                self.client.api.remove_container(found["Id"], force=True)
            except NotFound:
                pass
        for image in self.client.images.list(filters={"label": f"{HOLD_LABEL}={experiment_id}"}):
            try:
                self.client.api.remove_image(image.id, force=True)
            except (NotFound, APIError):
                pass


class DockerExecSession(ExecSession):
    def __init__(self, api, exec_id: str, sock) -> None:
        self.api = api
        self.exec_id = exec_id
        # exec_start(socket=True) gives a SocketIO wrapper; the raw socket allows timeouts.
        self.sock = getattr(sock, "_sock", sock)
        # One fixed timeout, for writes only: reads wait in select, so a reader on another thread
        # (or an event loop) never changes how a concurrent write blocks.
        self.sock.settimeout(30)
        self._closed = False

    def write(self, data: bytes) -> None:
        self.sock.sendall(data)

    def write_nowait(self, data: bytes) -> int:
        if hasattr(self.sock, "pending"):
            return 0  # TLS: bytes must go through the SSL object
        try:
            # The descriptor is non-blocking (settimeout), and a bare write skips the readiness
            # poll a socket with a timeout makes before every send.
            return os.write(self.sock.fileno(), data)
        except BlockingIOError:
            return 0

    def read(self, timeout: float | None = None) -> bytes | None:
        pending = getattr(self.sock, "pending", None)  # TLS (tcp DOCKER_HOST) buffers decrypted bytes
        if timeout == 0 and pending is None:
            # The event loop saw the descriptor readable: one read, no select and poll first.
            try:
                return os.read(self.sock.fileno(), 65536) or None
            except BlockingIOError:
                return b""
            except (OSError, ValueError):
                return None
        try:
            if not (pending and pending()) and not select.select([self.sock], [], [], timeout)[0]:
                return b""
            data = self.sock.recv(65536)
        except (TimeoutError, BlockingIOError):
            return b""
        except (OSError, ValueError):  # ValueError: select on a socket closed meanwhile
            return None
        return data or None

    def fileno(self) -> int | None:
        # TLS sockets can hold decrypted bytes the descriptor does not show: readers poll them.
        return None if hasattr(self.sock, "pending") else self.sock.fileno()

    def resize(self, rows: int, cols: int) -> None:
        try:
            self.api.exec_resize(self.exec_id, height=rows, width=cols)
        except APIError:
            pass  # the shell may be gone; the next read reports the end

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self.sock.close()


def _abort_stream(stream) -> None:
    """Cut the build's HTTP connection: the daemon cancels a classic build whose client left."""
    frame = getattr(stream, "gi_frame", None)
    response = frame.f_locals.get("response") if frame else None
    conn = getattr(getattr(response, "raw", None), "_connection", None) or getattr(
        getattr(response, "raw", None), "_fp", None
    )
    sock = getattr(conn, "sock", None)
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
    if response is not None:
        response.close()


def _explain(exc: Exception) -> str:
    return getattr(exc, "explanation", None) or str(exc)
