"""One service per pipeline step. Each begins its step through services.begin_step (a
conditional update: a cancelled experiment goes no further), does its slow I/O outside any
transaction, keeps its log, and enqueues the next step."""

import itertools
import logging
import os
import re
import shutil
import socket
import subprocess
import tarfile
import time
import uuid
from datetime import timedelta
from pathlib import Path

from django.conf import settings
from django.core.files.storage import default_storage
from django.utils import timezone

from aichor.lib.git import GitInputError, check_branch, check_clone_url, check_sha, redact_credentials
from experiments import services
from experiments.engines import get_engine
from experiments.engines.base import Cancelled, EngineError, Mount
from experiments.limits import check_processes, check_started
from experiments.logs import FLUSH_BYTES, LogWriter
from experiments.manifest import ManifestError, parse_manifest
from experiments.models import Experiment, StepName, StepStatus
from experiments.processes import DISTRIBUTION_VARS, plan_processes, ports_needed
from projects.models import ProjectVariable

log = logging.getLogger(__name__)

PROTECTED_VARS = {
    "AICHOR_INPUT_PATH", "AICHOR_OUTPUT_PATH", "AICHOR_TENSORBOARD_PATH", "AICHOR_EXPERIMENT_ID",
    "AICHOR_PROJECT_ID", "AICHOR_EXPERIMENT_MESSAGE", "VCS_SHA", "S3_ENDPOINT", "AWS_ENDPOINT_URL",
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
} | DISTRIBUTION_VARS  # fmt: skip


class StepFailed(Exception):
    """Ends the experiment as Failed at the current step with this message."""


class Liveness:
    """Called often from slow loops: says whether to give up (cancelled) and keeps the
    heartbeat fresh so reconcile leaves a working task alone."""

    def __init__(self, experiment_id, every: float = 5.0) -> None:
        self.experiment_id = experiment_id
        self.every = every
        self._last = 0.0

    def __call__(self) -> bool:
        now = time.monotonic()
        if now - self._last >= self.every:
            self._last = now
            return not services.heartbeat(self.experiment_id)
        return not services.is_active(self.experiment_id)


def workdir_of(experiment_id) -> Path:
    return Path(settings.WORK_DIR) / str(experiment_id)


def _enter(experiment_id, step: str) -> Experiment | None:
    """Begin `step`, or resume it when reconcile re-enqueued a lost task."""
    if not services.begin_step(experiment_id, step):
        experiment = Experiment.objects.filter(pk=experiment_id).select_related("project", "engine").first()
        if not experiment or experiment.is_terminal or experiment.current_step != step:
            return None
        services.heartbeat(experiment_id)
        return experiment
    return Experiment.objects.select_related("project", "engine").get(pk=experiment_id)


def _inside(root: Path, relative: str, what: str) -> Path:
    path = (root / relative).resolve()
    if path != root.resolve() and root.resolve() not in path.parents:
        raise StepFailed(f"{what} {relative!r} points outside the repository")
    return path


# --- Cloning -------------------------------------------------------------------------------
def _git_safety() -> list[str]:
    """Config for every git call. `-c` settings reach child gits too (submodules), so a
    .gitmodules URL cannot use ext:: (runs a command), nor file:// unless local repositories
    are allowed (it would read the server's disk)."""
    args = ["-c", "protocol.ext.allow=never"]
    if not settings.ALLOW_LOCAL_REPOS:
        args += ["-c", "protocol.file.allow=never"]
    return args


