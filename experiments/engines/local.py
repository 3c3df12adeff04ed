"""Local engine: processes on the server's own host, no image. The zero-dependency default for
trying aichor on a laptop. Each process runs detached under a tiny shell wrapper that records
its exit code in a file, so a restarted worker can still tell how it ended."""

import codecs
import contextlib
import fcntl
import ipaddress
import json
import os
import pty
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import termios
from pathlib import Path

from django.conf import settings

from experiments.engines.base import Cancelled, EngineError, ExecSession, ProcessState
from experiments.engines.single_host import (
    BUCKET_KINDS,
    Mount,
    ProcessSpec,
    SingleHostEngine,
    bucket_dir,
    described,
    held_back,
    shared_volume,
    tell_progress,
    to_start,
)
from experiments.workload import Volume, Workload

# Popen objects of processes this worker started, so finished children are reaped.
_children: dict[int, subprocess.Popen] = {}

WRAPPER = 'sh -c "$0" > "$1" 2>&1; code=$?; echo $code > "$2.tmp"; mv "$2.tmp" "$2"'

# All a local process inherits from the server: enough to find programs and keep the user's
# locale. Never more: the server's environment holds its secret key and database URL.
INHERITED_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TZ")
# The most output one logs() call reads: a workload printing gigabytes is stored in pieces.
LOG_BUDGET_BYTES = 4 * 1024 * 1024


