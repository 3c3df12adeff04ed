"""A worker keeps its database connection from one task to the next (a new PostgreSQL connection
per task cost as much as a pipeline step's queries, issue 12), so it must still run its next task
when the database dropped that connection meanwhile (a restart, an idle timeout)."""

import pytest
from django.db import connection
from django.db.backends.signals import connection_created

from experiments import services
from experiments.models import EngineWatch, Status
from tests.helpers import ended, manifest_yaml, wait_for

pytestmark = pytest.mark.django_db(transaction=True)

MANIFEST = "aichor_manifests/train.yaml"


@pytest.fixture
def opened_backends():
    """The PostgreSQL backends of the connections this test's threads open: only those are
    dropped, not the ones other tests' live servers keep in this process."""
    pids = set()

    def note(sender, connection, **kwargs):
        pids.add(connection.connection.info.backend_pid)

    connection_created.connect(note)
    yield pids
    connection_created.disconnect(note)


def terminate(pids: set[int]) -> int:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE pid = ANY(%s) AND pid <> pg_backend_pid()",
            [list(pids)],
        )
        return cursor.fetchone()[0]


def test_a_worker_whose_connection_the_database_dropped_runs_the_next_experiment(
    project, git_repo, monkeypatch, celery_worker_thread, opened_backends
):
    if connection.vendor != "postgresql":
        pytest.skip("terminating another session's connection is PostgreSQL's")
    # Production's age (the tests' settings close every connection at once); shared by every
    # thread's connection.
    monkeypatch.setitem(connection.settings_dict, "CONN_MAX_AGE", 60)
    sha = git_repo.commit({MANIFEST: manifest_yaml("echo done")}, "aichor[train.yaml]: twice")
    first = services.create_experiment(project=project, commit_sha=sha, branch="main", manifest_path=MANIFEST)
    assert ended(first.pk).status == Status.SUCCEEDED
    # Once the engine's watcher has stopped too, every connection left is one kept between tasks.
    wait_for(lambda: not EngineWatch.objects.exclude(owner="").exists(), message="the watcher stopped")

    assert terminate(opened_backends) >= 1  # the worker's, kept

    second = services.create_experiment(project=project, commit_sha=sha, branch="main", manifest_path=MANIFEST)
    experiment = ended(second.pk)
    assert experiment.status == Status.SUCCEEDED, experiment.failure_reason
    wait_for(lambda: not EngineWatch.objects.exclude(owner="").exists(), message="the watcher stopped")
    terminate(opened_backends)  # none left open for the test database's removal
