"""Project buckets: creation, listing, streamed multipart uploads, reads, deletes, folders.

Every key that reaches a bucket passes through validate_key, whatever route it came by. Uploads
always go in parts (S3 multipart, or part files on the filesystem backend) so no file is ever
held whole in memory and an interrupted upload resumes from the parts already stored.

On the filesystem backend everything below BUCKETS_ROOT/<bucket> is hostile: docker workloads
write there through bind mounts, as root, and may leave symbolic links (`ln -s / hostroot`) or
swap a folder for one at any moment. No route ever follows a link: each walks from the bucket
root one component at a time with openat(O_NOFOLLOW) and acts through the directory descriptor
it holds, so a check and its use can never see two different trees."""

import bisect
import errno
import json
import math
import os
import re
import secrets
import shutil
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO, NoReturn

from botocore.exceptions import BotoCoreError, ClientError
from django.conf import settings

from datasets.storage import bucket_root, is_s3, s3_client
from projects.models import Project

MAX_KEY_LENGTH = 1024
MAX_SEGMENT_LENGTH = 255
MAX_PARTS = 10_000
MAX_OBJECT_SIZE = 5 * 1024**4  # the S3 limit for one object
# ASCII only, so unicode look-alikes of "/" and "." (U+2215, U+FF0F, U+2024...) never match.
SEGMENT_RE = re.compile(r"[A-Za-z0-9._-]+", re.ASCII)
UPLOAD_ID_RE = re.compile(r"[0-9a-f]{32}")
READ_CHUNK = 1024 * 1024
BUCKET_KINDS = ("inputs", "outputs")


class InvalidKey(ValueError):
    """A key, folder, bucket or upload that is refused; the message is shown to the user."""


class StorageError(RuntimeError):
    """The storage backend failed; the message is shown to the user."""


class LinkRefused(InvalidKey):
    """A path component is a symbolic link (left by a workload): never followed."""

    def __init__(self, shown: str) -> None:
        super().__init__(
            f"{shown} is a symbolic link made by a workload: aichor never follows links "
            "(delete the link, or have the workload write the file itself)"
        )


def validate_key(key: str, *, folder: bool = False) -> str:
    """The one key check of every storage route (SPEC §6). A folder is "" (the bucket root) or
    segments ending with "/"; an object key never ends with "/"."""
    if not isinstance(key, str):
        raise InvalidKey("the name is missing")
    if folder and key == "":
        return key
    if len(key) > MAX_KEY_LENGTH:
        raise InvalidKey(f"the name is longer than {MAX_KEY_LENGTH} characters")
    if any(ord(c) < 32 or ord(c) == 127 for c in key):
        raise InvalidKey("the name contains control characters")
    if key.startswith("/"):
        raise InvalidKey("absolute paths are not allowed: remove the leading /")
    body = key
    if folder:
        if not key.endswith("/"):
            raise InvalidKey("a folder name must end with /")
        body = key[:-1]
    elif key.endswith("/"):
        raise InvalidKey("a file name cannot end with /")
    if not body:
        raise InvalidKey("the name is empty")
    for segment in body.split("/"):
        if segment in (".", ".."):
            raise InvalidKey("'.' and '..' are not allowed as path segments")
        if not segment:
            raise InvalidKey("the name contains an empty path segment (//)")
        if len(segment) > MAX_SEGMENT_LENGTH:
            raise InvalidKey(f"a path segment is longer than {MAX_SEGMENT_LENGTH} characters")
        if not SEGMENT_RE.fullmatch(segment):
            raise InvalidKey(
                f"{segment[:40]!r} is not allowed: use only letters A-Z a-z, digits, '.', '_' and '-' in each path segment"
            )
    return key


def bucket_name(project: Project, kind: str) -> str:
    if kind == "inputs":
        return project.inputs_bucket
    if kind == "outputs":
        return project.outputs_bucket
    raise InvalidKey("the bucket must be inputs or outputs")


