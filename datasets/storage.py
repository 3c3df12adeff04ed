"""One bucket = one django-storages instance: S3Storage on an S3-compatible server, or a
FileSystemStorage rooted at BUCKETS_ROOT/<bucket> in the embedded default."""

from functools import lru_cache
from pathlib import Path

from botocore.config import Config
from django.conf import settings
from django.core.files.storage import FileSystemStorage, Storage
from storages.backends.s3 import S3Storage


def is_s3() -> bool:
    return settings.AICHOR_STORAGE == "s3"


def s3_options() -> tuple:
    return (
        settings.AICHOR_S3_ENDPOINT or None,
        settings.AICHOR_S3_REGION,
        settings.AICHOR_S3_ACCESS_KEY,
        settings.AICHOR_S3_SECRET_KEY,
        settings.AICHOR_S3_ADDRESSING_STYLE,
    )


def bucket_storage(bucket: str) -> Storage:
    """The django-storages instance of a bucket. On the filesystem backend its path() and open()
    follow symbolic links a workload may leave: datasets.services reads and writes bucket folders
    through its own no-follow walk instead, never through this."""
    if is_s3():
        return _s3_storage(bucket, s3_options())
    return FileSystemStorage(location=bucket_root(bucket), allow_overwrite=True)


def bucket_root(bucket: str) -> Path:
    return Path(settings.BUCKETS_ROOT) / bucket


# Cached because building a boto3 resource costs tens of milliseconds; S3Storage keeps its
# connections per thread, so one instance is safe to share. The options are part of the key so
# a settings change (tests switch backends) never reuses a stale client.
@lru_cache(maxsize=256)
def _s3_storage(bucket: str, options: tuple) -> S3Storage:
    endpoint, region, access_key, secret_key, addressing = options
    return S3Storage(
        bucket_name=bucket,
        endpoint_url=endpoint,
        region_name=region,
        access_key=access_key,
        secret_key=secret_key,
        addressing_style=addressing,
        file_overwrite=True,
        default_acl=None,
        querystring_auth=True,
        client_config=_client_config(addressing),
    )


def _client_config(addressing: str) -> Config:
    return Config(
        s3={"addressing_style": addressing},
        signature_version="s3v4",
        retries={"max_attempts": 3, "mode": "standard"},
        max_pool_connections=32,
        # Third-party S3 servers differ in their support of the newer default checksums.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )


def s3_client(bucket: str):
    """A boto3 client for multipart uploads and paginated listing. One per process: boto3
    clients are thread-safe, while S3Storage's connection is per thread, and a client per
    upload thread costs tens of MB."""
    return _shared_client(s3_options())


@lru_cache(maxsize=4)
def _shared_client(options: tuple):
    import boto3

    endpoint, region, access_key, secret_key, addressing = options
    return boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint,
        region_name=region,
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
        config=_client_config(addressing),
    )
