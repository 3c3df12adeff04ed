"""Local engine: processes on the server's own host, no image. The zero-dependency default for
trying aichor on a laptop. Each process runs detached under a tiny shell wrapper that records
its exit code in a file, so a restarted worker can still tell how it ended."""

import fcntl
import os
import pty
import select
import shutil
import signal
import struct
import subprocess
import termios
from pathlib import Path

from django.conf import settings

from experiments.engines.base import Engine, EngineError, ExecSession, ProcessState

# Popen objects of processes this worker started, so finished children are reaped.
_children: dict[int, subprocess.Popen] = {}

WRAPPER = 'sh -c "$0" > "$1" 2>&1; code=$?; echo $code > "$2.tmp"; mv "$2.tmp" "$2"'


class LocalEngine(Engine):
    kind = "local"
    needs_image = False

    def _root(self) -> Path:
        return Path(self.config.get("root") or settings.LOCAL_ENGINE_DIR)

    def image_exists(self, image: str) -> bool:
        return True

    def submit(self, *, experiment_id, image, processes, mounts, workdir, log) -> dict:
        self.cleanup_experiment(experiment_id)
        root = self._root() / experiment_id
        root.mkdir(parents=True, exist_ok=True)
        pids = {}
        for proc in processes:
            env = {**os.environ, **proc.env}
            # Mounts become environment paths on the host itself: nothing to bind.
            child = subprocess.Popen(
                ["sh", "-c", WRAPPER, proc.command, str(root / f"{proc.name}.log"), str(root / f"{proc.name}.exit")],
                cwd=workdir or str(root),
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
            _children[child.pid] = child
            pids[proc.name] = child.pid
            log(f"started {proc.name} as pid {child.pid}\n")
        (root / "handle").write_text("".join(f"{name} {pid}\n" for name, pid in pids.items()))
        return {"dir": str(root), "pids": pids}

    def find(self, experiment_id: str) -> dict | None:
        root = self._root() / experiment_id
        if not (root / "handle").exists():
            return None
        pids = {}
        for line in (root / "handle").read_text().splitlines():
            name, _, pid = line.partition(" ")
            pids[name] = int(pid)
        return {"dir": str(root), "pids": pids}

    def status(self, handle: dict) -> list[ProcessState]:
        root = Path(handle["dir"])
        states = []
        for name, pid in handle.get("pids", {}).items():
            exit_file = root / f"{name}.exit"
            if exit_file.exists():
                states.append(ProcessState(name, "exited", int(exit_file.read_text().strip() or -1)))
            elif pid and _alive(pid):
                states.append(ProcessState(name, "running"))
            else:
                states.append(ProcessState(name, "missing"))
        return states

    def logs(self, handle: dict, process: str, cursor: int | None = None) -> tuple[list[str], int | None]:
        path = Path(handle["dir"]) / f"{process}.log"
        if not path.exists():
            return [], cursor
        with path.open("rb") as fh:
            fh.seek(cursor or 0)
            data = fh.read()
        # Keep a partial last line for the next call.
        complete = data[: data.rfind(b"\n") + 1]
        if not complete:
            return [], cursor
        text = complete.decode("utf-8", "replace")
        return text.splitlines(keepends=True), (cursor or 0) + len(complete)

    def final_logs(self, handle: dict, process: str, cursor: int | None) -> list[str]:
        lines, cursor = self.logs(handle, process, cursor)
        path = Path(handle["dir"]) / f"{process}.log"
        rest = path.read_bytes()[cursor or 0 :] if path.exists() else b""
        return lines + ([rest.decode("utf-8", "replace") + "\n"] if rest else [])

    def exec(self, handle: dict, process: str, *, command: list[str], tty: bool = True) -> ExecSession:
        pid = handle.get("pids", {}).get(process)
        if not pid or not _alive(pid):
            raise EngineError(f"process {process} is not running")
        return LocalPtySession(command, cwd=handle["dir"])

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


def _alive(pid: int) -> bool:
    child = _children.get(pid)
    if child is not None:
        return child.poll() is None
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


class LocalPtySession(ExecSession):
    def __init__(self, command: list[str], cwd: str) -> None:
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: become the shell
            os.chdir(cwd)
            os.environ["TERM"] = "xterm-256color"
            os.execvp(command[0], command)

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
