"""The engine interface. An engine receives a Workload and runs it as a set of named processes
(worker-0, master-0, head, submitter...), so status, logs, exec and cancel take a process name.
Only the engine reads its handle. One module per kind."""

from collections.abc import Callable
from dataclasses import dataclass

from experiments.workload import Volume, Workload, mount_point


class EngineError(Exception):
    """The engine refused or failed; the message is shown to the user in the step log."""


class Cancelled(Exception):
    """Raised inside build/clone/submit loops when the experiment was cancelled meanwhile."""


class NotSupported(EngineError):
    """The engine has no such feature at all (as opposed to failing this once)."""


def never() -> bool:
    return False


@dataclass(frozen=True)
class ProcessInfo:
    """A process as the pickers and the pipeline see it, whatever the engine."""

    name: str
    role: str
    decisive: bool
    target: str  # what the engine runs it as, for display: a container, a pid, a pod


@dataclass
class ProcessState:
    name: str
    phase: str  # "pending", "running", "exited", "missing"
    exit_code: int | None = None
    # Why a pending process waits, in words a researcher understands (unschedulable for want
    # of GPUs, an image that cannot be pulled…): the watcher writes it to the Running step log.
    reason: str = ""


class ExecSession:
    """A bidirectional byte stream to a command in a process, with resize for TTYs."""

    def write(self, data: bytes) -> None:
        raise NotImplementedError

    def write_nowait(self, data: bytes) -> int:
        """Write what fits without blocking; how many bytes that was. An event loop types a
        keystroke this way and hands only the rest (a large paste) to a thread."""
        return 0

    def read(self, timeout: float | None = None) -> bytes | None:
        """Bytes, b"" when nothing arrived within timeout, None at end of stream."""
        raise NotImplementedError

    def fileno(self) -> int | None:
        """A descriptor that polls readable when read(0) has bytes (or the end) for a caller
        with an event loop; None for streams without one (a Kubernetes exec websocket), which
        are read from a thread instead."""
        return None

    def resize(self, rows: int, cols: int) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def failure(self) -> str | None:
        """Once read() reported the end: why the stream failed (a port-forward whose port
        nothing answers on), or None when it simply ended."""
        return None


class Engine:
    kind: str = ""
    needs_image = True
    # Whether a jobset's completions are made only as they start (a cluster's Indexed Job); a
    # single host plans them all when it submits (running `parallelisms` of each job at a time),
    # so limits.check_started bounds how many it plans.
    holds_back_completions = False

    def __init__(self, config: dict | None = None) -> None:
        self.config = config or {}

    def build(
        self,
        *,
        context_dir: str,
        dockerfile: str,
        tag: str,
        build_args: dict[str, str],
        target: str | None,
        secrets: dict[str, str],
        log: Callable[[str], None],
        cancelled: Callable[[], bool],
    ) -> str:
        """Build the image `tag` from `context_dir` and return the reference to run."""
        raise NotImplementedError

    def image_exists(self, image: str) -> bool:
        """Whether the engine can run `image` without building it."""
        raise NotImplementedError

    def volume_path(self, volume: Volume) -> str:
        """Where this engine's processes find `volume` (its injected paths name it so)."""
        return mount_point(volume)

    def warnings_for(self, workload: Workload) -> list[str]:
        """What this engine cannot honour in the workload, for the step log."""
        return []

    def submit(self, workload: Workload, *, log: Callable[[str], None], cancelled: Callable[[], bool] = never) -> dict:
        """Start every process of `workload` and return a JSON-able handle to find them again."""
        # `cancelled` is asked between two process creations: once it says so, what was created
        # is removed and Cancelled raised (a 1000-process manifest must not outlive its Cancel).
        raise NotImplementedError

    def processes(self, handle: dict) -> list[ProcessInfo]:
        """The processes behind `handle`: name, role, whether decisive, and what runs it."""
        raise NotImplementedError

    def find(self, experiment_id: str) -> dict | None:
        """The handle of an experiment's processes, if any exist (reconcile, idempotent submit)."""
        raise NotImplementedError

    def status(self, handle: dict) -> list[ProcessState]:
        """Each process's phase, and its exit code once it exited."""
        raise NotImplementedError

    def progress(self, handle: dict, states: list[ProcessState]) -> str:
        """How far a workload's jobs are when completions run `parallelisms` at a time
        (`completed 37/100`), for the experiment page; "" when the engine cannot tell."""
        return ""

    def states(self, handles: dict[str, dict]) -> dict[str, list[ProcessState]]:
        """The processes' states of many experiments (experiment id -> handle) at once, for the
        engine's watcher: engines that can answer in one call (a labelled list) override it, so
        a poll costs the same for ten experiments as for a thousand."""
        return {experiment_id: self.status(handle) for experiment_id, handle in handles.items()}

    def logs(self, handle: dict, process: str, cursor: int | None = None) -> tuple[list[str], int | None]:
        """A process's output lines after `cursor` (opaque, engine-defined) and the new cursor."""
        raise NotImplementedError

    def follow(self, handle: dict, process: str, cursor: int | None = None) -> tuple[list[str], int | None]:
        """Like logs(), for a watcher that comes back every interval: an engine that can stream
        keeps the stream open between calls, so a quiet process costs no request."""
        return self.logs(handle, process, cursor)

    def unfollow(self, handle: dict) -> None:
        """Close what follow() keeps open for these processes (their experiment is no longer watched)."""

    def calls(self) -> int:
        """API requests this thread made through the engine so far (the watcher's stats)."""
        return 0

    def final_logs(self, handle: dict, process: str, cursor: int | None) -> list[str]:
        """Everything left after `cursor` once the process has exited, partial last line included."""
        return self.logs(handle, process, cursor)[0]

    def exec(self, handle: dict, process: str, *, command: list[str], tty: bool = True) -> ExecSession:
        """A session running `command` inside `process` (a terminal when `tty`)."""
        raise NotImplementedError

    def port_forward(self, handle: dict, process: str, port: int) -> ExecSession:
        """A byte stream to TCP `port` on the loopback `process` sees, never the server's."""
        # EngineError when it cannot be opened (the message says why, for the user); a
        # connection refused later is reported by the session's failure().
        raise NotSupported(f"port-forward is not available on {self.kind} engines")

    def hold(self, handle: dict, seconds: float) -> dict:
        """Keep a failed experiment's processes reachable by exec for `seconds`; the handle to use meanwhile."""
        raise EngineError(f"the {self.kind} engine cannot hold failed processes for debugging")

    def cancel(self, handle: dict) -> None:
        """Stop every process now."""
        raise NotImplementedError

    def cleanup(self, handle: dict) -> None:
        """Remove what is left (stopped containers, scratch folders). Idempotent."""
        raise NotImplementedError

    def cleanup_experiment(self, experiment_id: str) -> None:
        """Remove whatever the engine still has of an experiment, its handle known or not."""
        handle = self.find(experiment_id)
        if handle:
            self.cancel(handle)
            self.cleanup(handle)
