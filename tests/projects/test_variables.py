"""Project variables: members manage them, sensitive values are encrypted and never shown again,
and runtime ones reach the workload."""

import pytest

from experiments import logs
from experiments.models import Experiment
from projects.models import ProjectVariable
from tests.helpers import github_push, manifest_yaml, wait_for

pytestmark = pytest.mark.django_db

URL = "/p/vision/variables/"


def test_member_adds_a_sensitive_variable_that_is_never_shown(client, project, member_user):
    client.force_login(member_user)
    response = client.post(URL, {"name": "WANDB_KEY", "kind": "runtime", "value": "top-secret-123", "sensitive": "on"})
    assert response.status_code == 302
    variable = ProjectVariable.objects.get(project=project, name="WANDB_KEY")
    assert variable.value == "" and "top-secret-123" not in variable.value_encrypted
    assert variable.plain_value() == "top-secret-123"
    page = client.get(URL)
    assert b"WANDB_KEY" in page.content and b"top-secret-123" not in page.content


def test_protected_and_malformed_names_are_refused(client, project, member_user):
    client.force_login(member_user)
    for name in ("AICHOR_EXPERIMENT_ID", "RANK", "1BAD", "A-B"):
        response = client.post(URL, {"name": name, "kind": "runtime", "value": "x"})
        assert response.status_code == 400
    assert not ProjectVariable.objects.exists()


def test_delete_variable(client, project, member_user):
    client.force_login(member_user)
    client.post(URL, {"name": "A", "kind": "build", "value": "1"})
    variable = ProjectVariable.objects.get()
    assert client.post(f"{URL}{variable.pk}/delete/").status_code == 302
    assert not ProjectVariable.objects.exists()
    assert client.post(f"{URL}{variable.pk}/delete/").status_code == 404


def test_outsider_anonymous_and_wrong_method(client, project, outsider_user):
    assert client.get(URL).status_code == 302  # to the login page
    client.force_login(outsider_user)
    assert client.get(URL).status_code == 404
    assert client.post(URL, {"name": "A", "kind": "runtime", "value": "1"}).status_code == 404
    assert not ProjectVariable.objects.exists()
    assert client.put(URL).status_code == 405


@pytest.mark.django_db(transaction=True)
def test_runtime_variables_reach_the_workload_and_spec_env_wins(
    client, project, member_user, git_repo, celery_worker_thread
):
    client.force_login(member_user)
    client.post(URL, {"name": "TOKEN", "kind": "runtime", "value": "from-project", "sensitive": "on"})
    client.post(URL, {"name": "LR", "kind": "runtime", "value": "0.1"})
    manifest = manifest_yaml("echo $TOKEN $LR", extra_spec="  env:\n    LR: '0.3'\n")
    message = "aichor[train.yaml]: variables"
    sha = git_repo.commit({"aichor_manifests/train.yaml": manifest}, message)
    experiment_id = github_push(client, project, sha=sha, message=message).json()["experiment"]
    experiment = wait_for(
        lambda: Experiment.objects.filter(pk=experiment_id, status__in=["Succeeded", "Failed"]).first()
    )
    assert experiment.status == "Succeeded", experiment.failure_reason
    assert logs.log_text(experiment_id, "process:worker-0") == "from-project 0.3\n"