def _git(args: list[str], cwd: Path, writer: LogWriter, cancelled: Liveness, timeout: float) -> None:
    """Callers put every value that came from outside after `--end-of-options` or `--`."""
    writer.line(redact_credentials("$ git " + " ".join(args)))
    env = {**os.environ, "GIT_TERMINAL_PROMPT": "0", "GIT_ASKPASS": "true"}
    proc = subprocess.Popen(
        ["git", *_git_safety(), *args], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                # wait() returns the moment git exits; the timeout only paces the cancel check.
                proc.wait(timeout=0.1)
                break
            except subprocess.TimeoutExpired:
                pass
            if cancelled():
                proc.kill()
                raise Cancelled() from None
            if time.monotonic() > deadline:
                proc.kill()
                raise StepFailed(f"git {args[0]} took longer than {int(timeout)} s") from None
    finally:
        out = redact_credentials(proc.stdout.read().decode("utf-8", "replace") if proc.stdout else "")
        writer.write(out)
    if proc.returncode != 0:
        raise StepFailed(f"git {args[0]} failed: {out.strip().splitlines()[-1] if out.strip() else proc.returncode}")


def check_git_inputs(experiment: Experiment) -> None:
    """Rows written before these rules existed (or by a path that skipped them) may hold a
    hostile URL, sha or branch: refuse before git sees any of them."""
    if not experiment.clone_url:
        raise StepFailed("the project has no Git clone URL")
    checks = [("clone URL", lambda: check_clone_url(experiment.clone_url, allow_local=settings.ALLOW_LOCAL_REPOS))]
    if experiment.commit_sha:
        checks.append(("commit sha", lambda: check_sha(experiment.commit_sha)))
    if experiment.branch:
        checks.append(("branch", lambda: check_branch(experiment.branch)))
    for what, check in checks:
        try:
            check()
        except GitInputError as exc:
            raise StepFailed(f"refusing to fetch the code: invalid {what}: {exc}") from None


def fetch_git(experiment: Experiment, dest: Path, writer: LogWriter, cancelled: Liveness, depth: int = 1) -> None:
    check_git_inputs(experiment)
    timeout = settings.CLONE_TIMEOUT_SECONDS
    dest.mkdir(parents=True, exist_ok=True)
    _git(["init", "-q"], dest, writer, cancelled, timeout)
    ref = experiment.commit_sha or experiment.branch or "HEAD"
    # Fetching straight from the URL (no remote to configure) saves a git call per experiment.
    try:
        _git(
            ["fetch", "-q", "--no-tags", f"--depth={depth}", "--end-of-options", experiment.clone_url, ref],
            dest,
            writer,
            cancelled,
            timeout,
        )
    except StepFailed:
        if not experiment.commit_sha:
            raise
        # Some servers refuse fetching a bare sha: take the branch's history and look there.
        writer.line("fetching the commit directly was refused; fetching the branch history instead")
        _git(
            ["fetch", "-q", "--no-tags", "--end-of-options", experiment.clone_url, experiment.branch or "HEAD"],
            dest,
            writer,
            cancelled,
            timeout,
        )
    _git(
        # The revision is a checked hex sha or FETCH_HEAD, never an option; `--` ends the
        # revisions (checkout mishandles --end-of-options in git 2.39).
        ["-c", "advice.detachedHead=false", "checkout", "-q", experiment.commit_sha or "FETCH_HEAD", "--"],
        dest,
        writer,
        cancelled,
        timeout,
    )
    if not experiment.commit_sha:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=dest, capture_output=True, text=True).stdout.strip()
        services.set_fields(experiment.pk, commit_sha=sha)
        experiment.commit_sha = sha


def unpack_archive(experiment: Experiment, dest: Path, writer: LogWriter) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    max_bytes, max_files = settings.MAX_UNPACKED_BYTES, settings.MAX_ARCHIVE_FILES

    def within_limits(tar: tarfile.TarFile):
        # A few MB of gzip can hold terabytes of zeros: every header is checked before its data
        # is written, so a bomb stops at the limit instead of filling the worker's disk.
        files = unpacked = 0
        for member in tar:
            files += 1
            if files > max_files:
                raise StepFailed(f"the archive holds more than {max_files} files (AICHOR_MAX_ARCHIVE_FILES)")
            if member.isreg():
                unpacked += member.size
                if unpacked > max_bytes:
                    raise StepFailed(f"the archive unpacks to more than {max_bytes} bytes (AICHOR_MAX_UNPACKED_BYTES)")
            yield member

    try:
        with default_storage.open(experiment.archive, "rb") as fh, tarfile.open(fileobj=fh, mode="r|*") as tar:
            # The "data" filter refuses absolute paths, "..", links out of the tree and devices.
            tar.extractall(dest, members=within_limits(tar), filter="data")
    except FileNotFoundError:
        raise StepFailed(f"the uploaded archive {experiment.archive} is gone") from None
    except (tarfile.TarError, OSError) as exc:
        raise StepFailed(f"the uploaded archive cannot be unpacked: {exc}") from None
    writer.line(f"unpacked archive {experiment.archive}")


