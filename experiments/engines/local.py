"""Local engine: processes on the server's own host, no image. The zero-dependency default for
trying aichor on a laptop. Each process runs detached under a tiny shell wrapper that records
its exit code in a file, so a restarted worker can still tell how it ended."""

import codecs
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
    shared_volume,
    tell_progress,
)
from experiments.workload import Volume, Workload

# Popen objects of processes this worker started, so finished children are reaped.
_children: dict[int, subprocess.Popen] = {}

WRAPPER = 'sh -c "$0" > "$1" 2>&1; code=$?; echo $code > "$2.tmp"; mv "$2.tmp" "$2"'
# A jobset completion held back to its job's parallelism waits for the exit file ($3) of the
# completion `parallelisms` places before it: so at most that many of a job run at once, and
# each starts as one ends. Cancel kills the waiting shell with the rest.
WAITING_WRAPPER = 'while [ ! -e "$3" ]; do sleep 0.2; done; ' + WRAPPER

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
        after = waits_for(processes)
        pids = {}
        for proc in processes:
            if cancelled():
                self.cancel({"pids": pids})
                shutil.rmtree(root, ignore_errors=True)
                raise Cancelled()
            env = {**clean_environment(), **proc.env}
            wrapper = [WRAPPER, proc.command, str(root / f"{proc.name}.log"), str(root / f"{proc.name}.exit")]
            if proc.name in after:
                wrapper = [WAITING_WRAPPER, *wrapper[1:], str(root / f"{after[proc.name]}.exit")]
            child = subprocess.Popen(
                ["sh", "-c", *wrapper],
                cwd=str(cwd),
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
            _children[child.pid] = child
            pids[proc.name] = child.pid
            log(f"started {proc.name} as pid {child.pid}\n")
        # With each process's role, decisiveness and the completion it waits for: find() must
        # tell them again after a restart.
        lines = [
            f"{p.name} {pids[p.name]} {p.role or '-'} {int(p.decisive)} {after.get(p.name, '-')}\n" for p in processes
        ]
        (root / "handle").write_text("".join(lines))
        plan = described(processes)
        (root / "queues.json").write_text(json.dumps(plan.get("queues", {})))
        return {"dir": str(root), "pids": pids, "after": after, **plan}

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
        after = handle.get("after") or {}
        for name, pid in handle.get("pids", {}).items():
            exit_file = root / f"{name}.exit"
            if exit_file.exists():
                states.append(ProcessState(name, "exited", int(exit_file.read_text().strip() or -1)))
            elif not (pid and _alive(pid)):
                states.append(ProcessState(name, "missing"))
            elif name in after and not (root / f"{after[name]}.exit").exists():
                states.append(ProcessState(name, "pending"))
            else:
                states.append(ProcessState(name, "running"))
        if handle.get("queues"):
            tell_progress(handle, states)
        return states

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
        pid = handle.get("pids", {}).get(process)
        if not pid or not _alive(pid):
            raise EngineError(f"process {process} is not running")
        return LocalPtySession(command, cwd=handle["dir"], env=_environment_of(pid))

    def port_forward(self, handle: dict, process: str, port: int) -> ExecSession:
        """Local processes share the server's own network, so the server's loopback is theirs:
        only a port that one of the experiment's own processes listens on is forwarded, never
        the server's Redis or PostgreSQL."""
        if process not in handle.get("pids", {}):
            raise EngineError(f"no process named {process}")
        address = _listening_address(port, _process_tree(handle.get("pids", {}).values()))
        if address is None:
            raise EngineError(f"no process of this experiment listens on port {port}")
        try:
            sock = socket.create_connection((address, port), timeout=10)
        except OSError as exc:
            raise EngineError(f"nothing answers on port {port} in {process}: {exc.strerror or exc}") from None
        return LocalSocketSession(sock)

    def cancel(self, handle: dict) -> None:
        for pid in handle.get("pids", {}).values():
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


def waits_for(processes: list[ProcessSpec]) -> dict[str, str]:
    """Each held-back completion and the one `parallelism` places before it in its job."""
    after = {}
    queues: dict[str, list[ProcessSpec]] = {}
    for p in processes:
        if p.queue:
            queues.setdefault(p.queue, []).append(p)
    for queue in queues.values():
        for index, p in enumerate(queue):
            if index >= p.parallelism:
                after[p.name] = queue[index - p.parallelism].name
    return after


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
