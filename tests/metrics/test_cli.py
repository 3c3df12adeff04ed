"""`aichor experiments metrics ID [--json]` against a live server, for a real workload's series."""

import pytest

from experiments.models import Status
from tests.experiments.test_pipeline_local import push_and_wait

pytestmark = pytest.mark.django_db(transaction=True)


def test_cli_prints_the_series(logged_in, client, project, git_repo, celery_worker_thread):
    command = 'for i in 1 2 3; do echo "AICHOR_METRIC val_loss=0.$((5 - i)) step=$i"; done'
    experiment = push_and_wait(client, project, git_repo, command)
    assert experiment.status == Status.SUCCEEDED, experiment.failure_reason

    data = logged_in.json("experiments", "metrics", str(experiment.pk))
    (series,) = data["series"]
    assert (series["name"], series["steps"], series["values"]) == ("val_loss", [1, 2, 3], [0.4, 0.3, 0.2])
    text = logged_in.run("experiments", "metrics", experiment.short_id).stdout
    assert "val_loss" in text and "3 points" in text and "last 0.2" in text and "best 0.2" in text

    missing = logged_in.run("experiments", "metrics", "00000000-0000-0000-0000-000000000000", check=False)
    assert missing.returncode != 0 and "no experiment" in missing.stderr
