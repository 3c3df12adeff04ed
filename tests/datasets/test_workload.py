"""A workload reads AICHOR_INPUT_PATH and writes AICHOR_OUTPUT_PATH, and what it wrote shows in
the Datasets tab: on the docker engine with filesystem buckets (mounted), and with S3 buckets
(the workload uses boto3 with the injected endpoint and credentials)."""

import io

import pytest

from datasets import services
from experiments import logs
from experiments.models import Experiment, Status
from projects.services import create_project
from tests.datasets.conftest import downloaded, use_s3
from tests.helpers import TEST_IMAGE, github_push, manifest_yaml, wait_for

pytestmark = pytest.mark.django_db(transaction=True)

S3_SCRIPT = (
    "import boto3, os; "
    "s3 = boto3.client('s3', endpoint_url=os.environ['AWS_ENDPOINT_URL']); "
    "src = os.environ['AICHOR_INPUT_PATH'][5:].rstrip('/'); "
    "out_bucket, _, out_prefix = os.environ['AICHOR_OUTPUT_PATH'][5:].partition('/'); "
    "text = s3.get_object(Bucket=src, Key='data/input.txt')['Body'].read().decode(); "
    "s3.put_object(Bucket=out_bucket, Key=out_prefix + 'result.txt', Body=text.upper().encode()); "
    "print('wrote', out_prefix + 'result.txt')"
)


def run_experiment(client, project, git_repo, command: str, dockerfile: str = "FROM scratch\n") -> Experiment:
    message = "aichor[train.yaml]: storage"
    sha = git_repo.commit({"aichor_manifests/train.yaml": manifest_yaml(command), "Dockerfile": dockerfile}, message)
    response = github_push(client, project, sha=sha, message=message)
    assert response.status_code == 201, response.content
    experiment_id = response.json()["experiment"]
    return wait_for(
        lambda: Experiment.objects.filter(pk=experiment_id, status__in=[Status.SUCCEEDED, Status.FAILED]).first(),
        timeout=120,
        message="the experiment to end",
    )


def assert_result_in_datasets_tab(client, project, experiment, member_user):
    assert client.login(username=member_user.username, password="pw-member-123")
    prefix = experiment.output_prefix
    page = client.get(f"/p/{project.slug}/datasets/", {"bucket": "outputs", "prefix": prefix})
    assert page.status_code == 200 and "result.txt" in page.content.decode()
    _, body = downloaded(
        client.get(f"/p/{project.slug}/datasets/download/", {"bucket": "outputs", "key": prefix + "result.txt"})
    )
    assert body.strip() == b"HELLO FROM THE INPUTS BUCKET"


@pytest.mark.docker
def test_docker_workload_reads_inputs_and_writes_outputs_on_filesystem_buckets(
    client, settings, docker_engine, admin_user, member_user, git_repo, celery_worker_thread
):
    settings.AICHOR_STORAGE = "filesystem"
    project = create_project(
        name="Dock storage", slug="dockstore", repo_clone_url=git_repo.url, engines=[docker_engine],
        admins=[admin_user], members=[member_user], webhook_secret="s3cret-webhook",
    )  # fmt: skip
    assert services.bucket_root(project.outputs_bucket).is_dir()  # created after commit
    services.upload_object(project.inputs_bucket, "data/input.txt", io.BytesIO(b"hello from the inputs bucket\n"), 29)
    experiment = run_experiment(
        client,
        project,
        git_repo,
        'tr a-z A-Z < "$AICHOR_INPUT_PATH/data/input.txt" > "$AICHOR_OUTPUT_PATH/result.txt" && echo ok',
        dockerfile=f"FROM {TEST_IMAGE}\nWORKDIR /app\nCOPY . /app\n",
    )
    assert experiment.status == Status.SUCCEEDED, (
        experiment.failure_reason,
        logs.log_text(experiment.pk, "process:worker-0"),
    )
    assert_result_in_datasets_tab(client, project, experiment, member_user)


@pytest.mark.s3
def test_workload_reads_inputs_and_writes_outputs_on_s3_buckets(
    client, settings, s3_server, local_engine, admin_user, member_user, git_repo, celery_worker_thread
):
    use_s3(settings, s3_server)
    project = create_project(
        name="S3 storage", slug="s3store", repo_clone_url=git_repo.url, engines=[local_engine],
        admins=[admin_user], members=[member_user], webhook_secret="s3cret-webhook",
    )  # fmt: skip
    services.upload_object(project.inputs_bucket, "data/input.txt", io.BytesIO(b"hello from the inputs bucket\n"), 29)
    experiment = run_experiment(client, project, git_repo, f'python3 -c "{S3_SCRIPT}"')
    output = logs.log_text(experiment.pk, "process:worker-0")
    assert experiment.status == Status.SUCCEEDED, (experiment.failure_reason, output)
    assert f"wrote {experiment.output_prefix}result.txt" in output
    assert experiment.output_prefix == f"output/{experiment.pk}/"
    assert_result_in_datasets_tab(client, project, experiment, member_user)