def fetch_code(experiment: Experiment, dest: Path, writer: LogWriter, cancelled: Liveness) -> dict:
    """Fetch the code and return the validated manifest (clone options are applied after
    reading it: the first fetch is shallow and cheap)."""
    shutil.rmtree(dest, ignore_errors=True)
    if experiment.source == Experiment.Source.ARCHIVE:
        unpack_archive(experiment, dest, writer)
    else:
        fetch_git(experiment, dest, writer, cancelled)
    manifest_file = _inside(dest, experiment.manifest_path, "the manifest path")
    if not manifest_file.is_file():
        raise StepFailed(f"manifest {experiment.manifest_path} not found in the code")
    text = manifest_file.read_text(errors="replace")
    pvcs = set(experiment.project.pvcs.values_list("name", flat=True))
    manifest = parse_manifest(text, known_pvcs=pvcs)
    # Counted from the manifest's numbers, before anything plans one process per replica: a
    # jobset of 1000 × 1000 must fail here, cheaply, never reach plan_processes.
    too_many = check_processes(manifest, experiment.engine)
    if too_many:
        services.set_fields(experiment.pk, manifest_text=text)
        raise ManifestError([too_many])
    services.set_fields(experiment.pk, manifest=manifest, manifest_text=text)
    clone = manifest["clone"]
    if experiment.source == Experiment.Source.GIT:
        timeout = settings.CLONE_TIMEOUT_SECONDS
        if clone["includeDotGit"]:
            # The workload sees an ordinary clone; relative submodule URLs resolve against it.
            _git(["remote", "add", "--", "origin", experiment.clone_url], dest, writer, cancelled, timeout)
        if clone["depth"] > 1:
            args = [
                "fetch",
                "-q",
                "--no-tags",
                f"--depth={clone['depth']}",
                "--end-of-options",
                experiment.clone_url,
                experiment.commit_sha,
            ]
            _git(args, dest, writer, cancelled, timeout)
        if clone["submodules"] != "false":
            args = ["submodule", "update", "--init", f"--depth={clone['depth']}"]
            if clone["submodules"] == "recursive":
                args.append("--recursive")
            _git(args, dest, writer, cancelled, timeout)
        if not clone["includeDotGit"]:
            shutil.rmtree(dest / ".git", ignore_errors=True)
    return manifest


def run_clone(experiment_id) -> None:
    experiment = _enter(experiment_id, StepName.CLONING)
    if experiment is None:
        return
    with LogWriter(experiment.pk, f"step:{StepName.CLONING}") as writer:
        try:
            fetch_code(experiment, workdir_of(experiment.pk), writer, Liveness(experiment.pk))
        except Cancelled:
            writer.line("cancelled")
            return
        except ManifestError as exc:
            writer.line(f"manifest {experiment.manifest_path} is invalid:")
            for error in exc.errors:
                writer.line(f"  {error}")
            writer.flush()  # the reason is in the log before anyone sees Failed
            services.fail_experiment(experiment.pk, "Invalid manifest: " + "; ".join(exc.errors))
            return
        except StepFailed as exc:
            writer.line(str(exc))
            writer.flush()  # the reason is in the log before anyone sees Failed
            services.fail_experiment(experiment.pk, str(exc))
            return
        writer.line(f"manifest {experiment.manifest_path} is valid")
    _next("build", experiment.pk)


# --- Building ------------------------------------------------------------------------------
def image_tag(experiment: Experiment, manifest: dict) -> str:
    name = re.sub(r"[^a-z0-9._-]+", "-", (manifest["builder"]["image"] or "image").lower()).strip("-._") or "image"
    return f"aichor/{experiment.project.namespace}/{name}:{experiment.pk}"


def build_variables(experiment: Experiment) -> tuple[dict[str, str], dict[str, str]]:
    args, secrets = {}, {}
    for var in experiment.project.variables.filter(kind=ProjectVariable.Kind.BUILD):
        (secrets if var.sensitive else args)[var.name] = var.plain_value()
    return args, secrets