class LocalEngine(SingleHostEngine):
    kind = "local"
    needs_image = False
    targets_key = "pids"

    def _root(self) -> Path:
        return Path(self.config.get("root") or settings.LOCAL_ENGINE_DIR)

    def image_exists(self, image: str) -> bool:
        return True

    def volume_path(self, volume: Volume) -> str:
        # Nothing to bind: processes on the server's host see the bucket folders themselves.
        return str(bucket_dir(volume)) if volume.kind in BUCKET_KINDS else volume.mount_point

    def mounts(self, workload: Workload) -> list[Mount]:
        return []

    def shared_path(self, workload: Workload, volume: Volume) -> str:
        # No mounts here: the processes find the shared volume through SHARED_VOLUME_VAR.
        return str(self._root() / workload.experiment_id / "shared")

    def warnings_for(self, workload: Workload) -> list[str]:
        warnings = super().warnings_for(workload)
        if shared_volume(workload):
            warnings.append(
                "sharedVolume: the local engine mounts nothing; the processes share the folder "
                f"{self.shared_path(workload, shared_volume(workload))} ($AICHOR_SHARED_VOLUME_PATH) instead"
            )
        resources = [g.resources for g in workload.groups if g.replicas]
        for asked, what in (
            (any(r.gpus or r.tpu for r in resources), "accelerators"),
            (any(r.extra_selectors for r in resources), "extraSelectors"),
            (any(r.extra_tolerations for r in resources), "extraTolerations"),
            (any(r.rdma for r in resources), "rdma"),
        ):
            if asked:
                warnings.append(f"the local engine runs processes on the server's own host: {what} ignored")
        return warnings

    def start(self, workload: Workload, processes: list[ProcessSpec], mounts: list[Mount], *, log, cancelled) -> dict:
        experiment_id = workload.experiment_id
        self.cleanup_experiment(experiment_id)
        root = self._root() / experiment_id
        root.mkdir(parents=True, exist_ok=True)
        if any(v.kind == "shared" for v in workload.volumes):
            (root / "shared").mkdir(exist_ok=True)
        cwd = self._code_dir(workload, root)
        (root / "cwd").write_text(str(cwd))
        path = self._path()
        if workload.operator == "kuberay":
            # Ray's session folder (logs, sockets, the address file) is the experiment's, not
            # the host's shared /tmp/ray, and only the server's user's: cleanup() removes it.
            shutil.rmtree(ray_dir(experiment_id), ignore_errors=True)
            try:
                ray_dir(experiment_id).mkdir(mode=0o700)
            except OSError as exc:
                raise EngineError(f"cannot make the Ray folder {ray_dir(experiment_id)}: {exc}") from None
            path["RAY_TMPDIR"] = str(ray_dir(experiment_id))
        pids = {}
        held = 0
        for proc in processes:
            if cancelled():
                self.cancel({"dir": str(root), "pids": pids})
                shutil.rmtree(root, ignore_errors=True)
                raise Cancelled()
            if held_back(proc, processes):
                # Not a process yet (so not one against the process limit): status() starts it
                # from its plan once an earlier completion of its job ends. The plan holds the
                # environment, secrets included: the server's user alone reads it.
                env = {**path, **proc.env}
                _write_private(root / f"{proc.name}.plan", json.dumps({"command": proc.command, "env": env}))
                pids[proc.name] = 0
                held += 1
                continue
            pids[proc.name] = _spawn(root, cwd, proc.name, proc.command, {**path, **proc.env})
            log(f"started {proc.name} as pid {pids[proc.name]}\n")
        if held:
            log(f"{held} completion(s) wait for their job's parallelisms\n")
        # With each process's role and decisiveness: find() must tell them again after a restart.
        lines = [f"{p.name} {pids[p.name]} {p.role or '-'} {int(p.decisive)} -\n" for p in processes]
        (root / "handle").write_text("".join(lines))
        plan = described(processes)
        (root / "queues.json").write_text(json.dumps(plan.get("queues", {})))
        return {"dir": str(root), "pids": pids, **plan}

    def ray_node_options(self, workload: Workload, node: int) -> dict[str, str]:
        # The nodes of a local Ray cluster share one session folder, where Ray names each node's
        # sockets by trying names in turn: nodes starting together took the same ones (and the
        # head died). So each node's are named here, in a folder short enough for a socket path.
        sockets = ray_dir(workload.experiment_id)
        return {
            "plasma-store-socket-name": f"{sockets}/node-{node}.plasma",
            "raylet-socket-name": f"{sockets}/node-{node}.raylet",
        }

    def _path(self) -> dict[str, str]:
        """PATH with the engine's `path` folders first (config: a list, or a string like PATH),
        so the processes find the programs of a virtualenv (Ray for kuberay manifests) without
        the server running in it; {} without any. spec.env's PATH still wins."""
        folders = self.config.get("path") or []
        if isinstance(folders, str):
            folders = folders.split(os.pathsep)
        folders = [str(folder) for folder in folders if folder]
        if not folders:
            return {}
        return {"PATH": os.pathsep.join([*folders, clean_environment()["PATH"]])}

    def _code_dir(self, workload: Workload, root: Path) -> Path:
        """builder.context inside the clone step's scratch folder (pipeline.common.workdir_of):
        processes start there, as they would in the image's working directory."""
        workdir = Path(settings.WORK_DIR) / workload.experiment_id
        if not workdir.is_dir():
            return root
        context = (workdir / (workload.context or ".")).resolve()
        if context != workdir.resolve() and workdir.resolve() not in context.parents:
            raise EngineError(f"builder.context {workload.context!r} points outside the repository")
        if not context.is_dir():
            raise EngineError(f"builder.context {workload.context!r} is not a folder of the repository")
        return context

    def find(self, experiment_id: str) -> dict | None:
        root = self._root() / experiment_id
        if not (root / "handle").exists():
            return None
        handle: dict = {"dir": str(root), "pids": {}, "roles": {}, "decisive": [], "after": {}}
        for line in (root / "handle").read_text().splitlines():
            name, pid, role, decisive, after = [*line.split(" "), "", "1", "-"][:5]
            handle["pids"][name] = int(pid)
            handle["roles"][name] = "" if role == "-" else role
            if decisive == "1":
                handle["decisive"].append(name)
            if after != "-":
                handle["after"][name] = after
        if (root / "queues.json").exists():
            handle["queues"] = json.loads((root / "queues.json").read_text()) or {}
        return handle

    def status(self, handle: dict) -> list[ProcessState]:
        root = Path(handle["dir"])
        states = []
        # A handle made before held-back completions were plans names, for each, the completion
        # its polling shell waited for.
        after = handle.get("after") or {}
        for name, pid in _pids(handle).items():
            exit_file = root / f"{name}.exit"
            if exit_file.exists():
                states.append(ProcessState(name, "exited", int(exit_file.read_text().strip() or -1)))
            elif not pid and (root / f"{name}.plan").exists():
                states.append(ProcessState(name, "pending"))
            elif not (pid and _alive(pid)):
                states.append(ProcessState(name, "missing"))
            elif name in after and not (root / f"{after[name]}.exit").exists():
                states.append(ProcessState(name, "pending"))
            else:
                states.append(ProcessState(name, "running"))
        if handle.get("queues"):
            self._advance(handle, states)
        return states

    def _advance(self, handle: dict, states: list[ProcessState]) -> None:
        """Start the held-back completions there is room for now (the watcher asks every
        interval, so the next starts at most an interval after one ended), under the
        experiment's lock: a second caller, or a cancel, must not race the start."""
        root = Path(handle["dir"])
        phases = {s.name: s.phase for s in states}
        names = [name for name in to_start(handle, phases) if not handle["pids"].get(name)]
        if names:
            with _locked(root):
                for name in names:
                    if (root / "stopped").exists() or _started_pid(root, name):
                        continue  # cancelled, or started by another caller meanwhile
                    try:
                        plan = json.loads((root / f"{name}.plan").read_text())
                        cwd = (root / "cwd").read_text()
                    except OSError:
                        continue  # cleaned up under us: reported missing next time
                    handle["pids"][name] = _spawn(root, Path(cwd), name, plan["command"], plan["env"])
                    phases[name] = "running"
        for state in states:
            state.phase = phases.get(state.name, state.phase)
        tell_progress(handle, states)

    def logs(self, handle: dict, process: str, cursor: int | None = None) -> tuple[list[str], int | None]:
        path = Path(handle["dir"]) / f"{process}.log"
        if not path.exists():
            return [], cursor
        with path.open("rb") as fh:
            fh.seek(cursor or 0)
            data = fh.read(LOG_BUDGET_BYTES)
        # Keep a partial last line for the next call.
        end = data.rfind(b"\n") + 1
        if not end:
            if len(data) < LOG_BUDGET_BYTES:
                return [], cursor
            # A single line longer than the budget is stored in pieces, cut between characters.
            decoder = codecs.getincrementaldecoder("utf-8")("replace")
            text = decoder.decode(data)
            return [text + "\n"], (cursor or 0) + len(data) - len(decoder.getstate()[0])
        return data[:end].decode("utf-8", "replace").splitlines(keepends=True), (cursor or 0) + end

    def final_logs(self, handle: dict, process: str, cursor: int | None) -> list[str]:
        """Like logs(), plus the unfinished last line of an exited process when the log ends there."""
        lines, cursor = self.logs(handle, process, cursor)
        path = Path(handle["dir"]) / f"{process}.log"
        if not path.exists():
            return lines
        with path.open("rb") as fh:
            fh.seek(cursor or 0)
            rest = fh.read(LOG_BUDGET_BYTES)
        if rest and b"\n" not in rest and len(rest) < LOG_BUDGET_BYTES:
            lines.append(rest.decode("utf-8", "replace") + "\n")
        return lines

    def exec(self, handle: dict, process: str, *, command: list[str], tty: bool = True) -> ExecSession:
        pid = _pids(handle).get(process)
        if not pid or not _alive(pid):
            raise EngineError(f"process {process} is not running")
        return LocalPtySession(command, cwd=handle["dir"], env=_environment_of(pid))

    def port_forward(self, handle: dict, process: str, port: int) -> ExecSession:
        """Local processes share the server's own network, so the server's loopback is theirs:
        only a port that one of the experiment's own processes listens on is forwarded, never
        the server's Redis or PostgreSQL."""
        if process not in handle.get("pids", {}):
            raise EngineError(f"no process named {process}")
        address = _listening_address(port, _process_tree(_pids(handle).values()))
        if address is None:
            raise EngineError(f"no process of this experiment listens on port {port}")
        try:
            sock = socket.create_connection((address, port), timeout=10)
        except OSError as exc:
            raise EngineError(f"nothing answers on port {port} in {process}: {exc.strerror or exc}") from None
        return LocalSocketSession(sock)

    def cancel(self, handle: dict) -> None:
        pids = handle.get("pids", {}).values()
        root = Path(handle["dir"]) if handle.get("dir") else None
        if root and root.is_dir():
            # Nothing held back starts after this (status() looks under the same lock), and the
            # ones started since the handle was recorded are killed with the rest.
            with _locked(root):
                (root / "stopped").touch()
                pids = _pids(handle).values()
        for pid in pids:
            if not pid:
                continue
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(pid, sig)
                except (ProcessLookupError, PermissionError):
                    break
            child = _children.pop(pid, None)
            if child:
                child.wait(timeout=5)

    def cleanup(self, handle: dict) -> None:
        shutil.rmtree(handle["dir"], ignore_errors=True)
        shutil.rmtree(ray_dir(Path(handle["dir"]).name), ignore_errors=True)


