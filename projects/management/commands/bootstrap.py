"""First start of `make run`: an admin user, engines, and a demo project whose Git repository
already holds a runnable experiment, so a new user sees aichor work before configuring anything.
Idempotent: later starts only print where to go.

Notes along the way go to stderr; stdout holds only the login box, which scripts/run.sh prints
once the server answers (so it is the last thing on the screen, not lost above the workers' logs)."""

import os
import secrets
import subprocess
import sys
from pathlib import Path

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand
from django.urls import reverse

from experiments.services import create_experiment
from projects.models import Engine, Project
from projects.services import create_project

ADMIN = "admin@example.com"

DEMO_BASE_IMAGE = "python:3.11-slim"
DEMO_FILES = {
    "Dockerfile": f"FROM {DEMO_BASE_IMAGE}\nWORKDIR /app\nCOPY . /app\n",
    "aichor_manifests/manifest.yaml": """kind: AIchorManifest
apiVersion: 0.2.3
builder:
  image: demo
  dockerfile: ./Dockerfile
  context: .
spec:
  operator: batch
  image: demo
  command: "python3 -u src/train.py"
  types:
    worker:
      count: 1
      resources:
        cpus: 1
        ramRatio: 1
""",
    "src/train.py": """import os
import time

print("experiment", os.environ["AICHOR_EXPERIMENT_ID"])
for epoch in range(5):
    print(f"epoch {epoch}: loss={1 / (epoch + 1):.3f}", flush=True)
    time.sleep(1)
out = os.environ["AICHOR_OUTPUT_PATH"]
os.makedirs(out, exist_ok=True)
with open(os.path.join(out, "metrics.txt"), "w") as fh:
    fh.write("loss=0.2\\n")
print("wrote", out)
""",
}


# The demo's bare repository delivers each push to this server as GitHub would: a signed push
# webhook. The push waits for the answer, briefly; the server only records and enqueues.
POST_RECEIVE = """#!{python}
\"\"\"aichor: deliver each pushed branch to the local aichor server as a signed GitHub push
webhook, so a commit `aichor[manifest.yaml]: ...` starts an experiment. Written by
`manage.py bootstrap`.\"\"\"
import hashlib
import hmac
import json
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from pathlib import Path

URL = {url!r}
SITE = {site!r}
ZERO = "0" * 40
SECRET = Path(__file__).with_name("aichor-webhook.secret").read_text().strip()
# The server is on this host: never through a proxy the pusher's environment names.
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({{}}))


def head_commit(sha):
    fields = ["git", "log", "-1", "--format=%ae%x00%B", sha, "--"]
    email, _, message = subprocess.run(fields, check=True, capture_output=True, text=True).stdout.partition("\\0")
    return {{"id": sha, "message": message.rstrip("\\n"), "author": {{"email": email}}}}


def deliver(old, new, ref):
    branch = ref.removeprefix("refs/heads/")
    body = json.dumps({{"ref": ref, "before": old, "after": new, "head_commit": head_commit(new)}}).encode()
    signature = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    headers = {{
        "Content-Type": "application/json",
        "X-GitHub-Event": "push",
        "X-GitHub-Delivery": str(uuid.uuid4()),
        "X-Hub-Signature-256": signature,
    }}
    try:
        with OPENER.open(urllib.request.Request(URL, body, headers), timeout=5) as response:
            answer = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return f"aichor: {{URL}} refused the push of {{branch}} (HTTP {{exc.code}})"
    except (OSError, ValueError) as exc:
        return f"aichor: could not deliver the push of {{branch}} to {{URL}} ({{getattr(exc, 'reason', exc)}})"
    if answer.get("created"):
        return f"aichor: experiment started: {{SITE}}/experiments/{{answer['experiment']}}/"
    return f"aichor: {{branch}} delivered, nothing started: {{answer.get('reason')}}"


for line in sys.stdin:
    old, new, ref = line.split()
    if ref.startswith("refs/heads/") and new != ZERO:
        print(deliver(old, new, ref), flush=True)
"""