def run_build(experiment_id) -> None:
    experiment = _enter(experiment_id, StepName.BUILDING)
    if experiment is None:
        return
    cancelled = Liveness(experiment.pk)
    with LogWriter(experiment.pk, f"step:{StepName.BUILDING}") as writer:
        try:
            image = _build(experiment, writer, cancelled)
        except Cancelled:
            writer.line("build cancelled")
            return
        except (StepFailed, EngineError, ManifestError) as exc:
            writer.line(str(exc))
            writer.flush()  # the reason is in the log before anyone sees Failed
            services.fail_experiment(experiment.pk, f"Build failed: {str(exc).strip().splitlines()[-1]}")
            return
    if not services.set_fields(experiment.pk, image=image):
        return
    _next("submit", experiment.pk)


def _build(experiment: Experiment, writer: LogWriter, cancelled: Liveness) -> str:
    manifest = experiment.manifest
    engine = get_engine(experiment.engine)
    if not engine.needs_image:
        writer.line(f"the {experiment.engine.kind} engine runs the code as it is: no image to build")
        return ""
    skip = manifest["builder"]["skipBuild"]
    if skip["enabled"]:
        other = Experiment.objects.filter(project=experiment.project, pk=_uuid_or_none(skip["experimentID"])).first()
        if other and other.image and engine.image_exists(other.image):
            writer.line(f"skipBuild: reusing the image of experiment {other.short_id}: {other.image}")
            return other.image
        if skip["failIfNotFound"]:
            raise StepFailed(f"skipBuild: no image of experiment {skip['experimentID']} to reuse")
        writer.line(f"skipBuild: no image of experiment {skip['experimentID']}; building instead")
    workdir = workdir_of(experiment.pk)
    if not workdir.exists():
        # A resumed build on another worker: fetch the code again.
        fetch_code(experiment, workdir, writer, cancelled)
    builder = manifest["builder"]
    context = _inside(workdir, builder["context"], "builder.context")
    dockerfile = _inside(context, builder["dockerfile"], "builder.dockerfile")
    if not dockerfile.is_file():
        raise StepFailed(f"Dockerfile {builder['dockerfile']} not found in {builder['context']}")
    args, secrets = build_variables(experiment)
    tag = image_tag(experiment, manifest)
    writer.line(f"building {tag}")
    return engine.build(
        context_dir=str(context),
        dockerfile=str(dockerfile.relative_to(context)),
        tag=tag,
        build_args={**args, **builder["buildArgs"]},
        target=builder["target"],
        secrets=secrets,
        log=writer.write,
        cancelled=lambda: writer.flush_if_due() or cancelled(),
    )


def _uuid_or_none(value):
    try:
        return uuid.UUID(str(value))
    except ValueError:
        return None


# --- Submitting ----------------------------------------------------------------------------
def free_ports(count: int) -> list[int]:
    sockets = []
    for _ in range(count):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        sockets.append(s)
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def bucket_dirs(experiment: Experiment) -> tuple[Path, Path]:
    root = Path(settings.BUCKETS_ROOT)
    inputs, outputs = root / experiment.project.inputs_bucket, root / experiment.project.outputs_bucket
    from datasets.services import InvalidKey, StorageError, create_folder

    try:
        # Not mkdir -p: an earlier workload may have left `output` as a link to anywhere on the host.
        create_folder(experiment.project.outputs_bucket, "output/", str(experiment.pk))
    except (InvalidKey, StorageError) as exc:
        raise EngineError(f"cannot create {experiment.output_prefix} in the outputs bucket: {exc}") from None
    inputs.mkdir(parents=True, exist_ok=True)
    return inputs, outputs


