"""Symbolic links a workload leaves in a filesystem bucket (issue 10): every Datasets route,
through the test client, with links made on disk exactly as a docker workload makes them
(`ln -s / $AICHOR_OUTPUT_PATH/hostroot`). Nothing is ever read, written or deleted through a
link; links are listed as links and can be deleted."""

import os
import uuid
from pathlib import Path

import pytest

from datasets import services
from experiments import logs
from experiments.models import Status
from tests.datasets.test_views import url
from tests.helpers import DOCKERFILE, ended, push

RUN = "output/run1/"
SECRET = b"top secret, outside the bucket\n"


@pytest.fixture
def fs_project(settings, project):
    settings.AICHOR_STORAGE = "filesystem"
    services.ensure_buckets(project)
    return project


@pytest.fixture
def run_dir(fs_project) -> Path:
    """output/run1/ of the outputs bucket, as the docker engine mounts it into a workload."""
    folder = services.bucket_root(fs_project.outputs_bucket) / RUN
    folder.mkdir(parents=True)
    return folder


@pytest.fixture
def outside(tmp_path) -> Path:
    """A folder of the server's host, outside every bucket, that a workload points links at."""
    folder = tmp_path / "host-folder"
    (folder / "deep").mkdir(parents=True)
    (folder / "secret.txt").write_bytes(SECRET)
    (folder / "deep" / "keep.txt").write_bytes(b"keep me\n")
    return folder


@pytest.fixture
def member(client, member_user):
    assert client.login(username=member_user.username, password="pw-member-123")
    return client


def host_tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def browse(client, project, prefix: str, **extra):
    return client.get(url("", project, bucket="outputs", prefix=prefix), **extra)


def test_listing_shows_links_as_links_and_never_the_hosts_files(fs_project, run_dir, outside, member):
    os.symlink("/", run_dir / "hostroot")
    os.symlink("/etc/shadow", run_dir / "x.txt")
    os.symlink(outside, run_dir / "elsewhere")
    (run_dir / "real.txt").write_bytes(b"42\n")

    page = browse(member, fs_project, RUN)
    assert page.status_code == 200
    entries = {e.name: e for e in page.context["page"].entries}
    assert set(entries) == {"hostroot", "x.txt", "elsewhere", "real.txt"}
    for name, target in (("hostroot", "/"), ("x.txt", "/etc/shadow"), ("elsewhere", str(outside))):
        assert entries[name].is_link and not entries[name].is_folder, name
        assert entries[name].target == target and entries[name].size is None, name
    assert not entries["real.txt"].is_link and entries["real.txt"].size == 3
    body = page.content.decode()
    assert "link, not followed" in body and "→ <code>/etc/shadow</code>" in body
    # Not clickable as a folder, and no download link for a link to a file.
    assert f"prefix={RUN}hostroot" not in body.replace("%2F", "/")
    assert f"key={RUN}x.txt" not in body.replace("%2F", "/")
    assert "Delete the link x.txt?" in body

    # The htmx swap renders the same partial with the same entries.
    swap = browse(member, fs_project, RUN, HTTP_HX_REQUEST="true").content.decode()
    assert swap.lstrip().startswith('<section id="browser"') and "link, not followed" in swap

    for prefix in (f"{RUN}hostroot/", f"{RUN}hostroot/etc/", f"{RUN}elsewhere/", f"{RUN}elsewhere/deep/"):
        inside = browse(member, fs_project, prefix)
        text = inside.content.decode()
        assert inside.status_code == 400, prefix
        assert "is a symbolic link made by a workload" in text, prefix
        assert inside.context["page"] is None
        for host_name in ("passwd", "shadow", "secret.txt", "keep.txt"):
            assert host_name not in text.replace("/etc/shadow", ""), (prefix, host_name)


@pytest.mark.parametrize(
    "key",
    [f"{RUN}x.txt", f"{RUN}passwd.txt", f"{RUN}hostroot/etc/passwd", f"{RUN}elsewhere/secret.txt"],
)
def test_download_and_preview_through_a_link_are_refused(fs_project, run_dir, outside, member, key):
    os.symlink(outside / "secret.txt", run_dir / "x.txt")
    os.symlink("/etc/passwd", run_dir / "passwd.txt")
    os.symlink("/", run_dir / "hostroot")
    os.symlink(outside, run_dir / "elsewhere")
    host_passwd = Path("/etc/passwd").read_bytes()

    download = member.get(url("download/", fs_project, bucket="outputs", key=key))
    assert download.status_code == 400, key
    assert "is a symbolic link made by a workload" in download.content.decode()
    for htmx in ({}, {"HTTP_HX_REQUEST": "true"}):
        preview = member.get(url("preview/", fs_project, bucket="outputs", key=key), **htmx)
        assert preview.status_code == 400, (key, htmx)
        assert "is a symbolic link made by a workload" in preview.content.decode()
        assert SECRET.decode().strip() not in preview.content.decode()
        assert host_passwd.decode().splitlines()[0] not in preview.content.decode()
    assert SECRET not in download.content and host_passwd[:20] not in download.content