def _s3_error(exc: Exception) -> StorageError:
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        return StorageError(f"object storage refused: {error.get('Code', '')} {error.get('Message', '')}".strip())
    return StorageError(f"object storage unreachable: {exc}")


def _error_code(exc: ClientError) -> str:
    return exc.response.get("Error", {}).get("Code", "")


# --- Filesystem backend: never follow a link -----------------------------------------------
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# A workload can nest folders far deeper than anyone browses; deleting stops there with a clear
# error rather than exhausting file descriptors (one is held open per level).
MAX_FOLDER_DEPTH = 256


def _split(key: str) -> tuple[str, str]:
    """("a/b/", "c") for "a/b/c" (or "a/b/c/"): the parent folder and the last name."""
    parent, _, name = key.rstrip("/").rpartition("/")
    return (parent + "/" if parent else ""), name


def _refuse_non_folder(dir_fd: int, name: str, shown: str) -> NoReturn:
    # Only chooses the message: the open that failed already refused to follow anything.
    try:
        mode = os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode
    except FileNotFoundError:
        raise FileNotFoundError(shown) from None
    if stat.S_ISLNK(mode):
        raise LinkRefused(shown)
    raise InvalidKey(f"{shown} is a file, not a folder")


def _open_folder(bucket: str, folder: str, *, create: bool = False) -> int:
    """A descriptor of `folder` (validated, "" or ending with "/") reached without following any
    link; with `create`, missing folders are made on the way. FileNotFoundError when a folder is
    missing. The caller closes the descriptor."""
    root = bucket_root(bucket)
    if create:
        root.mkdir(parents=True, exist_ok=True)  # BUCKETS_ROOT/<bucket> is the server's own
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    walked = ""
    try:
        for name in folder.rstrip("/").split("/") if folder else []:
            walked += name
            if create:
                try:
                    os.mkdir(name, dir_fd=fd)  # mkdirat never follows a link at `name`
                except FileExistsError:
                    pass
            try:
                child = os.open(name, _DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                raise FileNotFoundError(walked) from None
            except OSError as exc:
                if exc.errno not in (errno.ENOTDIR, errno.ELOOP):
                    raise
                _refuse_non_folder(fd, name, walked)
            os.close(fd)
            fd = child
            walked += "/"
    except BaseException:
        os.close(fd)
        raise
    return fd


@contextmanager
def _folder(bucket: str, folder: str, *, create: bool = False) -> Iterator[int]:
    try:
        fd = _open_folder(bucket, folder, create=create)
    except FileNotFoundError as exc:
        if not create:
            raise
        # Made on the way, then deleted (by a workload) before it could be opened.
        raise StorageError(f"{exc.args[0]} was deleted meanwhile: try again") from None
    try:
        yield fd
    finally:
        os.close(fd)


def _check_no_link(bucket: str, key: str) -> None:
    """Refuse an upload early when an existing folder of `key` is a link or a file; the write
    itself (complete_upload) walks again, so a link made after this check is refused there."""
    try:
        with _folder(bucket, _split(key)[0]):
            pass
    except FileNotFoundError:
        pass  # created when the upload completes


def _open_file(bucket: str, key: str) -> BinaryIO:
    parent, name = _split(key)
    with _folder(bucket, parent) as dir_fd:
        try:
            mode = os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode
        except FileNotFoundError:
            raise FileNotFoundError(key) from None
        if stat.S_ISLNK(mode):
            raise LinkRefused(key)
        if stat.S_ISDIR(mode):
            raise FileNotFoundError(key)
        if not stat.S_ISREG(mode):
            # A FIFO would block the server; a device node made with mknod would read the host.
            raise InvalidKey(f"{key} is not a regular file (a device, socket or pipe made by a workload)")
        try:
            # O_NONBLOCK: if the name was swapped for a FIFO since the stat, opening it does not hang.
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
        except FileNotFoundError:
            raise FileNotFoundError(key) from None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise LinkRefused(key) from None
            raise StorageError(f"cannot read {key}: {exc.strerror}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise InvalidKey(f"{key} is not a regular file (a device, socket or pipe made by a workload)")
    return os.fdopen(fd, "rb")


def _empty_folder(fd: int, depth: int = 0) -> int:
    """Delete everything inside the open folder `fd`, links as links (never what they point to).
    Returns how many files and links went."""
    if depth > MAX_FOLDER_DEPTH:
        raise StorageError(
            f"the folder is nested more than {MAX_FOLDER_DEPTH} levels deep: delete its inner folders first"
        )
    count = 0
    with os.scandir(fd) as it:
        entries = [(e.name, e.is_dir(follow_symlinks=False)) for e in it]
    for name, is_dir in entries:
        if is_dir:
            try:
                sub = os.open(name, _DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                continue
            except OSError as exc:
                if exc.errno not in (errno.ENOTDIR, errno.ELOOP):
                    raise
                sub = None  # swapped for a link or a file since the listing: unlink that instead
            if sub is not None:
                try:
                    count += _empty_folder(sub, depth + 1)
                finally:
                    os.close(sub)
                os.rmdir(name, dir_fd=fd)
                continue
        try:
            os.unlink(name, dir_fd=fd)  # unlinkat removes a link itself, never its target
            count += 1
        except FileNotFoundError:
            pass
    return count


def _delete_fs(bucket: str, key: str) -> int:
    is_folder = key.endswith("/")
    parent, name = _split(key)
    try:
        with _folder(bucket, parent) as dir_fd:
            try:
                mode = os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode
            except FileNotFoundError:
                return 0
            if stat.S_ISDIR(mode):
                if not is_folder:
                    return 0
                try:
                    sub = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
                except OSError as exc:
                    if exc.errno not in (errno.ENOTDIR, errno.ELOOP):
                        raise
                    os.unlink(name, dir_fd=dir_fd)  # swapped for a link since the stat: remove the link
                    return 1
                try:
                    count = _empty_folder(sub)
                finally:
                    os.close(sub)
                os.rmdir(name, dir_fd=dir_fd)
                return count
            if is_folder and not stat.S_ISLNK(mode):
                return 0
            # A file, or a link (asked for as a file or as a folder): the link itself goes.
            os.unlink(name, dir_fd=dir_fd)
            return 1
    except FileNotFoundError:
        return 0
    except PermissionError as exc:
        raise StorageError(f"cannot delete {key}: {exc.strerror}") from None
    except (IsADirectoryError, NotADirectoryError) as exc:
        raise StorageError(f"{key} changed while it was being deleted ({exc.strerror}): try again") from None
    except OSError as exc:
        if exc.errno == errno.ENOTEMPTY:
            raise StorageError(f"{key} changed while it was being deleted (new files appeared): try again") from None
        raise


# --- Buckets -------------------------------------------------------------------------------
def ensure_buckets(project: Project) -> None:
    """Create the project's two buckets; harmless when they exist."""
    for bucket in (project.inputs_bucket, project.outputs_bucket):
        if not is_s3():
            bucket_root(bucket).mkdir(parents=True, exist_ok=True)
            continue
        try:
            s3_client(bucket).create_bucket(Bucket=bucket)
        except ClientError as exc:
            if _error_code(exc) not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise _s3_error(exc) from exc
        except BotoCoreError as exc:
            raise _s3_error(exc) from exc


# --- Listing -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Entry:
    name: str
    key: str
    is_folder: bool
    size: int | None = None
    modified: datetime | None = None
    # A symbolic link left by a workload (filesystem backend): shown, never followed.
    is_link: bool = False
    target: str = ""


@dataclass(frozen=True)
class Page:
    entries: list[Entry]
    next_cursor: str | None


def list_objects(bucket: str, prefix: str = "", *, cursor: str | None = None, page_size: int | None = None) -> Page:
    """One page of a folder, folders and files in key order. `cursor` is opaque to callers:
    an S3 continuation token, or the last name shown on the filesystem backend."""
    validate_key(prefix, folder=True)
    page_size = page_size or settings.AICHOR_DATASETS_PAGE_SIZE
    if is_s3():
        return _list_s3(bucket, prefix, cursor, page_size)
    return _list_fs(bucket, prefix, cursor, page_size)


def _list_s3(bucket: str, prefix: str, cursor: str | None, page_size: int) -> Page:
    args = {"Bucket": bucket, "Prefix": prefix, "Delimiter": "/", "MaxKeys": page_size}
    if cursor:
        args["ContinuationToken"] = cursor
    try:
        response = s3_client(bucket).list_objects_v2(**args)
    except ClientError as exc:
        if _error_code(exc) == "NoSuchBucket":
            # Created after the project's commit; if the server was down then, repair now.
            try:
                s3_client(bucket).create_bucket(Bucket=bucket)
            except (ClientError, BotoCoreError) as create_exc:
                raise _s3_error(create_exc) from create_exc
            return Page([], None)
        raise _s3_error(exc) from exc
    except BotoCoreError as exc:
        raise _s3_error(exc) from exc
    entries = [
        Entry(name=p["Prefix"][len(prefix) :].rstrip("/"), key=p["Prefix"], is_folder=True)
        for p in response.get("CommonPrefixes", [])
    ]
    entries += [
        Entry(name=o["Key"][len(prefix) :], key=o["Key"], is_folder=False, size=o["Size"], modified=o["LastModified"])
        for o in response.get("Contents", [])
        if o["Key"] != prefix  # the folder's own marker object
    ]
    entries.sort(key=lambda e: e.key)
    return Page(entries, response.get("NextContinuationToken") if response.get("IsTruncated") else None)


def _shown(text: str) -> str:
    # Names a workload wrote need not be UTF-8; the page must still render.
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _list_fs(bucket: str, prefix: str, cursor: str | None, page_size: int) -> Page:
    try:
        dir_fd = _open_folder(bucket, prefix)
    except FileNotFoundError:
        return Page([], None)
    try:
        # Only names and types come from scandir (no stat): a folder of 100 000 files is sorted
        # in a fraction of a second and only the page shown is stat()ed. Folders sort as
        # "name/", as S3 lists them; a link to a folder is a link, not a folder.
        with os.scandir(dir_fd) as it:
            names = sorted((e.name + "/" if e.is_dir(follow_symlinks=False) else e.name) for e in it)
        start = 0
        if cursor:
            start = bisect.bisect_right(names, cursor)
        chunk = names[start : start + page_size]
        entries = []
        for name in chunk:
            if name.endswith("/"):
                entries.append(Entry(name=_shown(name[:-1]), key=_shown(prefix + name), is_folder=True))
                continue
            try:
                info = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
                target = os.readlink(name, dir_fd=dir_fd) if stat.S_ISLNK(info.st_mode) else None
            except FileNotFoundError:
                continue  # deleted while listing
            except OSError:
                target = "?"  # replaced by a non-link between the stat and readlink
            modified = datetime.fromtimestamp(info.st_mtime, tz=UTC)
            if target is not None:
                entries.append(
                    Entry(
                        name=_shown(name),
                        key=_shown(prefix + name),
                        is_folder=False,
                        modified=modified,
                        is_link=True,
                        target=_shown(target)[:300],
                    )
                )
                continue
            entries.append(
                Entry(
                    name=_shown(name),
                    key=_shown(prefix + name),
                    is_folder=False,
                    size=info.st_size,
                    modified=modified,
                )
            )
    finally:
        os.close(dir_fd)
    more = start + page_size < len(names)
    return Page(entries, chunk[-1] if more and chunk else None)


# --- Uploads -------------------------------------------------------------------------------
def part_size_for(size: int) -> int:
    base = settings.AICHOR_UPLOAD_PART_MB * 1024 * 1024
    mib = 1024 * 1024
    return max(base, math.ceil(size / MAX_PARTS / mib) * mib)


def _uploads_dir(upload_id: str) -> Path:
    # Outside every bucket folder: buckets are mounted into containers and must never show
    # half-uploaded parts.
    if not UPLOAD_ID_RE.fullmatch(upload_id or ""):
        raise InvalidKey("unknown upload")
    return Path(settings.BUCKETS_ROOT) / ".uploads" / upload_id


def _fs_upload(bucket: str, key: str, upload_id: str) -> Path:
    folder = _uploads_dir(upload_id)
    try:
        meta = json.loads((folder / "meta.json").read_text())
    except (FileNotFoundError, ValueError):
        raise InvalidKey("unknown upload: start it again") from None
    if meta != {"bucket": bucket, "key": key}:
        raise InvalidKey("unknown upload: start it again")
    return folder


def start_upload(bucket: str, key: str, size: int) -> dict:
    validate_key(key)
    if size < 0 or size > MAX_OBJECT_SIZE:
        raise InvalidKey("the file size is out of range (at most 5 TiB)")
    part_size = part_size_for(size)
    if is_s3():
        try:
            upload_id = s3_client(bucket).create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]
        except (ClientError, BotoCoreError) as exc:
            raise _s3_error(exc) from exc
    else:
        _check_no_link(bucket, key)
        upload_id = secrets.token_hex(16)
        folder = _uploads_dir(upload_id)
        folder.mkdir(parents=True)
        (folder / "meta.json").write_text(json.dumps({"bucket": bucket, "key": key}))
    return {"upload_id": upload_id, "part_size": part_size, "parts": max(1, math.ceil(size / part_size))}


def upload_part(bucket: str, key: str, upload_id: str, number: int, stream: BinaryIO, length: int) -> None:
    """Store part `number` (1-based) of an upload; sending a part again replaces it."""
    validate_key(key)
    if not 1 <= number <= MAX_PARTS:
        raise InvalidKey(f"part number must be between 1 and {MAX_PARTS}")
    if is_s3():
        if _seekable_size(stream) is not None:
            # A file (the server's spooled copy of the request): boto3 streams it from disk, so
            # parts in flight cost no memory.
            if _seekable_size(stream) != length:
                raise InvalidKey("the part arrived incomplete: send it again")
            data = stream
        else:
            # One part (a few MiB) in memory: boto3 needs a seekable body to sign and retry.
            data = _read_exactly(stream, length)
            if len(data) != length:
                raise InvalidKey("the part arrived incomplete: send it again")
        try:
            s3_client(bucket).upload_part(
                Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=data, ContentLength=length
            )
        except (ClientError, BotoCoreError) as exc:
            raise _upload_error(exc) from exc
        return
    folder = _fs_upload(bucket, key, upload_id)
    _check_no_link(bucket, key)  # stop sending gigabytes that complete_upload would refuse
    tmp = folder / f"{number:05d}.tmp"
    received = 0
    with tmp.open("wb") as fh:
        while received < length:
            chunk = stream.read(min(READ_CHUNK, length - received))
            if not chunk:
                break
            fh.write(chunk)
            received += len(chunk)
    if received != length:
        tmp.unlink(missing_ok=True)
        raise InvalidKey("the part arrived incomplete: send it again")
    tmp.replace(folder / f"{number:05d}.part")


def _upload_error(exc: Exception) -> Exception:
    """An S3 failure of a multipart step as the error the uploader shows."""
    if isinstance(exc, ClientError) and _error_code(exc) == "NoSuchUpload":
        return InvalidKey("unknown upload: start it again")
    return _s3_error(exc)


def _seekable_size(stream) -> int | None:
    try:
        if not stream.seekable():
            return None
        size = stream.seek(0, 2)
        stream.seek(0)
        return size
    except (AttributeError, OSError, ValueError):
        return None


def _read_exactly(stream: BinaryIO, length: int) -> bytes:
    buffer = bytearray()
    while len(buffer) < length:
        chunk = stream.read(length - len(buffer))
        if not chunk:
            break
        buffer += chunk
    return bytes(buffer)


def _s3_parts(client, bucket: str, key: str, upload_id: str) -> list[dict]:
    parts, marker = [], 0
    while True:
        response = client.list_parts(Bucket=bucket, Key=key, UploadId=upload_id, PartNumberMarker=marker)
        parts += response.get("Parts", [])
        if not response.get("IsTruncated"):
            # Some servers (SeaweedFS) list a part sent twice twice: the last one counts.
            return sorted({p["PartNumber"]: p for p in parts}.values(), key=lambda p: p["PartNumber"])
        marker = response["NextPartNumberMarker"]


def complete_upload(bucket: str, key: str, upload_id: str, size: int) -> None:
    """Assemble the parts into the object once they add up to `size` bytes; the object appears
    atomically, never half-written."""
    validate_key(key)
    if is_s3():
        client = s3_client(bucket)
        try:
            parts = _s3_parts(client, bucket, key, upload_id)
            received = sum(p["Size"] for p in parts)
            if received != size or [p["PartNumber"] for p in parts] != list(range(1, len(parts) + 1)):
                raise InvalidKey(f"the upload is incomplete ({received} of {size} bytes): resume it")
            if not parts:  # an empty file: S3 wants at least one part
                client.upload_part(Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=1, Body=b"")
                parts = _s3_parts(client, bucket, key, upload_id)
            client.complete_multipart_upload(
                Bucket=bucket,
                Key=key,
                UploadId=upload_id,
                MultipartUpload={"Parts": [{"PartNumber": p["PartNumber"], "ETag": p["ETag"]} for p in parts]},
            )
        except (ClientError, BotoCoreError) as exc:
            raise _upload_error(exc) from exc
        return
    folder = _fs_upload(bucket, key, upload_id)
    parts = sorted(folder.glob("*.part"))
    received = sum(p.stat().st_size for p in parts)
    if received != size or [int(p.stem) for p in parts] != list(range(1, len(parts) + 1)):
        raise InvalidKey(f"the upload is incomplete ({received} of {size} bytes): resume it")
    parent, name = _split(key)
    # The parent's descriptor is held from the walk to the rename: swapping a folder on the way
    # for a link after this point changes nothing, the file lands in the folder that was walked.
    with _folder(bucket, parent, create=True) as dir_fd:
        assembled = folder / "assembled"
        with assembled.open("wb") as out:
            for part in parts:
                with part.open("rb") as src:
                    shutil.copyfileobj(src, out, READ_CHUNK)
        try:
            # renameat replaces a link at `name` with the file; it never writes through it.
            os.replace(assembled, name, dst_dir_fd=dir_fd)  # same filesystem: atomic
        except IsADirectoryError:
            raise InvalidKey(f"{key} is a folder: choose another name") from None
    shutil.rmtree(folder, ignore_errors=True)


def abort_upload(bucket: str, key: str, upload_id: str) -> None:
    validate_key(key)
    if is_s3():
        try:
            s3_client(bucket).abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)
        except ClientError as exc:
            if _error_code(exc) != "NoSuchUpload":
                raise _s3_error(exc) from exc
        return
    shutil.rmtree(_fs_upload(bucket, key, upload_id), ignore_errors=True)


def upload_object(bucket: str, key: str, stream: BinaryIO, size: int) -> None:
    """Upload `size` bytes read from `stream`, part by part (the API and tools use this)."""
    upload = start_upload(bucket, key, size)
    try:
        remaining, number = size, 1
        while remaining > 0:
            length = min(upload["part_size"], remaining)
            upload_part(bucket, key, upload["upload_id"], number, stream, length)
            remaining -= length
            number += 1
        complete_upload(bucket, key, upload["upload_id"], size)
    except BaseException:
        abort_upload(bucket, key, upload["upload_id"])
        raise


# --- Reads ---------------------------------------------------------------------------------
@dataclass
class StoredObject:
    key: str
    size: int
    stream: BinaryIO

    def chunks(self, chunk_size: int = READ_CHUNK) -> Iterator[bytes]:
        try:
            while chunk := self.stream.read(chunk_size):
                yield chunk
        finally:
            self.stream.close()


def open_object(bucket: str, key: str) -> StoredObject:
    validate_key(key)
    if is_s3():
        try:
            response = s3_client(bucket).get_object(Bucket=bucket, Key=key)
        except ClientError as exc:
            if _error_code(exc) in ("NoSuchKey", "NoSuchBucket", "404"):
                raise FileNotFoundError(key) from exc
            raise _s3_error(exc) from exc
        except BotoCoreError as exc:
            raise _s3_error(exc) from exc
        return StoredObject(key, response["ContentLength"], response["Body"])
    fh = _open_file(bucket, key)
    return StoredObject(key, os.fstat(fh.fileno()).st_size, fh)


def download_url(bucket: str, key: str, *, filename: str, content_type: str, inline: bool) -> str:
    """A short-lived presigned URL (S3 only): the browser fetches the bytes from the bucket
    itself, at the server's full speed and without passing through the dashboard."""
    validate_key(key)
    disposition = f'{"inline" if inline else "attachment"}; filename="{filename}"'
    # The process's one client, not a boto3 resource per request's thread (django-storages'
    # S3Storage kept about 12 MiB of the web process's memory per download that way).
    params = {"Bucket": bucket, "Key": key, "ResponseContentDisposition": disposition}
    return s3_client(bucket).generate_presigned_url(
        "get_object", Params=params | {"ResponseContentType": content_type}, ExpiresIn=300
    )


def object_size(bucket: str, key: str) -> int:
    """An object's size, or FileNotFoundError. On S3 a HEAD: a GET of a large object made the
    server start sending all of it, only to be cut off."""
    validate_key(key)
    if not is_s3():
        with _open_file(bucket, key) as fh:
            return os.fstat(fh.fileno()).st_size
    try:
        return s3_client(bucket).head_object(Bucket=bucket, Key=key)["ContentLength"]
    except ClientError as exc:
        if _error_code(exc) in ("NoSuchKey", "NoSuchBucket", "404", "NotFound"):
            raise FileNotFoundError(key) from exc
        raise _s3_error(exc) from exc
    except BotoCoreError as exc:
        raise _s3_error(exc) from exc


def read_head(bucket: str, key: str, limit: int) -> tuple[bytes, int]:
    """The first `limit` bytes of an object and its full size (previews)."""
    obj = open_object(bucket, key)
    try:
        return obj.stream.read(limit), obj.size
    finally:
        obj.stream.close()


# --- Deletes and folders -------------------------------------------------------------------
def delete(bucket: str, key: str) -> int:
    """Delete a file, or a folder (key ending with "/") and everything in it. Returns how many
    objects went."""
    is_folder = key.endswith("/")
    validate_key(key, folder=is_folder)
    if is_s3():
        client = s3_client(bucket)
        try:
            if not is_folder:
                client.delete_object(Bucket=bucket, Key=key)
                return 1
            count = 0
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key):
                keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
                if keys:
                    client.delete_objects(Bucket=bucket, Delete={"Objects": keys, "Quiet": True})
                    count += len(keys)
            # The folder marker, and the directory entry some servers keep for implicit folders.
            client.delete_object(Bucket=bucket, Key=key)
            return count
        except (ClientError, BotoCoreError) as exc:
            raise _s3_error(exc) from exc
    return _delete_fs(bucket, key)


def create_folder(bucket: str, prefix: str, name: str) -> str:
    validate_key(prefix, folder=True)
    key = validate_key(f"{prefix}{name.strip()}/", folder=True)
    if is_s3():
        try:
            s3_client(bucket).put_object(Bucket=bucket, Key=key, Body=b"")
        except (ClientError, BotoCoreError) as exc:
            raise _s3_error(exc) from exc
    else:
        with _folder(bucket, key, create=True):
            pass
    return key
