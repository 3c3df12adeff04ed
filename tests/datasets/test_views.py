"""The Datasets tab through the test client, on both backends: personas, every route, hostile
keys, CSRF."""

import io
import os
from urllib.parse import urlencode

import pytest
from django.test import Client

from datasets import services
from tests.datasets.conftest import downloaded
from tests.datasets.test_services import HOSTILE_KEYS


def login(client, user, password):
    assert client.login(username=user.username, password=password)
    return client


@pytest.fixture
def member(client, member_user):
    return login(client, member_user, "pw-member-123")


def url(name: str, project, **query) -> str:
    return f"/p/{project.slug}/datasets/{name}" + ("?" + urlencode(query) if query else "")


# (method, path, data) for every storage route, with a key slot filled in by each test.
def routes(project, key="data/a.txt", prefix="data/"):
    return [
        ("get", url("", project, bucket="inputs", prefix=prefix), None),
        ("get", url("preview/", project, bucket="inputs", key=key), None),
        ("get", url("download/", project, bucket="inputs", key=key), None),
        ("post", url("folders/", project), {"bucket": "inputs", "prefix": prefix, "name": "new"}),
        ("post", url("delete/", project), {"bucket": "inputs", "key": key}),
        ("post", url("uploads/start/", project), {"bucket": "inputs", "key": key, "size": "3"}),
        ("put", url("uploads/part/", project, bucket="inputs", key=key, upload_id="0" * 32, part=1), b"abc"),
        (
            "post",
            url("uploads/complete/", project),
            {"bucket": "inputs", "key": key, "upload_id": "0" * 32, "size": "3"},
        ),
        ("post", url("uploads/abort/", project), {"bucket": "inputs", "key": key, "upload_id": "0" * 32}),
    ]


def call(client, method, path, data, **extra):
    if method == "put":
        return client.put(path, data=data, content_type="application/octet-stream", **extra)
    if method == "post":
        return client.post(path, data=data, **extra)
    return client.get(path, **extra)


def upload_via_endpoints(client, project, bucket: str, key: str, payload: bytes):
    start = client.post(url("uploads/start/", project), {"bucket": bucket, "key": key, "size": len(payload)})
    assert start.status_code == 201, start.content
    info = start.json()
    for number in range(1, info["parts"] + 1):
        chunk = payload[(number - 1) * info["part_size"] : number * info["part_size"]]
        part = client.put(
            url("uploads/part/", project, bucket=bucket, key=key, upload_id=info["upload_id"], part=number),
            data=chunk,
            content_type="application/octet-stream",
        )
        assert part.status_code == 200, part.content
    done = client.post(
        url("uploads/complete/", project),
        {"bucket": bucket, "key": key, "upload_id": info["upload_id"], "size": len(payload)},
    )
    assert done.status_code == 201, done.content


def test_outsider_gets_404_on_every_route(backend, buckets, client, outsider_user):
    login(client, outsider_user, "pw-out-123")
    for method, path, data in routes(buckets):
        assert call(client, method, path, data).status_code == 404, path


def test_anonymous_is_sent_to_login_on_every_route(backend, buckets, client):
    for method, path, data in routes(buckets):
        response = call(client, method, path, data)
        assert response.status_code == 302 and "/login/" in response["Location"], path


def test_wrong_methods_get_405(backend, buckets, member):
    project = buckets
    for method, path, _data in routes(project):
        wrong = {"get": "delete", "post": "get", "put": "post"}[method]
        response = getattr(member, wrong)(path)
        assert response.status_code == 405, (wrong, path)


def test_csrf_is_enforced_on_every_change(backend, buckets, member_user):
    client = login(Client(enforce_csrf_checks=True), member_user, "pw-member-123")
    for method, path, data in routes(buckets):
        if method != "get":
            assert call(client, method, path, data).status_code == 403, path
    services.upload_object(buckets.inputs_bucket, "data/a.txt", io.BytesIO(b"abc"), 3)
    assert [e.key for e in services.list_objects(buckets.inputs_bucket, "data/").entries] == ["data/a.txt"]


@pytest.mark.parametrize("key", HOSTILE_KEYS[:-1])
def test_hostile_keys_are_refused_on_every_route(backend, buckets, member, key):
    outside = services.bucket_root(buckets.inputs_bucket).parent
    before = sorted(p.name for p in outside.iterdir())
    for method, path, data in routes(buckets, key=key, prefix=key.rstrip("/") + "/"):
        response = call(member, method, path, data)
        assert response.status_code == 400, (path, response.status_code)
        body = response.content.decode()
        assert "not allowed" in body or "control characters" in body or "longer than" in body or "empty" in body, body[
            :300
        ]
    response = member.post(url("folders/", buckets), {"bucket": "inputs", "prefix": "", "name": key})
    assert response.status_code == 400
    assert sorted(p.name for p in outside.iterdir()) == before