def ray_dir(experiment_id: str) -> Path:
    """A kuberay experiment's Ray folder: its sockets' paths must stay under 108 bytes."""
    return Path(tempfile.gettempdir()) / f"aichor-ray-{experiment_id}"


def _spawn(root: Path, cwd: Path, name: str, command: str, env: dict[str, str]) -> int:
    """Start one process detached, in its own session (cancel kills the group), and record its
    pid beside its log: a held-back completion's pid is not in the recorded handle."""
    child = subprocess.Popen(
        ["sh", "-c", WRAPPER, command, str(root / f"{name}.log"), str(root / f"{name}.exit")],
        cwd=str(cwd),
        env={**clean_environment(), **env},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    _children[child.pid] = child
    (root / f"{name}.pid").write_text(str(child.pid))
    return child.pid


def _started_pid(root: Path, name: str) -> int:
    try:
        return int((root / f"{name}.pid").read_text() or 0)
    except (OSError, ValueError):
        return 0


def _pids(handle: dict) -> dict[str, int]:
    """Every process's pid, 0 for a completion still held back: the recorded handle has 0 for
    every held-back one, whoever started it since."""
    root = Path(handle["dir"]) if handle.get("dir") else None
    return {name: pid or (_started_pid(root, name) if root else 0) for name, pid in (handle.get("pids") or {}).items()}


@contextlib.contextmanager
def _locked(root: Path):
    with open(root / "lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)


def _alive(pid: int) -> bool:
    child = _children.get(pid)
    if child is not None:
        return child.poll() is None
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _process_tree(roots) -> set[int]:
    """The experiment's processes: its wrappers' descendants and the members of their sessions
    (each wrapper leads one), so a daemonised child is still the experiment's."""
    roots = {int(pid) for pid in roots if pid and int(pid) > 1}
    parents: dict[int, int] = {}
    sessions: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # exited meanwhile
        parents[int(entry.name)], sessions[int(entry.name)] = int(fields[1]), int(fields[3])
    tree = {pid for pid in parents if pid in roots or sessions[pid] in roots}
    grew = True
    while grew:
        more = {pid for pid, parent in parents.items() if parent in tree and pid not in tree}
        tree |= more
        grew = bool(more)
    return tree


def _socket_inodes(pids: set[int]) -> set[str]:
    inodes = set()
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    return inodes


def _listening_address(port: int, pids: set[int]) -> str | None:
    """Where to connect to reach `port` when one of `pids` holds the listening socket: its own
    address (the wildcard as loopback), or None."""
    inodes = _socket_inodes(pids)
    for table, wildcard, loopback in (("tcp", "0.0.0.0", "127.0.0.1"), ("tcp6", "::", "::1")):
        try:
            with open(f"/proc/net/{table}") as fh:
                rows = fh.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            local, state, inode = fields[1], fields[3], fields[9]
            hex_address, _, hex_port = local.partition(":")
            if state != "0A" or int(hex_port, 16) != port or inode not in inodes:  # 0A: LISTEN
                continue
            address = _address(hex_address)
            return loopback if address == wildcard else address
    return None


def _address(hex_address: str) -> str:
    # /proc/net/tcp{,6} print addresses as native-endian 32-bit words.
    raw = bytes.fromhex(hex_address)
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4)) if sys.byteorder == "little" else raw
    return str(ipaddress.ip_address(words))


