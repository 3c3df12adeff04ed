"""First start of `make run`: an admin user, engines, and a demo project whose Git repository
already holds a runnable experiment, so a new user sees aichor work before configuring anything.
Idempotent: later starts only print where to go."""

import secrets
import subprocess
from pathlib import Path

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand

from experiments.services import create_experiment
from projects.models import Engine, Project
from projects.services import create_project

ADMIN = "admin@example.com"

DEMO_FILES = {
    "Dockerfile": "FROM python:3.11-slim\nWORKDIR /app\nCOPY . /app\n",
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
        local, _ = Engine.objects.get_or_create(name="local", defaults={"kind": Engine.Kind.LOCAL})
        engines = [local]
        if _docker_available():
            docker, _ = Engine.objects.get_or_create(name="docker", defaults={"kind": Engine.Kind.DOCKER})
            engines.append(docker)
        if not Project.objects.filter(slug="demo").exists():
            admin = users.objects.filter(is_superuser=True).first()
            url, sha = make_demo_repo(Path(settings.DATA_DIR))
            project = create_project(
                name="Demo", slug="demo", repo_clone_url=url, engines=engines, default_engine=local, admins=[admin]
            )
            create_experiment(
                project=project,
                commit_sha=sha,
                branch="main",
                message="aichor[manifest.yaml]: demo training run",
                author=admin,
                manifest_path="aichor_manifests/manifest.yaml",
            )
        self.stdout.write(f"\naichor is starting at {settings.PUBLIC_URL}/")
        if password:
            self.stdout.write(f"Log in as {ADMIN} with password {password}  (shown once; change it in the admin)\n")
        else:
            self.stdout.write(
                f"Log in as {ADMIN} (`python manage.py changepassword {ADMIN}` if you lost the password)\n"
            )


def _docker_available() -> bool:
    try:
        import docker

        docker.from_env(timeout=3).ping()
        return True
    except Exception:  # no daemon: the demo simply offers the local engine only
        return False