def install_push_hook(bare: Path, project: Project) -> None:
    """(Re)written on every start: the server's address may have changed (PORT=, HOST=)."""
    hooks = bare / "hooks"
    secret = hooks / "aichor-webhook.secret"
    # Readable by the server's user only, as the SECRET_KEY file beside it in the data folder.
    fd = os.open(secret, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(project.webhook_secret + "\n")
    hook = hooks / "post-receive"
    url = settings.PUBLIC_URL + reverse("webhook-github", args=[project.slug])
    hook.write_text(POST_RECEIVE.format(python=sys.executable, url=url, site=settings.PUBLIC_URL))
    hook.chmod(0o755)


def _git(*args: str, cwd: Path) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def make_demo_repo(root: Path) -> tuple[str, str]:
    bare, work = root / "demo-repo.git", root / "demo-repo"
    if not bare.exists():
        root.mkdir(parents=True, exist_ok=True)
        _git("init", "-q", "--bare", "-b", "main", str(bare), cwd=root)
        _git("clone", "-q", str(bare), str(work), cwd=root)
        for name, content in DEMO_FILES.items():
            (work / name).parent.mkdir(parents=True, exist_ok=True)
            (work / name).write_text(content)
        _git("checkout", "-q", "-b", "main", cwd=work)
        _git("add", "-A", cwd=work)
        _git(
            "-c",
            "user.name=aichor",
            "-c",
            "user.email=demo@example.com",
            "commit",
            "-q",
            "-m",
            "aichor[manifest.yaml]: demo training run",
            cwd=work,
        )
        _git("push", "-q", "origin", "main", cwd=work)
    return f"file://{bare}", _git("rev-parse", "HEAD", cwd=work)


class Command(BaseCommand):
    help = "Create the admin user, engines and a demo project on first start; print where to log in."

    def handle(self, *args, **options) -> None:
        users = get_user_model()
        password = None
        if not users.objects.filter(is_superuser=True).exists():
            password = secrets.token_urlsafe(12)
            users.objects.create_superuser(ADMIN, ADMIN, password)
        engines = []
        if settings.LOCAL_ENGINE:
            local, _ = Engine.objects.get_or_create(name="local", defaults={"kind": Engine.Kind.LOCAL})
            engines.append(local)
        if _docker_available():
            docker, _ = Engine.objects.get_or_create(
                name="docker", defaults={"kind": Engine.Kind.DOCKER, "config": {"network": _docker_network()}}
            )
            if "network" not in docker.config:
                # Made by an earlier start: its default (`bridge`) may not exist on this host.
                docker.config = {**docker.config, "network": _docker_network()}
                docker.save(update_fields=["config"])
            engines.append(docker)
        if not engines:
            self.note("No engine: start a Docker Engine (or set AICHOR_LOCAL_ENGINE=true on a laptop).")
        elif not settings.ALLOW_LOCAL_REPOS:
            # The demo's repository is a folder on this server, which only that setting allows.
            self.note("No demo project: its Git repository is local (AICHOR_ALLOW_LOCAL_REPOS=true).")
        elif not Project.objects.filter(slug="demo").exists():
            admin = users.objects.filter(is_superuser=True).first()
            url, sha = make_demo_repo(Path(settings.DATA_DIR))
            # Docker whenever it answers and can get the demo's base image: its containers are
            # isolated from the server, local processes are not. A Docker host without a
            # registry would only fail the demo at Building.
            docker_engine = next((e for e in engines if e.kind == Engine.Kind.DOCKER), None)
            default = engines[0]
            if docker_engine is not None:
                if _demo_base_available():
                    default = docker_engine
                else:
                    self.note(
                        f"Docker cannot get {DEMO_BASE_IMAGE} (no registry reachable?): "
                        f"the demo runs on the {default.name} engine."
                    )
            project = create_project(
                name="Demo", slug="demo", repo_clone_url=url, engines=engines, default_engine=default, admins=[admin]
            )
            create_experiment(
                project=project,
                commit_sha=sha,
                branch="main",
                message="aichor[manifest.yaml]: demo training run",
                author=admin,
                manifest_path="aichor_manifests/manifest.yaml",
            )
        demo = Project.objects.filter(slug="demo").first()
        bare = Path(settings.DATA_DIR) / "demo-repo.git"
        if demo is not None and bare.is_dir():
            try:
                install_push_hook(bare, demo)
            except ValueError as exc:  # the secret no longer decrypts: the server still starts
                self.note(f"The demo repository's push hook is not updated: {exc}")
        self.stdout.write(login_box(password))

    def note(self, text: str) -> None:
        self.stderr.write(text, style_func=lambda plain: plain)


def login_box(password: str | None) -> str:
    lines = [f"aichor is running at {settings.PUBLIC_URL}/"]
    if password:
        lines += [
            f"Log in as {ADMIN} with password {password}",
            f"(shown this once: change it at {settings.PUBLIC_URL}/admin/password_change/)",
        ]
    else:
        python = os.path.relpath(sys.executable)
        python = sys.executable if python.startswith("..") else python
        lines += [f"Log in as {ADMIN}", f"Lost the password? {python} manage.py changepassword {ADMIN}"]
    width = max(len(line) for line in lines)
    return "\n".join(
        [f"┌{'─' * (width + 2)}┐", *(f"│ {line.ljust(width)} │" for line in lines), f"└{'─' * (width + 2)}┘"]
    )


def _docker_network() -> str:
    """Docker's own `bridge` where the host has it; a dockerd started with --bridge=none has
    only `none` (isolated namespaces), never the host's network."""
    try:
        import docker

        # The name filter matches substrings ("my-bridge-net"): compare exactly.
        names = {n.name for n in docker.from_env(timeout=3).networks.list(names=["bridge"])}
        return "bridge" if "bridge" in names else "none"
    except Exception:  # answered a ping a moment ago; a hiccup now gets the safe choice
        return "none"


def _demo_base_available() -> bool:
    """The demo's base image is on the Docker host, or can be pulled now (on a first start the
    demo's build would pull it anyway; here a host without a registry is told at once)."""
    try:
        import docker

        client = docker.from_env(timeout=300)
        try:
            client.images.get(DEMO_BASE_IMAGE)
            return True
        except docker.errors.ImageNotFound:
            client.images.pull(DEMO_BASE_IMAGE)
            return True
    except Exception:  # no registry, no DNS, a timeout: the demo goes elsewhere
        return False


def _docker_available() -> bool:
    try:
        import docker

        docker.from_env(timeout=3).ping()
        return True
    except Exception:  # no daemon: the demo simply offers the local engine only
        return False
