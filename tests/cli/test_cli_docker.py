"""The CLI against the docker engine: the scaffolded project, and port-forward into a container."""

import socket

import pytest
import requests

from tests.helpers import TEST_IMAGE, containers_of, manifest_yaml, wait_for

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.docker]


@pytest.fixture
def on_docker(logged_in, project, docker_engine):
    project.engines.add(docker_engine)
    logged_in.run("context", "set", "engine", "docker")
    return logged_in


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_local_repo_init_project_succeeds_on_docker(on_docker, tmp_path, celery_worker_thread, docker_client):
    repo = tmp_path / "my-model"
    out = on_docker.run("local-repo", "init", str(repo), "--base-image", TEST_IMAGE).stdout
    assert "aichor_manifests/manifest.yaml" in out
    assert {p.name for p in repo.iterdir()} >= {"Dockerfile", "aichor_manifests", "src"}
    assert "already exists" in on_docker.run("local-repo", "init", str(repo), check=False).stderr

    experiment = on_docker.json("experiments", "submit", "local", "--repo-dir", str(repo))
    assert experiment["engine"] == "docker"
    done = on_docker.wait_status(experiment["id"], ("Succeeded", "Failed", "Cancelled"), timeout=180)
    assert done["status"] == "Succeeded", done["failure_reason"]
    assert (
        f"hello from aichor experiment {experiment['id']}"
        in on_docker.run("experiments", "logs", experiment["id"]).stdout
    )


def test_port_forward_reaches_a_server_inside_the_container(on_docker, tmp_path, celery_worker_thread, docker_client):
    port, local_port = free_port(), free_port()
    repo = tmp_path / "repo"
    files = {
        "aichor_manifests/manifest.yaml": manifest_yaml(
            f"mkdir -p /tmp/www && echo forwarded-ok > /tmp/www/index.html && httpd -f -p {port} -h /tmp/www"
        ),
        "Dockerfile": f"FROM {TEST_IMAGE}\n",
    }
    for rel, text in files.items():
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        (repo / rel).write_text(text)
    experiment = on_docker.json("experiments", "submit", "local", "--repo-dir", str(repo))
    wait_for(
        lambda: on_docker.json("experiments", "status", experiment["id"])["current_step"] == "Running",
        timeout=120,
        interval=0.3,
        message="the container to run",
    )
    forward = on_docker.popen(
        "experiments",
        "port-forward",
        experiment["id"],
        str(port),
        "--process",
        "worker-0",
        "--local-port",
        str(local_port),
    )
    try:
        assert "Forwarding 127.0.0.1:" in forward.stdout.readline()

        def fetch():
            try:
                return requests.get(f"http://127.0.0.1:{local_port}/index.html", timeout=5).text
            except requests.ConnectionError:
                return None

        assert (
            wait_for(fetch, timeout=30, interval=0.2, message="httpd to answer through the tunnel") == "forwarded-ok\n"
        )
        # Several connections, one WebSocket each.
        assert all(fetch() == "forwarded-ok\n" for _ in range(3))
    finally:
        forward.terminate()
        forward.wait(10)
        on_docker.run("experiments", "cancel", experiment["id"], check=False)
    wait_for(lambda: not [c for c in containers_of(docker_client, experiment["id"]) if c["State"] == "running"],
             timeout=30, message="the container to stop")  # fmt: skip


def test_port_forward_of_a_finished_experiment_is_refused(on_docker, project, member_user):
    from experiments import services
    from experiments.models import Status

    experiment = services.create_experiment(project=project, commit_sha="a" * 40, manifest_path="m.yaml")
    services.finish_experiment(experiment.pk, Status.FAILED, reason="x")
    result = on_docker.run("experiments", "port-forward", str(experiment.pk), "8888", check=False)
    assert result.returncode == 1 and "is not running" in result.stderr and "Traceback" not in result.stderr
