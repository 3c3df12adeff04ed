"""Where buckets live: on an S3-compatible server, reached through one boto3 client per process
(boto3 clients are thread-safe), or as folders under BUCKETS_ROOT/<bucket> in the embedded
default (datasets.services walks them without following links)."""

from functools import lru_cache
from pathlib import Path

from botocore.config import Config
from django.conf import settings


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


def bucket_root(bucket: str) -> Path:
    return Path(settings.BUCKETS_ROOT) / bucket


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
    """The process's boto3 client for every bucket operation: a client per thread (as
    django-storages' S3Storage made) costs about 12 MiB each."""
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
