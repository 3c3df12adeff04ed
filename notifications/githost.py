"""Commit statuses as GitHub and GitLab document them: which host, which repository, the
request, and what an answer means. No database writes here (services.py records outcomes)."""

import re
from dataclasses import dataclass
from datetime import timedelta
from urllib.parse import quote, urlsplit

import requests
from django.conf import settings
from django.urls import reverse

from aichor.lib import outbound
from experiments import signals
from experiments.models import Experiment, Status
from notifications.models import GitHost

MAX_DESCRIPTION = 140
# https://host/owner/name(.git), ssh://git@host/owner/name.git, git@host:owner/name.git
_SCP_LIKE = re.compile(r"^[\w.-]+@(?P<host>[\w.-]+):(?P<path>[^/].*)$")

# By experiment event (experiments.signals).
GITHUB_STATES = {
    signals.CREATED: "pending",
    signals.RUNNING: "pending",
    signals.SUCCEEDED: "success",
    signals.FAILED: "failure",
    signals.CANCELLED: "error",
}
GITLAB_STATES = {
    signals.CREATED: "pending",
    signals.RUNNING: "running",
    signals.SUCCEEDED: "success",
    signals.FAILED: "failed",
    signals.CANCELLED: "canceled",
}


def _host_and_path(url: str) -> tuple[str, str]:
    match = _SCP_LIKE.match(url)
    if match:
        host, path = match.group("host"), match.group("path")
    else:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https", "ssh", "git") or not parts.hostname:
            return "", ""
        host, path = parts.hostname, parts.path
    path = path.strip("/").removesuffix(".git")
    # GitLab web URLs may carry /-/tree/main and the like after the project's path.
    return host.lower(), path.split("/-/", 1)[0]


@dataclass(frozen=True)
class Target:
    kind: str
    api_url: str
    repository: str


def target_of(git_host: GitHost, experiment: Experiment, delivered_by: str = "") -> Target | None:
    """Where the experiment's commit status goes; None when no repository can be named. The kind:
    the project's setting, else the host that delivered the push, else the repository's host."""
    project = git_host.project
    host, path = "", ""
    for url in (project.repo_web_url, project.repo_clone_url):
        host, path = _host_and_path(url or "")
        if path:
            break
    kind = git_host.kind or delivered_by or (GitHost.Kind.GITLAB if "gitlab" in host else GitHost.Kind.GITHUB)
    repository = git_host.repository.strip().strip("/") or path
    if not repository:
        return None
    api_url = git_host.api_url.rstrip("/")
    if not api_url:
        if not host or host in ("github.com", "gitlab.com"):
            api_url = GitHost.DEFAULT_API[kind]
        else:  # GitHub Enterprise Server or a self-hosted GitLab at the repository's host
            api_url = f"https://{host}/api/v3" if kind == GitHost.Kind.GITHUB else f"https://{host}/api/v4"
    return Target(kind=kind, api_url=api_url, repository=repository)


def _duration(delta: timedelta | None) -> str:
    seconds = int(delta.total_seconds()) if delta else 0
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes:02d}m"
    return f"{minutes}m {seconds:02d}s" if minutes else f"{seconds}s"


def description(event: str, experiment: Experiment) -> str:
    """The step and the time taken, as of `event` (the experiment may have moved on since)."""
    took = _duration(experiment.duration)
    step = experiment.current_step
    if event == signals.CREATED:
        text = f"Waiting: {experiment.waiting_reason}" if experiment.waiting_reason else "Waiting to start"
    elif event == signals.RUNNING:
        text = f"{step} for {took}" if experiment.status == Status.PROCESSING else "Running"
    elif experiment.status == Status.SUCCEEDED:
        text = f"Succeeded in {took}"
    else:
        verb = "Failed" if experiment.status == Status.FAILED else "Cancelled"
        reason = experiment.failure_reason.splitlines()[0] if experiment.failure_reason else ""
        text = f"{verb} in {step} after {took}" + (f": {reason}" if reason else "")
    return text if len(text) <= MAX_DESCRIPTION else text[: MAX_DESCRIPTION - 1] + "…"


def page_url(experiment: Experiment) -> str:
    return settings.PUBLIC_URL + reverse("experiment-detail", kwargs={"experiment_id": experiment.pk})


def state_of(kind: str, event: str, experiment: Experiment) -> str:
    if kind == GitHost.Kind.GITLAB:
        return GITLAB_STATES[event]
    if event == signals.FAILED and experiment.failure_reason.startswith("Internal error"):
        return "error"  # aichor broke, not the code under test
    return GITHUB_STATES[event]


def context_of(experiment: Experiment) -> str:
    return f"aichor/{experiment.manifest_path}"


def post(target: Target, token: str, event: str, experiment: Experiment) -> tuple[str, requests.Response]:
    """POST the state `event` gives the experiment's commit; (state, the host's answer). Raises
    requests.RequestException when the host cannot be reached."""
    state = state_of(target.kind, event, experiment)
    common = {"state": state, "target_url": page_url(experiment), "description": description(event, experiment)}
    timeout = settings.NOTIFY_HTTP_TIMEOUT_SECONDS
    if target.kind == GitHost.Kind.GITLAB:
        # :id is the numeric id or the URL-encoded path (group%2Fname).
        url = f"{target.api_url}/projects/{quote(target.repository, safe='')}/statuses/{experiment.commit_sha}"
        body = common | {"name": context_of(experiment)}
        if experiment.branch:
            body["ref"] = experiment.branch
        headers = {"PRIVATE-TOKEN": token}
    else:
        url = f"{target.api_url}/repos/{target.repository}/statuses/{experiment.commit_sha}"
        body = common | {"context": context_of(experiment)}
        headers = {
            "Authorization": f"Bearer {token}",
            "Accept": "application/vnd.github+json",
            "X-GitHub-Api-Version": "2022-11-28",
        }
    headers["User-Agent"] = "aichor"
    return state, outbound.post(url, json=body, headers=headers, timeout=timeout, allow_redirects=False)


def _message(response: requests.Response) -> str:
    try:
        data = response.json()
    except ValueError:
        return response.text[:200].strip()
    if isinstance(data, dict):
        message = data.get("message") or data.get("error") or ""
        return str(message)[:200]
    return ""


def already_there(target: Target, response: requests.Response) -> bool:
    """GitLab refuses to post a state its commit status already has (400 "Cannot transition
    status via :run from :running"): a retry whose first try did arrive."""
    return target.kind == GitHost.Kind.GITLAB and response.status_code == 400 and "transition" in _message(response)


def problem(target: Target, response: requests.Response) -> str:
    """What a refusal means, in words a project admin can act on. Never the token."""
    code = response.status_code
    where = target.repository
    detail = _message(response)
    suffix = f" ({code}{': ' + detail if detail else ''})"
    if code == 401:
        return "the token is invalid or expired" + suffix
    if target.kind == GitHost.Kind.GITLAB:
        if code == 403:
            return f"token lacks the api scope or the Developer role on {where}" + suffix
        if code == 404:
            return f"project {where} or the commit was not found, or the token cannot see it" + suffix
    else:
        if code == 403:
            return f"token lacks the statuses permission (Commit statuses: write) on {where}" + suffix
        if code == 404:
            return (
                f"repository {where} or the commit was not found, or the token lacks the statuses permission" + suffix
            )
    return "the Git host refused the status" + suffix
