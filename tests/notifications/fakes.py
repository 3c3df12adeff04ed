"""Real HTTP servers on loopback standing in for the GitHub and GitLab commit status APIs and for
a notification receiver. The Git host fakes check what the real APIs document: the path, the
token header, the JSON body's fields and values; and can be told to answer 500, 403 or 429."""

import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote

SHA = re.compile(r"^[0-9a-f]{40}$")
# https://docs.github.com/en/rest/commits/statuses#create-a-commit-status
GITHUB_STATES = {"error", "failure", "pending", "success"}
# https://docs.gitlab.com/api/commits/#set-the-pipeline-status-of-a-commit
GITLAB_STATES = {"pending", "running", "success", "failed", "canceled", "skipped"}
GITLAB_DONE = {"success", "failed", "canceled", "skipped"}


@dataclass
class Answer:
    code: int
    body: dict = field(default_factory=dict)
    headers: dict = field(default_factory=dict)


@dataclass
class Seen:
    """One request as it arrived, and what the fake answered."""

    method: str
    path: str
    headers: dict
    raw: bytes
    code: int
    at: float

    @property
    def json(self):
        return json.loads(self.raw)


class _Server:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.seen: list[Seen] = []
        self.scripted: list[Answer] = []
        # Answered to every request while set (a host that is down), after the scripted ones.
        self.down: Answer | None = None
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with fake.lock:
                    answer = fake.scripted.pop(0) if fake.scripted else fake.down
                if answer is None:
                    answer = fake.handle(self.path, dict(self.headers), raw)
                with fake.lock:
                    fake.seen.append(Seen("POST", self.path, dict(self.headers), raw, answer.code, time.time()))
                body = json.dumps(answer.body).encode()
                self.send_response(answer.code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                for name, value in answer.headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def answer_next(self, *answers: Answer) -> None:
        with self.lock:
            self.scripted.extend(answers)

    def requests(self) -> list[Seen]:
        with self.lock:
            return list(self.seen)

    def handle(self, path: str, headers: dict, raw: bytes) -> Answer:
        return Answer(200, {})

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class FakeGitHub(_Server):
    """POST /repos/{owner}/{repo}/statuses/{sha} with `Authorization: Bearer|token <token>`."""

    def __init__(self, token: str, repository: str, *, can_write_statuses: bool = True) -> None:
        self.token, self.repository, self.can_write_statuses = token, repository, can_write_statuses
        self.statuses: list[dict] = []  # accepted, in order
        super().__init__()

    def handle(self, path: str, headers: dict, raw: bytes) -> Answer:
        lower = {k.lower(): v for k, v in headers.items()}
        if lower.get("authorization") not in (f"Bearer {self.token}", f"token {self.token}"):
            return Answer(401, {"message": "Bad credentials"})
        match = re.fullmatch(r"/repos/([^/]+/[^/]+)/statuses/([^/]+)", path)
        if not match or match.group(1) != self.repository or not SHA.match(match.group(2)):
            return Answer(404, {"message": "Not Found"})
        if not self.can_write_statuses:
            return Answer(403, {"message": "Resource not accessible by personal access token"})
        if not lower.get("content-type", "").startswith("application/json"):
            return Answer(415, {"message": "Unsupported Media Type"})
        try:
            body = json.loads(raw)
        except ValueError:
            return Answer(400, {"message": "Problems parsing JSON"})
        problems = [
            name for name in ("target_url", "description", "context") if not isinstance(body.get(name, ""), str)
        ]
        if body.get("state") not in GITHUB_STATES or problems or len(body.get("description", "")) > 140:
            return Answer(422, {"message": "Validation Failed"})
        status = {"sha": match.group(2), "context": body.get("context", "default")} | body
        with self.lock:
            self.statuses.append(status)
        return Answer(201, {"id": len(self.statuses), "state": body["state"], "context": status["context"]})

    def states(self, sha: str, context: str) -> list[str]:
        with self.lock:
            return [s["state"] for s in self.statuses if s["sha"] == sha and s["context"] == context]


class FakeGitLab(_Server):
    """POST /api/v4/projects/:id/statuses/:sha with `PRIVATE-TOKEN: <token>`; :id is the
    numeric id or the URL-encoded path. Refuses to set a job's state to the one it has."""

    def __init__(self, token: str, repository: str) -> None:
        self.token, self.repository = token, repository
        self.statuses: list[dict] = []
        self.current: dict[tuple[str, str], str] = {}
        super().__init__()

    @property
    def api_url(self) -> str:
        return self.url + "/api/v4"

    def handle(self, path: str, headers: dict, raw: bytes) -> Answer:
        lower = {k.lower(): v for k, v in headers.items()}
        if lower.get("private-token") != self.token:
            return Answer(401, {"message": "401 Unauthorized"})
        # The raw path: a project path must arrive encoded (group%2Fname), not as more segments.
        match = re.fullmatch(r"/api/v4/projects/([^/]+)/statuses/([^/]+)", path)
        if not match or unquote(match.group(1)) != self.repository or not SHA.match(match.group(2)):
            return Answer(404, {"message": "404 Project Not Found"})
        body = json.loads(raw)
        if body.get("state") not in GITLAB_STATES:
            return Answer(400, {"error": "state does not have a valid value"})
        sha, name = match.group(2), body.get("name", "default")
        with self.lock:
            before = self.current.get((sha, name))
            if before == body["state"] or (before in GITLAB_DONE and body["state"] not in GITLAB_DONE):
                return Answer(400, {"message": f"Cannot transition status via :{body['state']} from :{before}"})
            self.current[(sha, name)] = body["state"]
            self.statuses.append({"sha": sha, "name": name} | body)
        return Answer(201, {"id": len(self.statuses), "status": body["state"], "name": name})

    def states(self, sha: str, name: str) -> list[str]:
        with self.lock:
            return [s["state"] for s in self.statuses if s["sha"] == sha and s["name"] == name]


class Receiver(_Server):
    """A notification endpoint: answers 200 unless told otherwise."""

    def deliveries(self) -> list[Seen]:
        return [seen for seen in self.requests() if seen.code == 200]
