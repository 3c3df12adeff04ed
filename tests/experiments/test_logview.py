"""The experiment page's log picker while a long log is written: every stream the experiment has,
once each, whatever the length of its log, and none of another experiment's."""

import re

import pytest

from experiments import services
from experiments.logs import LogWriter, append_log
from experiments.logview import stream_names
from experiments.models import LogChunk, Status, StepName

pytestmark = pytest.mark.django_db

LONG = "process:worker-0"


def new_experiment(project):
    return services.create_experiment(
        project=project, message="aichor[t.yaml]: x", manifest_path="aichor_manifests/t.yaml"
    )


@pytest.fixture
def running(project):
    """A running experiment whose worker printed a log of many chunks, with two step logs and a
    second process that printed one line."""
    experiment = new_experiment(project)
    services.begin_step(experiment.pk, StepName.CLONING)
    append_log(experiment.pk, "step:Cloning", "cloned\n")
    append_log(experiment.pk, "step:Building", "built\n")
    with LogWriter(experiment.pk, LONG) as writer:
        for start in range(0, 60_000, 1_000):
            writer.write("".join(f"{i} {'0' * 40}\n" for i in range(start, start + 1_000)))
            writer.flush()  # a chunk each, as a follower's poll finds them
    append_log(experiment.pk, "process:master-0", "ready\n")
    assert LogChunk.objects.filter(experiment=experiment, stream=LONG).count() == 60
    return experiment


def picker(html: str) -> list[str]:
    select = re.search(r'<select id="log-stream".*?</select>', html, re.S).group(0)
    return re.findall(r'<option value="([^"]+)"', select)


def test_the_picker_offers_each_stream_once_processes_first(client, member_user, project, running):
    append_log(new_experiment(project).pk, "process:elsewhere-0", "not this experiment's\n")
    client.force_login(member_user)
    html = client.get(f"/experiments/{running.pk}/").content.decode()
    assert picker(html) == ["process:master-0", "process:worker-0", "step:Cloning", "step:Building"]
    assert stream_names(str(running.pk)) == ["process:master-0", "process:worker-0", "step:Building", "step:Cloning"]


def test_an_experiment_without_logs_has_no_streams(project):
    assert stream_names(new_experiment(project).pk) == []


def test_a_stream_of_another_experiment_is_not_downloadable(client, member_user, project, running):
    other = new_experiment(project)
    append_log(other.pk, "process:elsewhere-0", "not this experiment's\n")
    client.force_login(member_user)
    assert client.get(f"/experiments/{running.pk}/log/download/?stream=process:elsewhere-0").status_code == 404
    response = client.get(f"/experiments/{running.pk}/log/download/?stream=process:master-0")
    assert b"".join(response.streaming_content) == b"ready\n"


def test_a_finished_experiment_links_its_resubmission(client, member_user, project):
    original = new_experiment(project)
    services.begin_step(original.pk, StepName.CLONING)
    services.finish_experiment(original.pk, Status.SUCCEEDED)
    original.refresh_from_db()
    new = services.resubmit_experiment(original, actor=member_user)
    client.force_login(member_user)
    html = client.get(f"/experiments/{original.pk}/").content.decode()
    assert "Resubmitted as" in html and f'href="/experiments/{new.pk}/"' in html
