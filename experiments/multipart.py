"""Archives straight to object storage: the server authorises and signs, the CLI sends the parts
of a multipart upload to the archive bucket itself, and the server completes and checks it.

The checksum, and why it can be trusted: the upload is created with ChecksumAlgorithm=SHA256
and every part URL is signed with the part's SHA-256 as the x-amz-checksum-sha256 header, so S3
refuses a part whose bytes do not match (BadDigest) and the CLI cannot send it without the
header. Completing repeats each part's SHA-256, which S3 checks against the parts it holds, and
S3 answers with the archive's checksum: the SHA-256 of the parts' SHA-256 digests (its
COMPOSITE checksum). The server compares that with the digests it was given and the object's
length with the size announced at the start; an S3 server that reports no checksum gets the
same digests computed from one read of the object.

An upload is named by a signed token (project, user, key, upload id, size, part size), so the
server keeps no table of uploads; a token is good for ARCHIVE_UPLOAD_MAX_SECONDS. A re-run of
`submit local` on an unchanged tree announces the same fingerprint (a hash of the archive's tar
headers: names, sizes, times) and is handed the upload it left, with the parts S3 already holds."""

import base64
import hashlib
import uuid
from dataclasses import dataclass

from botocore.exceptions import BotoCoreError, ClientError
from django.conf import settings
from django.core import signing

from datasets.storage import s3_client
from experiments.archives import ARCHIVES_DIR, archive_bucket, delete_archive, error_code, s3_name

MiB = 1024 * 1024
MIN_PART_BYTES = 5 * MiB  # S3's minimum for every part but the last
MAX_PARTS = 10_000  # S3's maximum
# A presigned part URL is good this long: enough for 8 MiB on the slowest link worth supporting,
# and the CLI asks again when one expires.
URL_SECONDS = 3600
SALT = "experiments.multipart"


class UploadError(Exception):
    """Refused, with the HTTP status the API answers and a reason for the user."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status, self.detail = status, detail


GONE = (
    "this upload is gone (completed, or abandoned for an hour and removed): run `aichor experiments submit local` again"
)


@dataclass(frozen=True)
class Upload:
    token: str
    key: str
    upload_id: str
    size: int
    part_size: int

    @property
    def parts(self) -> int:
        return max(1, -(-self.size // self.part_size))

    def part_bytes(self, number: int) -> int:
        return self.part_size if number < self.parts else self.size - self.part_size * (self.parts - 1)


@dataclass(frozen=True)
class Part:
    number: int
    size: int
    etag: str
    sha256: str  # "" when the S3 server does not report it


def part_size_for(size: int) -> int:
    base = max(MIN_PART_BYTES, settings.AICHOR_ARCHIVE_PART_MB * MiB)
    needed = -(-size // MAX_PARTS)
    return max(base, -(-needed // MiB) * MiB)


def _client():
    return s3_client(settings.AICHOR_ARCHIVE_BUCKET)


def _s3_failure(exc: Exception) -> UploadError:
    if isinstance(exc, ClientError) and error_code(exc) == "NoSuchUpload":
        return UploadError(410, GONE)
    return UploadError(502, f"object storage refused the request: {exc}")


# --- Steps ---------------------------------------------------------------------------------
def start_upload(project, user, size: int, fingerprint: str) -> tuple[Upload, list[Part]]:
    """A multipart upload for an archive of `size` bytes: the one this user left for the same
    tree (`fingerprint`), with the parts S3 holds, or a new one."""
    limit = settings.MAX_ARCHIVE_BYTES
    if size > limit:
        raise UploadError(413, f"the archive ({size} bytes) is larger than the limit of {limit} bytes")
    part_size = part_size_for(size)
    client = _client()
    try:
        bucket = archive_bucket()
        # The part size is in the prefix: an upload left under other settings is not reused.
        prefix = f"{ARCHIVES_DIR}/{project.pk}/{user.pk}/{fingerprint}-{size}-{part_size}/"
        left = [
            upload
            for page in client.get_paginator("list_multipart_uploads").paginate(Bucket=bucket, Prefix=prefix)
            for upload in page.get("Uploads", [])
        ]
        if left:
            newest = max(left, key=lambda u: u["Initiated"])
            key, upload_id = newest["Key"], newest["UploadId"]
        else:
            key = f"{prefix}{uuid.uuid4().hex}.tar"
            upload_id = client.create_multipart_upload(
                Bucket=bucket, Key=key, ChecksumAlgorithm="SHA256", ContentType="application/x-tar"
            )["UploadId"]
    except (ClientError, BotoCoreError) as exc:
        raise _s3_failure(exc) from None
    token = signing.dumps(
        {"p": str(project.pk), "u": str(user.pk), "k": key, "i": upload_id, "s": size, "ps": part_size},
        salt=SALT,
        compress=True,
    )
    upload = Upload(token, key, upload_id, size, part_size)
    return upload, (uploaded_parts(upload) if left else [])


def find_upload(project, user, token: str) -> Upload:
    """The upload a token names, for this user in this project; 404 for a forged token or
    anyone else's, 410 for an expired one."""
    try:
        data = signing.loads(token, salt=SALT, max_age=settings.ARCHIVE_UPLOAD_MAX_SECONDS)
    except signing.SignatureExpired:
        raise UploadError(410, "this upload has expired: run `aichor experiments submit local` again") from None
    except signing.BadSignature:
        raise UploadError(404, "no such upload") from None
    if not isinstance(data, dict) or data.get("p") != str(project.pk) or data.get("u") != str(user.pk):
        raise UploadError(404, "no such upload")
    return Upload(token, data["k"], data["i"], data["s"], data["ps"])