def workload_env(
    experiment: Experiment, *, in_container: bool, writer: LogWriter
) -> tuple[dict[str, str], list[Mount]]:
    from datasets.storage import is_s3

    storage_env: dict[str, str] = {}
    if is_s3():
        # Object storage: the workload talks S3 itself (boto3, aws CLI, fsspec all read these).
        project = experiment.project
        mounts, in_path, out_root = [], f"s3://{project.inputs_bucket}/", f"s3://{project.outputs_bucket}/"
        endpoint = settings.AICHOR_S3_ENDPOINT or f"https://s3.{settings.AICHOR_S3_REGION}.amazonaws.com"
        storage_env = {
            "S3_ENDPOINT": endpoint,
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_ACCESS_KEY_ID": settings.AICHOR_S3_ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": settings.AICHOR_S3_SECRET_KEY,
            "AWS_DEFAULT_REGION": settings.AICHOR_S3_REGION,
        }
    else:
        inputs, outputs = bucket_dirs(experiment)
        if in_container:
            mounts = [Mount(str(inputs), "/mnt/aichor/inputs"), Mount(str(outputs), "/mnt/aichor/outputs")]
            in_path, out_root = "/mnt/aichor/inputs/", "/mnt/aichor/outputs/"
        else:
            mounts, in_path, out_root = [], f"{inputs}/", f"{outputs}/"
    env: dict[str, str] = {}
    for var in experiment.project.variables.filter(kind=ProjectVariable.Kind.RUNTIME):
        env[var.name] = var.plain_value()
    for name, value in (experiment.manifest["spec"]["env"] or {}).items():
        if name in PROTECTED_VARS:
            writer.line(f"warning: spec.env.{name} is set by aichor and cannot be overridden: ignored")
            continue
        env[name] = value
    env.update(
        {
            "AICHOR_INPUT_PATH": in_path,
            "AICHOR_OUTPUT_PATH": f"{out_root}{experiment.output_prefix}",
            "AICHOR_TENSORBOARD_PATH": f"{out_root}{experiment.output_prefix}tensorboard/",
            "AICHOR_EXPERIMENT_ID": str(experiment.pk),
            "AICHOR_PROJECT_ID": str(experiment.project_id),
            "AICHOR_EXPERIMENT_MESSAGE": experiment.message,
            "VCS_SHA": experiment.commit_sha,
            **storage_env,
        }
    )
    return env, mounts


def run_submit(experiment_id) -> None:
    experiment = _enter(experiment_id, StepName.SUBMITTING)
    if experiment is None:
        return
    manifest = experiment.manifest
    with LogWriter(experiment.pk, f"step:{StepName.SUBMITTING}") as writer:
        try:
            engine = get_engine(experiment.engine)
            too_many = None if engine.holds_back_completions else check_started(manifest, experiment.engine)
            if too_many:
                raise EngineError(too_many)
            env, mounts = workload_env(experiment, in_container=engine.needs_image, writer=writer)
            processes = plan_processes(manifest, env, host="127.0.0.1", ports=free_ports(ports_needed(manifest)))
            for warning in engine.warnings_for(processes):
                writer.line(f"warning: {warning}")
            writer.line(f"submitting {len(processes)} process(es) to engine {experiment.engine.name}")
            handle = engine.submit(
                experiment_id=str(experiment.pk),
                image=experiment.image,
                processes=processes,
                mounts=mounts,
                workdir=str(workdir_of(experiment.pk)),
                log=writer.write,
                # Asked between two container creations: Cancel stops a 1000-process submit.
                cancelled=Liveness(experiment.pk),
            )
        except Cancelled:
            writer.line("cancelled")
            return  # the engine removed what it created; the stop task sweeps again
        except EngineError as exc:
            writer.line(str(exc))
            writer.flush()  # the reason is in the log before anyone sees Failed
            services.fail_experiment(experiment.pk, f"Submitting failed: {exc}")
            return
    handle["decisive"] = [p.name for p in processes if p.decisive]
    handle["cursors"] = {}
    timeout = manifest["spec"]["timeout"]
    deadline = timezone.now() + timedelta(seconds=timeout) if timeout else None
    # A cancel that raced the submission finds the handle, or the check below cleans up.
    if not services.set_fields(experiment.pk, handle=handle, deadline_at=deadline) or not services.begin_step(
        experiment.pk, StepName.RUNNING
    ):
        engine.cancel(handle)
        engine.cleanup(handle)
        return
    _next("watch", experiment.pk)


# --- Running and Completed -----------------------------------------------------------------
# At most this many engine reads per process in one poll of a watch: a workload printing
# faster than that is caught up with at the end, never at the cost of noticing its exit.
LOG_PIECES_PER_POLL = 8


