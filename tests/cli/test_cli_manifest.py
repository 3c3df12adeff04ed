"""`aichor experiments submit local` checks the manifest with the server's validator before
packing: every error by its path, a non-zero exit, nothing uploaded."""

import subprocess
import sys

import pytest
from django.core.files.storage import default_storage

from tests.cli.test_cli import write_repo

pytestmark = pytest.mark.django_db(transaction=True)


def stored_archives() -> set[str]:
    return set(default_storage.listdir("archives")[1]) if default_storage.exists("archives") else set()


def test_invalid_manifest_is_refused_before_anything_is_uploaded(logged_in, tmp_path):
    from experiments.models import Experiment

    repo = tmp_path / "repo"
    write_repo(repo, "true")
    manifest = repo / "aichor_manifests" / "manifest.yaml"
    broken = manifest.read_text().replace("operator: batch", "operator: batchh").replace("cpus: 1", "cpus: -2")
    manifest.write_text(broken + "  colour: blue\n")
    before = stored_archives()

    result = logged_in.run("experiments", "submit", "local", "--repo-dir", str(repo), check=False)

    assert result.returncode != 0 and result.stdout == "" and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[-1] == "Error: manifest aichor_manifests/manifest.yaml is invalid (3 errors): nothing uploaded"
    errors = lines[:-1]
    assert len(errors) == 3 and all(line.startswith("aichor_manifests/manifest.yaml: spec.") for line in errors)
    assert any("spec.operator" in line and "batch" in line for line in errors)  # with its did-you-mean
    assert any("spec.types.worker.resources.cpus" in line for line in errors)
    assert any("colour" in line for line in errors)
    assert "upload:" not in result.stderr  # the progress bar never started
    assert not Experiment.objects.exists() and stored_archives() == before


def test_the_cli_and_its_validator_import_without_django():
    code = (
        "import sys, aichor.cli.main, experiments.manifest; "
        "print(sorted(m for m in sys.modules if m == 'django' or m.startswith('django.')))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="/")
    assert result.stdout.strip() == "[]"
