"""AIchor manifests (SPEC §3): the types (`types.py`) and their parsing and validation with
paths (`parse.py`). No Django imports, so the CLI validates before uploading."""

from experiments.manifest.parse import (
    API_VERSIONS,
    KIND,
    MAX_MANIFEST_CHARS,
    OPERATORS,
    ManifestError,
    parse_duration,
    parse_manifest,
)
from experiments.manifest.types import Manifest, ProcessGroup, Resources, Totals

__all__ = [
    "API_VERSIONS",
    "KIND",
    "MAX_MANIFEST_CHARS",
    "OPERATORS",
    "Manifest",
    "ManifestError",
    "ProcessGroup",
    "Resources",
    "Totals",
    "parse_duration",
    "parse_manifest",
]
