"""Storage services on both backends (the filesystem and a real S3 server)."""

import io
import os

import pytest

from datasets import services
from datasets.services import InvalidKey

HOSTILE_KEYS = [
    "../x",
    "/etc/passwd",
    "a/../../b",
    "a/./b",
    "a\x00b",
    "a\nb",
    "a\x1fb",
    "a\x7fb",
    "%2e%2e/x",
    "x" * 2000,
    "a\u2215b",  # division slash
    "a\uff0fb",  # fullwidth solidus
    "\u2024\u2024/x",  # one dot leader
    "\uff0e\uff0e/x",  # fullwidth full stop
    "a//b",
    "a\\b",
    "a b",
    "",
]


@pytest.mark.parametrize("key", HOSTILE_KEYS)
def test_hostile_keys_are_refused_with_a_reason(key):
    with pytest.raises(InvalidKey) as exc:
        services.validate_key(key)
    assert str(exc.value)
    with pytest.raises(InvalidKey):
        services.validate_key(key.rstrip("/") + "/", folder=True)


@pytest.mark.parametrize("key", ["data/train.csv", "a", "A-b_c.1/x.tar.gz", ".hidden", "x" * 255])
def test_ordinary_keys_pass(key):
    assert services.validate_key(key) == key
    assert services.validate_key(key + "/", folder=True) == key + "/"


def test_bucket_root_is_a_folder():
    assert services.validate_key("", folder=True) == ""


def test_ensure_buckets_is_idempotent(backend, buckets):
    services.ensure_buckets(buckets)
    services.ensure_buckets(buckets)
    assert services.list_objects(buckets.inputs_bucket).entries == []


def test_upload_list_download_delete_round_trip(backend, buckets):
    bucket = buckets.inputs_bucket
    payload = os.urandom(3 * 1024 * 1024 + 17)
    services.upload_object(bucket, "data/train.bin", io.BytesIO(payload), len(payload))
    services.upload_object(bucket, "readme.txt", io.BytesIO(b"hello"), 5)

    root = services.list_objects(bucket)
    assert [(e.name, e.is_folder) for e in root.entries] == [("data", True), ("readme.txt", False)]
    inner = services.list_objects(bucket, "data/").entries
    assert [(e.key, e.size) for e in inner] == [("data/train.bin", len(payload))]
    assert inner[0].modified is not None

    obj = services.open_object(bucket, "data/train.bin")
    assert obj.size == len(payload)
    assert b"".join(obj.chunks()) == payload

    assert services.delete(bucket, "data/") == 1
    assert [e.name for e in services.list_objects(bucket).entries] == ["readme.txt"]
    services.delete(bucket, "readme.txt")
    assert services.list_objects(bucket).entries == []
    with pytest.raises(FileNotFoundError):
        services.open_object(bucket, "readme.txt")


def test_multipart_upload_in_small_parts_resumes_and_checks_size(backend, buckets, settings):
    settings.AICHOR_UPLOAD_PART_MB = 5  # the S3 minimum part size
    bucket = buckets.outputs_bucket
    part = 5 * 1024 * 1024
    payload = os.urandom(2 * part + 1000)
    upload = services.start_upload(bucket, "ckpt/model.pt", len(payload))
    assert upload["parts"] == 3 and upload["part_size"] == part
    chunks = [payload[i : i + part] for i in range(0, len(payload), part)]
    # Parts arrive out of order and one is sent twice (a retry after a lost answer).
    for number in (3, 1, 1):
        services.upload_part(
            bucket,
            "ckpt/model.pt",
            upload["upload_id"],
            number,
            io.BytesIO(chunks[number - 1]),
            len(chunks[number - 1]),
        )
    with pytest.raises(InvalidKey, match="incomplete"):
        services.complete_upload(bucket, "ckpt/model.pt", upload["upload_id"], len(payload))
    assert services.list_objects(bucket, "ckpt/").entries == []  # nothing half-written shows
    services.upload_part(bucket, "ckpt/model.pt", upload["upload_id"], 2, io.BytesIO(chunks[1]), len(chunks[1]))
    services.complete_upload(bucket, "ckpt/model.pt", upload["upload_id"], len(payload))
    assert b"".join(services.open_object(bucket, "ckpt/model.pt").chunks()) == payload


def test_truncated_part_is_refused(backend, buckets):
    bucket = buckets.inputs_bucket
    upload = services.start_upload(bucket, "a.bin", 100)
    with pytest.raises(InvalidKey, match="incomplete"):
        services.upload_part(bucket, "a.bin", upload["upload_id"], 1, io.BytesIO(b"x" * 40), 100)


def test_upload_id_of_another_key_is_refused(backend, buckets):
    bucket = buckets.inputs_bucket
    upload = services.start_upload(bucket, "a.bin", 3)
    with pytest.raises((InvalidKey, services.StorageError)):
        services.upload_part(bucket, "b.bin", upload["upload_id"], 1, io.BytesIO(b"abc"), 3)
        services.complete_upload(bucket, "b.bin", upload["upload_id"], 3)


def test_empty_file_upload(backend, buckets):
    services.upload_object(buckets.inputs_bucket, "empty.txt", io.BytesIO(b""), 0)
    assert [(e.name, e.size) for e in services.list_objects(buckets.inputs_bucket).entries] == [("empty.txt", 0)]


def test_create_folder_then_list_and_delete_it(backend, buckets):
    bucket = buckets.inputs_bucket
    assert services.create_folder(bucket, "", "raw") == "raw/"
    assert services.create_folder(bucket, "raw/", "2024") == "raw/2024/"
    assert [(e.name, e.is_folder) for e in services.list_objects(bucket).entries] == [("raw", True)]
    assert [e.key for e in services.list_objects(bucket, "raw/").entries] == ["raw/2024/"]
    services.delete(bucket, "raw/")
    assert services.list_objects(bucket).entries == []


def test_folder_listing_pages_with_cursor(backend, buckets, settings):
    bucket = buckets.inputs_bucket
    names = [f"f{i:04d}.txt" for i in range(25)]
    for name in names:
        services.upload_object(bucket, f"many/{name}", io.BytesIO(b"x"), 1)
    seen, cursor, pages = [], None, 0
    while True:
        page = services.list_objects(bucket, "many/", cursor=cursor, page_size=10)
        seen += [e.name for e in page.entries]
        pages += 1
        if not page.next_cursor:
            break
        cursor = page.next_cursor
    assert seen == names
    assert pages == 3


def test_filesystem_listing_of_100000_files_is_paged_quickly(settings, project):
    import time

    settings.AICHOR_STORAGE = "filesystem"
    services.ensure_buckets(project)
    folder = services.bucket_root(project.inputs_bucket) / "big"
    folder.mkdir()
    for i in range(100_000):
        (folder / f"{i:06d}.bin").touch()
    start = time.monotonic()
    page = services.list_objects(project.inputs_bucket, "big/")
    later = services.list_objects(project.inputs_bucket, "big/", cursor="099950.bin")
    elapsed = time.monotonic() - start
    assert len(page.entries) == settings.AICHOR_DATASETS_PAGE_SIZE and page.next_cursor
    assert [e.name for e in later.entries][:1] == ["099951.bin"] and later.next_cursor is None
    assert elapsed < 2, elapsed
