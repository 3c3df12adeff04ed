"""Comparing runs: two real runs that differ in their learning rate, side by side: the changed
setting highlighted, both final metrics, both curves; the URL is shareable among members and
404 for outsiders."""

import re

import pytest

from experiments.models import Status
from tests.experiments.test_pipeline_local import push_and_wait

pytestmark = pytest.mark.django_db(transaction=True)


def run(client, project, git_repo, lr: str, final: str):
    command = f'echo "AICHOR_METRIC loss=0.9 step=0"; echo "AICHOR_METRIC loss={final} step=10"'
    experiment = push_and_wait(client, project, git_repo, command, extra_spec=f"  env:\n    LR: '{lr}'\n")
    assert experiment.status == Status.SUCCEEDED, experiment.failure_reason
    return experiment


@pytest.fixture
def two_runs(client, project, git_repo, celery_worker_thread):
    return run(client, project, git_repo, "0.001", "0.5"), run(client, project, git_repo, "0.0003", "0.25")


def test_comparison_highlights_the_changed_learning_rate(client, project, two_runs, member_user, outsider_user):
    first, second = two_runs
    url = f"/p/{project.slug}/compare/?e={first.pk}&e={second.pk}"
    client.force_login(member_user)
    response = client.get(url)
    assert response.status_code == 200
    html = response.content.decode()
    rows = re.findall(r'<tr( class="differs")?><th scope="row" class="mono">([^<]+)', html)
    changed = {label.strip() for flag, label in rows if flag}
    assert "spec.env.LR" in changed and "commit" in changed
    assert "spec.image" not in changed and "spec.image" in html
    assert "0.001" in html and "0.0003" in html
    metrics_table = html[html.index('id="compare-metrics"') :]
    assert ">0.5<" in metrics_table and ">0.25<" in metrics_table

    assert client.post(url).status_code == 405  # a link to paste: it changes nothing
    assert client.get(f"/p/{project.slug}/compare/?e={first.pk}").status_code == 400
    assert (
        client.get(f"/p/{project.slug}/compare/?e={first.pk}&e=00000000-0000-0000-0000-000000000000").status_code == 404
    )
    client.force_login(outsider_user)
    assert client.get(url).status_code == 404