def test_upload_through_a_linked_folder_is_refused_and_writes_nothing_outside(fs_project, run_dir, outside, member):
    os.symlink(outside, run_dir / "escape")
    before = host_tree(outside)
    key = f"{RUN}escape/planted.txt"
    start = member.post(url("uploads/start/", fs_project), {"bucket": "outputs", "key": key, "size": 3})
    assert start.status_code == 400 and "escape is a symbolic link" in start.json()["error"]

    # A workload swaps a folder for a link while an upload is under way: the parts already
    # sent are refused from then on, and so is completing it.
    key = f"{RUN}later/planted.txt"
    started = member.post(url("uploads/start/", fs_project), {"bucket": "outputs", "key": key, "size": 6})
    assert started.status_code == 201, started.content
    upload_id = started.json()["upload_id"]
    part = url("uploads/part/", fs_project, bucket="outputs", key=key, upload_id=upload_id, part=1)
    assert member.put(part, data=b"abc", content_type="application/octet-stream").status_code == 200
    os.symlink(outside, run_dir / "later")
    part2 = url("uploads/part/", fs_project, bucket="outputs", key=key, upload_id=upload_id, part=2)
    refused_part = member.put(part2, data=b"def", content_type="application/octet-stream")
    assert refused_part.status_code == 400 and "later is a symbolic link" in refused_part.json()["error"]
    complete = member.post(
        url("uploads/complete/", fs_project), {"bucket": "outputs", "key": key, "upload_id": upload_id, "size": 3}
    )
    assert complete.status_code == 400 and "later is a symbolic link" in complete.json()["error"]
    assert host_tree(outside) == before


def test_upload_onto_a_link_replaces_the_link_and_leaves_its_target(fs_project, run_dir, outside, member):
    os.symlink(outside / "secret.txt", run_dir / "x.txt")
    key = f"{RUN}x.txt"
    started = member.post(url("uploads/start/", fs_project), {"bucket": "outputs", "key": key, "size": 3})
    upload_id = started.json()["upload_id"]
    part = url("uploads/part/", fs_project, bucket="outputs", key=key, upload_id=upload_id, part=1)
    assert member.put(part, data=b"new", content_type="application/octet-stream").status_code == 200
    done = member.post(
        url("uploads/complete/", fs_project), {"bucket": "outputs", "key": key, "upload_id": upload_id, "size": 3}
    )
    assert done.status_code == 201, done.content
    assert (outside / "secret.txt").read_bytes() == SECRET
    assert not (run_dir / "x.txt").is_symlink() and (run_dir / "x.txt").read_bytes() == b"new"


def test_create_folder_through_a_link_is_refused(fs_project, run_dir, outside, member):
    os.symlink(outside, run_dir / "escape")
    inside = member.post(url("folders/", fs_project), {"bucket": "outputs", "prefix": f"{RUN}escape/", "name": "new"})
    assert inside.status_code == 400 and "escape is a symbolic link" in inside.content.decode()
    on_link = member.post(url("folders/", fs_project), {"bucket": "outputs", "prefix": RUN, "name": "escape"})
    assert on_link.status_code == 400 and "escape is a symbolic link" in on_link.content.decode()
    assert sorted(p.name for p in outside.iterdir()) == ["deep", "secret.txt"]


def test_deleting_a_link_removes_only_the_link(fs_project, run_dir, outside, member):
    os.symlink(outside / "secret.txt", run_dir / "x.txt")
    os.symlink(outside, run_dir / "elsewhere")
    os.symlink(outside, run_dir / "asfolder")
    before = host_tree(outside)

    through = member.post(url("delete/", fs_project), {"bucket": "outputs", "key": f"{RUN}elsewhere/secret.txt"})
    assert through.status_code == 400 and "elsewhere is a symbolic link" in through.content.decode()
    through_folder = member.post(url("delete/", fs_project), {"bucket": "outputs", "key": f"{RUN}elsewhere/deep/"})
    assert through_folder.status_code == 400
    assert host_tree(outside) == before

    for key in (f"{RUN}x.txt", f"{RUN}elsewhere", f"{RUN}asfolder/"):
        gone = member.post(url("delete/", fs_project), {"bucket": "outputs", "key": key})
        assert gone.status_code == 302, (key, gone.content)
    assert list(run_dir.iterdir()) == []
    assert host_tree(outside) == before