def _collect_logs(engine, experiment_id, handle: dict, final: bool = False) -> bool:
    """Append new output of every process to its stored log; True when anything was new.

    Engines return a bounded piece per call (a workload printing gigabytes must not take the
    worker's memory with it), so a burst is read in several calls: while pieces come big during
    a watch (a few per poll, so status and cancel stay prompt), and until nothing is left once
    the process has exited; then final_logs adds an unfinished last line. A process whose final
    logs were taken is never read again (the stop task and a debug hold's release come later)."""
    cursors = handle.setdefault("cursors", {})
    collected = handle.setdefault("logs_collected", [])
    grew = False
    for name in handle_processes(handle):
        if name in collected:
            continue
        writer = None  # opened on the first new output: a quiet poll costs no query
        try:
            for _piece in itertools.count() if final else range(LOG_PIECES_PER_POLL):
                lines, cursors[name] = engine.logs(handle, name, cursors.get(name))
                text = "".join(lines)
                del lines
                if not text:
                    break
                writer = writer or LogWriter(experiment_id, f"process:{name}")
                writer.write(text)
                if not final and len(text) < FLUSH_BYTES:
                    break
            if final:
                rest = "".join(engine.final_logs(handle, name, cursors.get(name)))
                if rest:
                    writer = writer or LogWriter(experiment_id, f"process:{name}")
                    writer.write(rest)
                collected.append(name)
        finally:
            if writer:
                writer.close()
                grew = True
    return grew


def handle_processes(handle: dict) -> list[str]:
    return list((handle.get("containers") or handle.get("pids") or {}).keys())


def run_watch(experiment_id) -> None:
    experiment = Experiment.objects.select_related("engine").filter(pk=experiment_id).first()
    if (
        not experiment
        or experiment.is_terminal
        or experiment.current_step not in (StepName.RUNNING, StepName.COMPLETED)
    ):
        return
    engine = get_engine(experiment.engine)
    handle = experiment.handle or engine.find(str(experiment.pk)) or {}
    handle.setdefault("decisive", handle_processes(handle))
    if experiment.current_step == StepName.COMPLETED:
        # A lost task had already begun Completed: finish from what the engine reports.
        _finish(experiment, engine, handle, engine.status(handle) if handle_processes(handle) else [])
        return
    slice_end = time.monotonic() + settings.WATCH_SLICE_SECONDS
    cancelled = Liveness(experiment.pk, every=10)
    while time.monotonic() < slice_end:
        states = engine.status(handle) if handle_processes(handle) else []
        if _collect_logs(engine, experiment.pk, handle):
            services.set_fields(experiment.pk, handle=handle)
        if cancelled():
            return  # cancelled: the stop task removes the processes
        if _outcome(handle, states) is not None:
            _finish(experiment, engine, handle, states)
            return
        if experiment.deadline_at and timezone.now() >= experiment.deadline_at:
            engine.cancel(handle)
            _collect_logs(engine, experiment.pk, handle, final=True)
            services.set_fields(experiment.pk, handle=handle)  # the stop task must not read them again
            timeout = experiment.manifest["spec"]["timeout"]
            services.step_log(experiment.pk, StepName.RUNNING, f"timeout of {timeout} s reached: workload stopped")
            services.fail_experiment(experiment.pk, f"Timed out: spec.timeout of {timeout} s reached")
            return
        time.sleep(settings.WATCH_POLL_SECONDS)
    services.set_fields(experiment.pk, handle=handle, heartbeat_at=timezone.now())
    _next("watch", experiment.pk)


def _outcome(handle: dict, states) -> tuple[bool, int | None, str] | None:
    """(ok, exit code, reason) once the decisive processes tell, else None."""
    by_name = {s.name: s for s in states}
    decisive = handle.get("decisive") or list(by_name)
    if not decisive or not by_name:
        return False, None, "the engine has no record of the workload"
    for name in decisive:
        state = by_name.get(name)
        if state is None or state.phase == "missing":
            return False, None, f"{name} disappeared from the engine"
        if state.phase == "exited" and state.exit_code != 0:
            return False, state.exit_code, f"{name} exited with code {state.exit_code}"
    if all(by_name[name].phase == "exited" for name in decisive):
        return True, 0, ""
    return None