def test_member_uploads_in_parts_browses_previews_downloads_and_deletes(backend, buckets, member, settings):
    settings.AICHOR_UPLOAD_PART_MB = 5
    project = buckets
    payload = os.urandom(11 * 1024 * 1024)
    upload_via_endpoints(member, project, "inputs", "data/train.bin", payload)
    upload_via_endpoints(member, project, "inputs", "data/table.csv", b"name,score\nada,3\nbob,4\n")
    upload_via_endpoints(member, project, "inputs", "data/meta.json", b'{"a": [1, 2]}')

    page = member.get(url("", project, bucket="inputs"))
    assert page.status_code == 200
    assert project.inputs_bucket in page.content.decode()
    inner = member.get(url("", project, bucket="inputs", prefix="data/")).content.decode()
    assert "train.bin" in inner and "11.0\xa0MB" in inner and "table.csv" in inner

    table = member.get(url("preview/", project, bucket="inputs", key="data/table.csv"), HTTP_HX_REQUEST="true")
    assert '<th scope="col">score</th>' in table.content.decode() and "<td>ada</td>" in table.content.decode()
    meta = member.get(url("preview/", project, bucket="inputs", key="data/meta.json")).content.decode()
    assert "&quot;a&quot;: [" in meta
    binary = member.get(url("preview/", project, bucket="inputs", key="data/train.bin")).content.decode()
    assert "No preview for this kind of file (11.0\xa0MB)" in binary
    assert member.get(url("preview/", project, bucket="inputs", key="data/none.png")).status_code == 404

    headers, body = downloaded(member.get(url("download/", project, bucket="inputs", key="data/train.bin")))
    assert headers["Content-Disposition"] == 'attachment; filename="train.bin"'
    assert int(headers["Content-Length"]) == len(payload)
    assert body == payload

    folder = member.post(url("folders/", project), {"bucket": "inputs", "prefix": "data/", "name": "raw"})
    assert folder.status_code == 302
    assert "raw/" in member.get(url("", project, bucket="inputs", prefix="data/")).content.decode()

    gone = member.post(url("delete/", project), {"bucket": "inputs", "key": "data/train.bin"})
    assert gone.status_code == 302
    assert member.get(url("download/", project, bucket="inputs", key="data/train.bin")).status_code == 404
    member.post(url("delete/", project), {"bucket": "inputs", "key": "data/"})
    assert services.list_objects(project.inputs_bucket).entries == []


def test_admin_sees_the_outputs_bucket_and_connection_details(backend, buckets, client, admin_user):
    login(client, admin_user, "pw-admin-123")
    services.upload_object(buckets.outputs_bucket, "output/run1/result.txt", io.BytesIO(b"42"), 2)
    page = client.get(url("", buckets, bucket="outputs", prefix="output/run1/")).content.decode()
    assert "result.txt" in page and buckets.outputs_bucket in page
    if backend == "s3":
        assert "aws --endpoint-url" in page and "boto3.client" in page and "aichor-test-access" in page


def test_htmx_navigation_returns_the_browser_partial(backend, buckets, member):
    response = member.get(url("", buckets, bucket="outputs"), HTTP_HX_REQUEST="true")
    body = response.content.decode()
    assert response.status_code == 200
    assert body.lstrip().startswith('<section id="browser"') and "<html" not in body


def test_pagination_link_moves_through_a_big_folder(backend, buckets, member, settings):
    settings.AICHOR_DATASETS_PAGE_SIZE = 5
    for i in range(8):
        services.upload_object(buckets.inputs_bucket, f"f{i}.txt", io.BytesIO(b"x"), 1)
    first = member.get(url("", buckets, bucket="inputs"))
    assert "f4.txt" in first.content.decode() and "f5.txt" not in first.content.decode()
    cursor = first.context["page"].next_cursor
    second = member.get(url("", buckets, bucket="inputs", cursor=cursor)).content.decode()
    assert "f5.txt" in second and "f7.txt" in second and "f4.txt" not in second and "First page" in second


def test_svg_is_never_served_inline(backend, buckets, member):
    services.upload_object(buckets.inputs_bucket, "x.svg", io.BytesIO(b"<svg onload=alert(1)>"), 21)
    headers, _ = downloaded(member.get(url("download/", buckets, bucket="inputs", key="x.svg", inline=1)))
    assert headers["Content-Type"] == "application/octet-stream"
    assert headers["Content-Disposition"].startswith("attachment")