def test_deleting_a_folder_holding_links_keeps_what_they_point_to(fs_project, run_dir, outside, member):
    (run_dir / "sub" / "inner").mkdir(parents=True)
    (run_dir / "sub" / "model.bin").write_bytes(b"weights")
    os.symlink(outside, run_dir / "sub" / "inner" / "to-outside")
    os.symlink("/", run_dir / "sub" / "hostroot")
    os.symlink(outside / "secret.txt", run_dir / "sub" / "secret.txt")
    before = host_tree(outside)

    gone = member.post(url("delete/", fs_project), {"bucket": "outputs", "key": RUN}, HTTP_HX_REQUEST="true")
    assert gone.status_code == 200, gone.content
    assert not run_dir.exists()
    assert host_tree(outside) == before
    assert Path("/etc/passwd").is_file()


def test_fifo_left_by_a_workload_is_refused_not_read(fs_project, run_dir, member):
    os.mkfifo(run_dir / "pipe.txt")  # opening it for reading would hang the server
    for route in ("download/", "preview/"):
        response = member.get(url(route, fs_project, bucket="outputs", key=f"{RUN}pipe.txt"))
        assert response.status_code == 400, route
        assert "not a regular file" in response.content.decode()


def test_names_that_are_not_utf8_still_list(fs_project, run_dir, member):
    os.symlink(b"/\xff", os.path.join(os.fsencode(run_dir), b"bad\xfename"))
    page = browse(member, fs_project, RUN)
    assert page.status_code == 200 and "bad\ufffdname" in page.content.decode()


@pytest.mark.docker
@pytest.mark.django_db(transaction=True)
def test_docker_workload_links_are_shown_never_followed(
    client, settings, docker_project, git_repo, docker_client, member_user, celery_worker_thread, tmp_path
):
    settings.AICHOR_STORAGE = "filesystem"
    services.ensure_buckets(docker_project)
    escape = f"aichor-escape-{uuid.uuid4().hex}"
    command = (
        'ln -s / "$AICHOR_OUTPUT_PATH/hostroot" && ln -s /etc/shadow "$AICHOR_OUTPUT_PATH/x.txt" '
        '&& echo real > "$AICHOR_OUTPUT_PATH/real.txt" && ls -la "$AICHOR_OUTPUT_PATH"'
    )
    experiment = ended(push(client, docker_project, git_repo, command, dockerfile=DOCKERFILE))
    assert experiment.status == Status.SUCCEEDED, (
        experiment.failure_reason,
        logs.log_text(experiment.pk, "process:worker-0"),
    )
    assert client.login(username=member_user.username, password="pw-member-123")
    prefix = experiment.output_prefix

    page = browse(client, docker_project, prefix)
    entries = {e.name: e for e in page.context["page"].entries}
    assert entries["hostroot"].is_link and entries["hostroot"].target == "/"
    assert entries["x.txt"].is_link and entries["x.txt"].target == "/etc/shadow"
    assert browse(client, docker_project, f"{prefix}hostroot/etc/").status_code == 400
    shadow = client.get(url("download/", docker_project, bucket="outputs", key=f"{prefix}x.txt"))
    assert shadow.status_code == 400 and b"root:" not in shadow.content

    key = f"{prefix}hostroot/tmp/{escape}"
    try:
        start = client.post(url("uploads/start/", docker_project), {"bucket": "outputs", "key": key, "size": 1})
        assert start.status_code == 400 and "hostroot is a symbolic link" in start.json()["error"]
        assert not Path("/tmp", escape).exists()
    finally:
        Path("/tmp", escape).unlink(missing_ok=True)

    assert client.post(url("delete/", docker_project), {"bucket": "outputs", "key": prefix}).status_code == 302
    assert browse(client, docker_project, "output/").context["page"].entries == []
    assert Path("/etc/passwd").is_file()


@pytest.mark.django_db(transaction=True)
def test_output_folder_swapped_for_a_link_fails_the_next_experiment_and_writes_nothing_outside(
    client, fs_project, git_repo, outside, celery_worker_thread
):
    # What a previous workload can do through its mount: `mv output o; ln -s /somewhere output`.
    os.symlink(outside, services.bucket_root(fs_project.outputs_bucket) / "output")
    experiment = ended(push(client, fs_project, git_repo, 'echo hi > "$AICHOR_OUTPUT_PATH/hi.txt"'))
    assert experiment.status == Status.FAILED
    assert "output is a symbolic link made by a workload" in experiment.failure_reason
    assert sorted(p.name for p in outside.iterdir()) == ["deep", "secret.txt"]
