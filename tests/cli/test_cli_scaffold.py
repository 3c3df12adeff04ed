"""`aichor local-repo init`: next steps that fit this machine's configuration, and a Dockerfile
whose dependency layer survives code edits (the build cache works as its comment says)."""

import shlex
import uuid

import pytest

from tests.helpers import TEST_IMAGE


def next_steps(output: str) -> list[str]:
    return [line.strip() for line in output.split("\nNext:\n", 1)[1].splitlines()]


def test_init_on_a_fresh_machine_lists_every_step(cli, tmp_path):
    repo = tmp_path / "my model"
    output = cli.run("local-repo", "init", str(repo)).stdout
    assert next_steps(output) == [
        f"cd {shlex.quote(str(repo))}",
        "edit src/main.py (and list its packages in src/requirements.txt)",
        "aichor auth key --apikey TOKEN --url https://…   (a token from the server's API token page)",
        "aichor context set project NAME",
        "aichor experiments submit local",
    ]
    assert "aichor_manifests/manifest.yaml" in output


@pytest.mark.django_db(transaction=True)
def test_init_here_once_configured_needs_only_the_submit(logged_in, tmp_path):
    output = logged_in.run("local-repo", "init", cwd=tmp_path).stdout
    assert next_steps(output) == [
        "edit src/main.py (and list its packages in src/requirements.txt)",
        "aichor experiments submit local",
    ]
    assert (tmp_path / "Dockerfile").is_file()


def build_steps(docker_client, context, tag: str) -> dict[str, str]:
    """Each build step's instruction and what the builder said about it."""
    text = "".join(
        piece.get("stream", "")
        for piece in docker_client.api.build(path=str(context), tag=tag, rm=True, decode=True, buildargs={})
    )
    steps = {}
    for part in text.split("Step ")[1:]:
        head, _, said = part.partition("\n")
        steps[head.split(" : ", 1)[1]] = said
    return steps


@pytest.mark.docker
def test_a_code_edit_reuses_the_dependency_layer(cli, tmp_path, docker_client):
    repo = tmp_path / "model"
    cli.run("local-repo", "init", str(repo), "--base-image", TEST_IMAGE)
    run = uuid.uuid4().hex[:8]
    tag = f"aichor-test/scaffold-{run}"
    try:
        build_steps(docker_client, repo, tag)
        # Contents of this run's own: the build cache is by content, and outlives the test.
        (repo / "src" / "main.py").write_text(f"print('edited in {run}')\n")
        steps = build_steps(docker_client, repo, tag)
        install = next(instruction for instruction in steps if instruction.startswith("RUN "))
        assert "Using cache" in steps[install]
        assert "Using cache" not in steps["COPY . /app/"]

        (repo / "src" / "requirements.txt").write_text(f"numpy  # {run}\n")
        steps = build_steps(docker_client, repo, tag)
        assert "Using cache" not in steps[install]  # a dependency change does reinstall
    finally:
        docker_client.images.remove(tag, force=True)