def _finish(experiment: Experiment, engine, handle: dict, states) -> None:
    ok, exit_code, reason = _outcome(handle, states) or (False, None, "the workload stopped reporting")
    outcome = StepStatus.SUCCEEDED if ok else StepStatus.FAILED
    services.begin_step(experiment.pk, StepName.COMPLETED, previous_outcome=outcome, reason=reason)
    hold = None if ok else ((experiment.manifest or {}).get("spec", {}).get("debug") or {}).get("holdOnFailure")
    if handle_processes(handle):
        if not ok and not hold:
            engine.cancel(handle)  # fail fast: the other ranks would wait for the dead one forever
        _collect_logs(engine, experiment.pk, handle, final=True)
        if hold:
            # After the final logs: the held handle points at keep-alive siblings with no output.
            try:
                handle = engine.hold(handle, hold)
            except EngineError as exc:
                services.step_log(experiment.pk, StepName.COMPLETED, f"debug hold not possible: {exc}")
                hold = None
                engine.cancel(handle)
        services.set_fields(experiment.pk, handle=handle)
    services.step_log(experiment.pk, StepName.COMPLETED, "logs collected" + (f"; {reason}" if reason else ""))
    if ok:
        services.finish_experiment(experiment.pk, "Succeeded", exit_code=exit_code)
    else:
        services.finish_experiment(
            experiment.pk, "Failed", reason=reason, exit_code=exit_code, step_status=StepStatus.SUCCEEDED
        )
        if hold and services.hold_for_debugging(experiment.pk, hold):
            services.step_log(experiment.pk, StepName.COMPLETED, f"spec.debug.holdOnFailure: processes kept {hold} s")
    stop(experiment.pk)


def stop(experiment_id) -> None:
    """Remove what an ended experiment left on its engine, and its scratch folder."""
    experiment = Experiment.objects.select_related("engine").filter(pk=experiment_id).first()
    if not experiment or not experiment.is_terminal or services.is_held(experiment):
        return  # a held experiment is stopped again by release_hold
    try:
        engine = get_engine(experiment.engine)
        handle = experiment.handle or engine.find(str(experiment.pk))
        if handle and handle_processes(handle):
            engine.cancel(handle)
            _collect_logs(engine, experiment.pk, handle, final=True)
            engine.cleanup(handle)
        # Containers a racing submit created after the handle was read.
        engine.cleanup_experiment(str(experiment.pk))
    except EngineError as exc:
        log.warning("could not clean up experiment %s: %s", experiment.pk, exc)
    shutil.rmtree(workdir_of(experiment.pk), ignore_errors=True)


# --- Reconcile -----------------------------------------------------------------------------
RESUME = {
    StepName.WAITING: "clone",
    StepName.CLONING: "clone",
    StepName.BUILDING: "build",
    StepName.SUBMITTING: "submit",
    StepName.RUNNING: "watch",
    StepName.COMPLETED: "watch",
}


def reconcile(stale_seconds: float | None = None) -> list[str]:
    """Re-enqueue the step of every active experiment whose owning task went silent (a killed
    worker, a lost message). Returns the ids it moved on."""
    stale = services.stale_active(settings.RECONCILE_STALE_SECONDS if stale_seconds is None else stale_seconds)
    moved = []
    slots: set[tuple] = set()
    for experiment in stale.only("id", "current_step", "status", "waiting_reason", "project_id", "engine_id"):
        services.heartbeat(experiment.pk)
        if experiment.current_step == StepName.WAITING and experiment.waiting_reason:
            # Its task ran and found no slot: nothing was lost. Re-check the slots of its
            # (project, engine) quietly: an event every period would bury the timeline.
            slots.add((experiment.project_id, experiment.engine_id))
            continue
        services.record_action(experiment.pk, f"reconcile resumed {experiment.current_step}")
        _next(RESUME[experiment.current_step], experiment.pk)
        moved.append(str(experiment.pk))
    for project_id, engine_id in slots:
        moved += [str(pk) for pk in services.start_waiting_experiments(project_id, engine_id)]
    for experiment in services.expired_holds().only("id"):
        services.release_hold(experiment.pk, reason="debug hold expired")
    return moved


def _next(task_name: str, experiment_id) -> None:
    from experiments import tasks

    if tasks.chain_next(task_name):
        return
    getattr(tasks, task_name).apply_async(args=[str(experiment_id)])
