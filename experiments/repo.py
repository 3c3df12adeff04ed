"""What the New experiment page reads from a project's Git repository: its branches, the
manifests at a branch's head, and whether a commit is on a branch.

Each read fetches into a throwaway bare repository with the pipeline's git safety settings
(experiments/pipeline/clone.py) and the shared input checks (aichor/lib/git.py), so a value
from the form never reaches git as an option, and a refusal reads as a sentence rather than
git's own output."""

import os
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from django.conf import settings

from aichor.lib.git import GitInputError, check_branch, check_clone_url, check_sha, git_safety, redact_credentials

MANIFEST_DIR = "aichor_manifests/"
ROOT_MANIFEST = "manifest.yaml"
# A page waits for these reads: far shorter than a clone step may take.
TIMEOUT_SECONDS = 30


class RepoError(Exception):
    """The repository, branch or commit cannot be read; the message is for the user."""


@dataclass(frozen=True)
class Branches:
    default: str
    names: list[str]


@dataclass(frozen=True)
class Commit:
    sha: str
    manifests: list[str]


def _run(args: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "GIT_TERMINAL_PROMPT": "0", "GIT_ASKPASS": "true"}
    try:
        return subprocess.run(
            ["git", *git_safety(allow_local=settings.ALLOW_LOCAL_REPOS), *args],
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=TIMEOUT_SECONDS,
        )
    except subprocess.TimeoutExpired:
        raise RepoError(f"the repository did not answer within {TIMEOUT_SECONDS} s") from None


def _checked_url(url: str) -> str:
    if not url:
        raise RepoError("the project has no Git clone URL: an admin sets it in the project's settings")
    try:
        return check_clone_url(url, allow_local=settings.ALLOW_LOCAL_REPOS)
    except GitInputError as exc:
        raise RepoError(str(exc)) from None


def branches(url: str) -> Branches:
    """The repository's branches, its default (HEAD's) branch first."""
    result = _run(["ls-remote", "--symref", "--end-of-options", _checked_url(url), "HEAD", "refs/heads/*"])
    if result.returncode != 0:
        last = redact_credentials(result.stderr.strip()).splitlines()[-1:] or ["no answer"]
        raise RepoError(f"the repository cannot be read: {last[0]}")
    default, names = "", []
    for line in result.stdout.splitlines():
        if line.startswith("ref: refs/heads/") and line.endswith("\tHEAD"):
            default = line[len("ref: refs/heads/") : -len("\tHEAD")]
        elif "\trefs/heads/" in line:
            names.append(line.split("\trefs/heads/", 1)[1])
    names.sort()
    if default not in names:
        default = "main" if "main" in names else (names[0] if names else "")
    return Branches(default=default, names=[default, *(n for n in names if n != default)] if default else [])


def read_commit(url: str, branch: str, sha: str = "", manifest_path: str = "") -> Commit:
    """The commit `sha` (the branch's head when empty), which must be on `branch`, and the
    manifests it holds; `manifest_path`, when given, must be a file of it."""
    url = _checked_url(url)
    try:
        check_branch(branch)
        if sha:
            check_sha(sha)
    except GitInputError as exc:
        raise RepoError(str(exc)) from None
    with tempfile.TemporaryDirectory(prefix="aichor-repo-") as tmp:
        repo = Path(tmp)
        _run(["init", "-q", "--bare"], cwd=repo)
        # The branch's whole history only when a commit must be found on it; the head alone otherwise.
        depth = [] if sha else ["--depth=1"]
        ref = f"refs/heads/{branch}"
        fetched = _run(["fetch", "-q", "--no-tags", *depth, "--end-of-options", url, ref], cwd=repo)
        if fetched.returncode != 0:
            raise RepoError(f"branch {branch} not found in the repository")
        if sha:
            found = _run(["rev-parse", "--verify", "--quiet", "--end-of-options", f"{sha}^{{commit}}"], cwd=repo)
            full = found.stdout.strip()
            on_branch = found.returncode == 0 and (
                _run(["merge-base", "--is-ancestor", full, "FETCH_HEAD"], cwd=repo).returncode == 0
            )
            if not on_branch:
                raise RepoError(f"commit {sha} not found on branch {branch}")
        else:
            full = _run(["rev-parse", "FETCH_HEAD"], cwd=repo).stdout.strip()
        if manifest_path and _run(["cat-file", "-e", f"{full}:{manifest_path}"], cwd=repo).returncode != 0:
            raise RepoError(f"manifest {manifest_path} not found in commit {full[:12]}")
        listed = _run(["ls-tree", "-r", "--name-only", full, "--", MANIFEST_DIR, ROOT_MANIFEST], cwd=repo)
    manifests = [p for p in listed.stdout.splitlines() if p.endswith((".yaml", ".yml"))]
    return Commit(sha=full, manifests=sorted(manifests, key=lambda p: (p != ROOT_MANIFEST, p)))
