"""Validation of what reaches git from outside: commit shas, branch names and clone URLs.

Everything here is pure (no app imports, no git calls): the API, the webhooks, the project
forms and the pipeline all check the same rules, so a value that an older release stored
without checking is still refused right before git would see it (SPEC §2: nothing from a
delivery or an API call ever reaches git as an option)."""

import re
from urllib.parse import urlsplit

SHA_RE = re.compile(r"[0-9a-fA-F]{7,64}")
# Host names and IP literals; never starting with "-", which ssh would read as an option.
_HOST_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9.-]*|\[[0-9A-Fa-f:.]+\]")
_URL_HOST_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9.-]*|[0-9A-Fa-f:.]+")
_USER_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._~-]*")
# "transport::address" makes git run the remote helper git-remote-<transport> (ext:: runs any
# command, fd:: talks to file descriptors).
_HELPER_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9+.-]*::")
_SCP_RE = re.compile(r"^(?:(?P<user>[^@/:]+)@)?(?P<host>[^@/:]+|\[[^\]/]+\]):(?P<path>.*)$")
MAX_BRANCH = 255
MAX_CLONE_URL = 500


class GitInputError(ValueError):
    """A sha, branch or clone URL git must not be given; the message says why."""


def _has_control_or_space(value: str) -> bool:
    return any(ord(c) < 0x21 or ord(c) == 0x7F or c.isspace() for c in value)


def check_sha(value: str) -> str:
    if not isinstance(value, str) or not SHA_RE.fullmatch(value):
        raise GitInputError("a commit sha is 7 to 64 hexadecimal characters")
    return value


def branch_problem(name: str) -> str | None:
    """Why `name` is not a branch name under `git check-ref-format --branch` (the rules of
    git-check-ref-format(1) applied to refs/heads/NAME), or None when it is one."""
    if not isinstance(name, str) or not name:
        return "a branch name cannot be empty"
    if len(name) > MAX_BRANCH:
        return f"a branch name is at most {MAX_BRANCH} characters"
    if name.startswith("-"):
        return "a branch name cannot start with '-'"
    if name == "HEAD" or name == "@":
        return f"{name!r} is not a branch name"
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in name):
        return "a branch name cannot contain control characters"
    bad = sorted({c for c in name if c in " ~^:?*[\\"})
    if bad:
        return "a branch name cannot contain " + " ".join(repr(c) for c in bad)
    if ".." in name:
        return "a branch name cannot contain '..'"
    if "@{" in name:
        return "a branch name cannot contain '@{'"
    if name.startswith("/") or name.endswith("/") or "//" in name:
        return "a branch name cannot start or end with '/' or contain '//'"
    if name.endswith("."):
        return "a branch name cannot end with '.'"
    for part in name.split("/"):
        if part.startswith("."):
            return "no part of a branch name can start with '.'"
        if part.endswith(".lock"):
            return "no part of a branch name can end with '.lock'"
    return None


def check_branch(name: str) -> str:
    problem = branch_problem(name)
    if problem:
        raise GitInputError(problem)
    return name


def check_clone_url(url: str, *, allow_local: bool) -> str:
    """https://, ssh:// and scp-like user@host:path; file:// and absolute paths only when
    `allow_local` (AICHOR_ALLOW_LOCAL_REPOS): they read the server's own disk."""
    if not isinstance(url, str) or not url:
        raise GitInputError("the clone URL is empty")
    if len(url) > MAX_CLONE_URL:
        raise GitInputError(f"the clone URL is longer than {MAX_CLONE_URL} characters")
    if _has_control_or_space(url):
        raise GitInputError("the clone URL cannot contain spaces or control characters")
    if url.startswith("-"):
        raise GitInputError("the clone URL cannot start with '-'")
    if _HELPER_RE.match(url):
        raise GitInputError("git remote helpers ('ext::', 'fd::', ...) are not allowed in a clone URL")
    lowered = url.lower()
    if lowered.startswith(("https://", "ssh://")):
        parts = urlsplit(url)
        try:
            host_ok = bool(parts.hostname and _URL_HOST_RE.fullmatch(parts.hostname))
            parts.port  # noqa: B018 (raises on a port that is not a number)
        except ValueError:
            host_ok = False
        if not host_ok:
            raise GitInputError(f"the clone URL {url!r} has no valid host")
        if lowered.startswith("ssh://") and parts.username is not None and not _USER_RE.fullmatch(parts.username):
            raise GitInputError(f"the clone URL {url!r} has an invalid user name")
        return url
    if lowered.startswith("file://") or url.startswith("/"):
        if not allow_local:
            raise GitInputError(
                "local repositories (file:// or a path on the server) are not allowed; "
                "set AICHOR_ALLOW_LOCAL_REPOS=true to allow them"
            )
        return url
    if "://" not in url:
        match = _SCP_RE.match(url)
        if match:
            user, host, path = match.group("user"), match.group("host"), match.group("path")
            if user is not None and not _USER_RE.fullmatch(user):
                raise GitInputError(f"the clone URL {url!r} has an invalid user name")
            if not _HOST_RE.fullmatch(host):
                raise GitInputError(f"the clone URL {url!r} has no valid host")
            if not path or path.startswith("-"):
                raise GitInputError(f"the clone URL {url!r} has no valid repository path")
            return url
    raise GitInputError("a clone URL starts with https:// or ssh://, or is user@host:path")


# "https://user:token@host/..." as a clone URL carries a credential: step logs are read by every
# member, so it is masked wherever git's command line or output is shown.
_CREDENTIAL_RE = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/@\s]+@")


def redact_credentials(text: str) -> str:
    return _CREDENTIAL_RE.sub(r"\g<scheme>***@", text)


def git_safety(*, allow_local: bool) -> list[str]:
    """Config for every git call the server makes. `-c` settings reach child gits too
    (submodules), so a .gitmodules URL cannot use ext:: (runs a command), nor file:// unless
    `allow_local` (AICHOR_ALLOW_LOCAL_REPOS: it would read the server's disk)."""
    args = ["-c", "protocol.ext.allow=never"]
    if not allow_local:
        args += ["-c", "protocol.file.allow=never"]
    return args
