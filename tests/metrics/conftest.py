"""Fixtures of other test folders that these tests reuse: the storage backends (filesystem, and a
real S3 server), the `aichor` CLI as a subprocess."""

from tests.cli.conftest import cli, logged_in, server_url  # noqa: F401
from tests.datasets.conftest import backend, s3_server  # noqa: F401