class LocalSocketSession(ExecSession):
    """A TCP connection the server opened itself (the port was checked to be the experiment's)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        sock.setblocking(False)

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            select.select([], [self.sock], [], 30)
            try:
                view = view[self.sock.send(view) :]
            except BlockingIOError:
                continue

    def write_nowait(self, data: bytes) -> int:
        try:
            return self.sock.send(data)
        except BlockingIOError:
            return 0

    def read(self, timeout: float | None = None) -> bytes | None:
        try:
            if timeout != 0 and not select.select([self.sock], [], [], timeout)[0]:
                return b""
            return self.sock.recv(65536) or None
        except BlockingIOError:
            return b""
        except (OSError, ValueError):
            return None

    def fileno(self) -> int | None:
        return self.sock.fileno()

    def resize(self, rows: int, cols: int) -> None:
        pass  # no TTY

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


def clean_environment() -> dict[str, str]:
    env = {name: os.environ[name] for name in INHERITED_ENV if os.environ.get(name)}
    env.setdefault("PATH", os.defpath)
    return env


def _environment_of(pid: int) -> dict[str, str]:
    """A terminal in a process sees that process's environment, not the server's."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as fh:
            pairs = [item.partition(b"=") for item in fh.read().split(b"\0") if item]
    except OSError:
        return clean_environment()
    return {key.decode(errors="replace"): value.decode(errors="replace") for key, _, value in pairs}


class LocalPtySession(ExecSession):
    def __init__(self, command: list[str], cwd: str, env: dict[str, str]) -> None:
        env = {**env, "TERM": "xterm-256color"}
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: become the shell
            os.chdir(cwd)
            os.execvpe(command[0], command, env)

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:  # a pty takes a large paste in pieces
            view = view[os.write(self.fd, view) :]

    def write_nowait(self, data: bytes) -> int:
        if not select.select([], [self.fd], [], 0)[1]:
            return 0
        # Writable: a pty takes at least its free space without blocking; one key always fits.
        return os.write(self.fd, data[:512])

    def read(self, timeout: float | None = None) -> bytes | None:
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            return b""
        try:
            return os.read(self.fd, 65536) or None
        except OSError:
            return None

    def resize(self, rows: int, cols: int) -> None:
        fcntl.ioctl(self.fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    def close(self) -> None:
        try:
            os.kill(self.pid, signal.SIGHUP)
            os.waitpid(self.pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        os.close(self.fd)