def uploaded_parts(upload: Upload) -> list[Part]:
    try:
        pages = (
            _client()
            .get_paginator("list_parts")
            .paginate(Bucket=settings.AICHOR_ARCHIVE_BUCKET, Key=upload.key, UploadId=upload.upload_id)
        )
        return [
            Part(p["PartNumber"], p["Size"], p["ETag"], p.get("ChecksumSHA256", ""))
            for page in pages
            for p in page.get("Parts", [])
        ]
    except (ClientError, BotoCoreError) as exc:
        raise _s3_failure(exc) from None


def sign_parts(upload: Upload, digests: dict[int, str]) -> dict[int, tuple[str, dict[str, str]]]:
    """A URL per part, and the headers to send with it, that accepts only bytes with that
    part's announced SHA-256 (base64)."""
    _check_numbers(upload, digests, complete=False)
    client = _client()
    signed = {}
    for number, digest in sorted(digests.items()):
        url = client.generate_presigned_url(
            "upload_part",
            Params={
                "Bucket": settings.AICHOR_ARCHIVE_BUCKET,
                "Key": upload.key,
                "UploadId": upload.upload_id,
                "PartNumber": number,
                "ChecksumSHA256": digest,
            },
            ExpiresIn=URL_SECONDS,
        )
        signed[number] = (url, {"x-amz-checksum-sha256": digest})
    return signed


def complete_upload(upload: Upload, digests: dict[int, str]) -> str:
    """Complete the upload once every part is there with its size, check the archive's size
    and checksum, and return its name for Experiment.archive. A part missing or of the wrong
    size is refused and the upload kept (a re-run sends what is missing); parts that do not
    match their checksums, or an archive that does not, are discarded."""
    _check_numbers(upload, digests, complete=True)
    bucket = settings.AICHOR_ARCHIVE_BUCKET
    held = {part.number: part for part in uploaded_parts(upload)}
    missing = [n for n in range(1, upload.parts + 1) if n not in held]
    if missing:
        shown = ", ".join(map(str, missing[:10])) + (", …" if len(missing) > 10 else "")
        raise UploadError(409, f"the upload is incomplete: part(s) {shown} of {upload.parts} not received")
    for number in range(1, upload.parts + 1):
        if held[number].size != upload.part_bytes(number):
            raise UploadError(
                409,
                f"part {number} holds {held[number].size} bytes, expected {upload.part_bytes(number)}: send it again",
            )
    client = _client()
    parts = [{"PartNumber": n, "ETag": held[n].etag, "ChecksumSHA256": digests[n]} for n in range(1, upload.parts + 1)]
    try:
        done = client.complete_multipart_upload(
            Bucket=bucket, Key=upload.key, UploadId=upload.upload_id, MultipartUpload={"Parts": parts}
        )
    except ClientError as exc:
        if error_code(exc) in ("BadDigest", "InvalidPart", "InvalidDigest"):
            abort_upload(upload)
            raise UploadError(
                409,
                "the uploaded parts do not match their SHA-256 checksums (did a file change during the upload?): "
                "the upload was discarded and nothing was submitted; run it again",
            ) from None
        raise _s3_failure(exc) from None
    except BotoCoreError as exc:
        raise _s3_failure(exc) from None
    name = s3_name(bucket, upload.key)
    expected = composite_sha256([digests[n] for n in range(1, upload.parts + 1)])
    try:
        reported = (done.get("ChecksumSHA256") or "").split("-")[0]
        checksum = reported or _read_checksum(upload)
        length = client.head_object(Bucket=bucket, Key=upload.key)["ContentLength"]
    except (ClientError, BotoCoreError) as exc:
        delete_archive(name)
        raise _s3_failure(exc) from None
    if length != upload.size or checksum != expected:
        delete_archive(name)
        what = f"{length} bytes instead of {upload.size}" if length != upload.size else "a different SHA-256"
        raise UploadError(409, f"the stored archive has {what}: it was discarded and nothing was submitted")
    return name


def abort_upload(upload: Upload) -> None:
    try:
        _client().abort_multipart_upload(
            Bucket=settings.AICHOR_ARCHIVE_BUCKET, Key=upload.key, UploadId=upload.upload_id
        )
    except ClientError as exc:
        if error_code(exc) != "NoSuchUpload":
            raise _s3_failure(exc) from None
    except BotoCoreError as exc:
        raise _s3_failure(exc) from None


# --- Checksums -----------------------------------------------------------------------------
def composite_sha256(digests: list[str]) -> str:
    """S3's checksum of a multipart object: the SHA-256 of its parts' SHA-256 digests (base64)."""
    joined = b"".join(base64.b64decode(d) for d in digests)
    return base64.b64encode(hashlib.sha256(joined).digest()).decode()


def _read_checksum(upload: Upload) -> str:
    """For an S3 server that keeps no checksums: the composite computed from one read."""
    body = _client().get_object(Bucket=settings.AICHOR_ARCHIVE_BUCKET, Key=upload.key)["Body"]
    digests = []
    with body:
        for number in range(1, upload.parts + 1):
            part, left = hashlib.sha256(), upload.part_bytes(number)
            while left:
                data = body.read(min(left, MiB))
                if not data:
                    break
                part.update(data)
                left -= len(data)
            digests.append(base64.b64encode(part.digest()).decode())
    return composite_sha256(digests)


def _check_numbers(upload: Upload, digests: dict[int, str], *, complete: bool) -> None:
    outside = sorted(n for n in digests if not 1 <= n <= upload.parts)
    if outside:
        raise UploadError(422, f"part {outside[0]} is outside this upload's parts 1 to {upload.parts}")
    if complete and len(digests) != upload.parts:
        raise UploadError(422, f"give the SHA-256 of each of the {upload.parts} parts")
