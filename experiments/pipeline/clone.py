"""Cloning: fetch the code (Git or an uploaded archive) and validate its manifest."""

import fcntl
import functools
import hashlib
import os
import shutil
import subprocess
import tarfile
import time
from contextlib import contextmanager
from pathlib import Path
from uuid import UUID

from django.conf import settings

from aichor.lib.git import GitInputError, check_branch, check_clone_url, check_sha, git_safety, redact_credentials
from experiments import services
from experiments.archives import open_archive
from experiments.engines.base import Cancelled
from experiments.limits import check_processes
from experiments.logs import LogWriter
from experiments.manifest import Manifest, ManifestError, parse_manifest
from experiments.models import Experiment, StepName
from experiments.pipeline.common import Liveness, StepFailed, enter, inside, workdir_of
from experiments.queue import next_step

GIT_ENV = {"GIT_TERMINAL_PROMPT": "0", "GIT_ASKPASS": "true"}
# A full commit sha: only those are taken from a mirror (an abbreviated one could name another
# object there than in a fresh clone).
FULL_SHA_LENGTHS = (40, 64)


def _git(args: list[str], cwd: Path, writer: LogWriter, cancelled: Liveness, timeout: float) -> None:
    """Callers put every value that came from outside after `--end-of-options` or `--`."""
    writer.line(redact_credentials("$ git " + " ".join(args)))
    env = {**os.environ, **GIT_ENV}
    proc = subprocess.Popen(
        ["git", *git_safety(allow_local=settings.ALLOW_LOCAL_REPOS), *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
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


def mirror_of(experiment: Experiment) -> Path:
    """The project's local mirror of its repository: one per project and clone URL, so a
    project never reads commits another project fetched (nor ones its old URL served)."""
    url = hashlib.sha256(experiment.clone_url.encode()).hexdigest()[:16]
    return Path(settings.WORK_DIR) / "git-mirrors" / f"{experiment.project_id}-{url}.git"


@contextmanager
def _mirror_lock(mirror: Path, cancelled: Liveness):
    """One fetch into a mirror at a time, across threads and worker processes of this host
    (two fetches would race on its shallow file); readers need no lock."""
    mirror.parent.mkdir(parents=True, exist_ok=True)
    with open(mirror.with_suffix(".lock"), "a") as fh:
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if cancelled():
                    raise Cancelled() from None
                time.sleep(0.05)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _checkout_from(mirror: Path, sha: str, dest: Path) -> bool:
    """Write the tree of commit `sha` from `mirror` into the empty folder `dest`: one local git
    call, no transport. False (and `dest` empty) when the mirror does not have the commit."""
    if not (mirror / "HEAD").exists():
        return False
    # An index of its own (the mirror's is shared), outside `dest` (the build context).
    index = mirror.parent / f"{dest.name}.{os.urandom(4).hex()}.index"
    try:
        done = subprocess.run(
            [
                "git",
                *git_safety(allow_local=settings.ALLOW_LOCAL_REPOS),
                f"--git-dir={mirror}",
                f"--work-tree={dest}",
                "checkout",
                "-q",
                sha,
                "--",
                ".",
            ],
            env={**os.environ, **GIT_ENV, "GIT_INDEX_FILE": str(index)},
            capture_output=True,
            timeout=settings.CLONE_TIMEOUT_SECONDS,
        )
    except subprocess.TimeoutExpired:
        done = None
    finally:
        index.unlink(missing_ok=True)
    if done is None or done.returncode != 0:
        shutil.rmtree(dest, ignore_errors=True)
        dest.mkdir(parents=True)
        return False
    return True


def _fetch_from_mirror(experiment: Experiment, dest: Path, writer: LogWriter, cancelled: Liveness) -> bool:
    """The commit's code from the project's mirror, fetching it into the mirror first when it
    is not there yet: N experiments of one commit fetch it once, and each then costs one local
    git call instead of a clone (init, fetch, upload-pack, pack-objects, unpack, checkout...).
    The folder gets exactly that commit's tree, without .git. False when the mirror cannot
    serve it (the caller clones as before)."""
    sha, mirror = experiment.commit_sha, mirror_of(experiment)
    timeout = settings.CLONE_TIMEOUT_SECONDS
    dest.mkdir(parents=True, exist_ok=True)
    if not _checkout_from(mirror, sha, dest):
        with _mirror_lock(mirror, cancelled):
            # Fetched by another experiment while this one waited for the lock?
            if not _checkout_from(mirror, sha, dest):
                if not (mirror / "HEAD").exists():
                    mirror.mkdir(parents=True, exist_ok=True)
                    _git(["init", "-q", "--bare", "--template="], mirror, writer, cancelled, timeout)
                fetch = ["fetch", "-q", "--no-tags", "--no-write-fetch-head"]
                try:
                    _git(
                        [*fetch, "--depth=1", "--end-of-options", experiment.clone_url, sha],
                        mirror,
                        writer,
                        cancelled,
                        timeout,
                    )
                except StepFailed:
                    writer.line("fetching the commit directly was refused; fetching the branch history instead")
                    ref = experiment.branch or "HEAD"
                    _git([*fetch, "--end-of-options", experiment.clone_url, ref], mirror, writer, cancelled, timeout)
                if not _checkout_from(mirror, sha, dest):
                    return False
    writer.line(f"checked out {sha} from the project's repository mirror")
    return True


def fetch_git(
    experiment: Experiment,
    dest: Path,
    writer: LogWriter,
    cancelled: Liveness,
    depth: int = 1,
    *,
    mirror: bool = False,
) -> None:
    """The commit's code into `dest`: a clone (with .git), or with `mirror` possibly just the
    commit's files from the project's mirror (no .git: see fetch_code)."""
    check_git_inputs(experiment)
    if mirror and len(experiment.commit_sha) in FULL_SHA_LENGTHS:
        if _fetch_from_mirror(experiment, dest, writer, cancelled):
            return
        writer.line("the repository mirror cannot serve this commit: cloning instead")
    timeout = settings.CLONE_TIMEOUT_SECONDS
    dest.mkdir(parents=True, exist_ok=True)
    # No template: its sample hooks are copied for nothing, a third of the init's time.
    _git(["init", "-q", "--template="], dest, writer, cancelled, timeout)
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
        services.record_commit(experiment.pk, sha)
        experiment.commit_sha = sha


@functools.lru_cache(maxsize=32)
def _parsed(text: str, pvcs: frozenset[str]) -> Manifest:
    """parse_manifest, kept for the next experiment of a sweep: the same manifest text (the
    same commit) parses to the same manifest, and its YAML took a tenth of a clone's CPU. The
    manifest is only read (frozen dataclasses); errors are raised again each time."""
    return parse_manifest(text, known_pvcs=set(pvcs))


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
        # From default storage or the archive bucket, as its name says (experiments.archives).
        with open_archive(experiment.archive) as fh, tarfile.open(fileobj=fh, mode="r|*") as tar:
            # The "data" filter refuses absolute paths, "..", links out of the tree and devices.
            tar.extractall(dest, members=within_limits(tar), filter="data")
    except FileNotFoundError:
        raise StepFailed(f"the uploaded archive {experiment.archive} is gone") from None
    except (tarfile.TarError, OSError) as exc:
        raise StepFailed(f"the uploaded archive cannot be unpacked: {exc}") from None
    writer.line(f"unpacked archive {experiment.archive}")


def fetch_code(experiment: Experiment, dest: Path, writer: LogWriter, cancelled: Liveness) -> Manifest:
    """Fetch the code and return the validated manifest (clone options are applied after
    reading it: the first fetch is shallow and cheap)."""
    shutil.rmtree(dest, ignore_errors=True)
    if experiment.source == Experiment.Source.ARCHIVE:
        unpack_archive(experiment, dest, writer)
    else:
        fetch_git(experiment, dest, writer, cancelled, mirror=True)
    manifest_file = inside(dest, experiment.manifest_path, "the manifest path")
    if not manifest_file.is_file():
        raise StepFailed(f"manifest {experiment.manifest_path} not found in the code")
    text = manifest_file.read_text(errors="replace")
    pvcs = set(experiment.project.pvcs.values_list("name", flat=True))
    manifest = _parsed(text, frozenset(pvcs))
    # Counted from the manifest's numbers, before anything plans one process per replica: a
    # jobset of 1000 × 1000 must fail here, cheaply, never reach plan_processes.
    too_many = check_processes(manifest, experiment.engine)
    if too_many:
        services.record_manifest(experiment.pk, None, text)
        raise ManifestError([too_many])
    services.record_manifest(experiment.pk, manifest, text)
    clone = manifest.clone
    if experiment.source == Experiment.Source.GIT:
        timeout = settings.CLONE_TIMEOUT_SECONDS
        needs_git = clone.include_dot_git or clone.depth > 1 or clone.submodules != "false"
        if needs_git and not (dest / ".git").exists():
            # From the mirror: the files alone. These options work on a clone of its own.
            shutil.rmtree(dest, ignore_errors=True)
            fetch_git(experiment, dest, writer, cancelled)
        if clone.include_dot_git:
            # The workload sees an ordinary clone; relative submodule URLs resolve against it.
            _git(["remote", "add", "--", "origin", experiment.clone_url], dest, writer, cancelled, timeout)
        if clone.depth > 1:
            args = [
                "fetch",
                "-q",
                "--no-tags",
                f"--depth={clone.depth}",
                "--end-of-options",
                experiment.clone_url,
                experiment.commit_sha,
            ]
            _git(args, dest, writer, cancelled, timeout)
        if clone.submodules != "false":
            args = ["submodule", "update", "--init", f"--depth={clone.depth}"]
            if clone.submodules == "recursive":
                args.append("--recursive")
            _git(args, dest, writer, cancelled, timeout)
        if not clone.include_dot_git:
            shutil.rmtree(dest / ".git", ignore_errors=True)
    return manifest


def run_clone(experiment_id: UUID) -> None:
    experiment = enter(experiment_id, StepName.CLONING)
    if experiment is None:
        return
    with LogWriter(experiment_id, f"step:{StepName.CLONING}") as writer:
        try:
            fetch_code(experiment, workdir_of(experiment_id), writer, Liveness(experiment_id))
        except Cancelled:
            writer.line("cancelled")
            return
        except ManifestError as exc:
            writer.line(f"manifest {experiment.manifest_path} is invalid:")
            for error in exc.errors:
                writer.line(f"  {error}")
            writer.flush()  # the reason is in the log before anyone sees Failed
            services.fail_experiment(experiment_id, "Invalid manifest: " + "; ".join(exc.errors))
            return
        except StepFailed as exc:
            writer.line(str(exc))
            writer.flush()  # the reason is in the log before anyone sees Failed
            services.fail_experiment(experiment_id, str(exc))
            return
        writer.line(f"manifest {experiment.manifest_path} is valid")
    next_step("build", experiment_id)
