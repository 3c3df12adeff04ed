"""The REST API through HTTP: every route for every persona, then what each route does."""

import pytest

from experiments import services
from experiments.logs import append_log
from experiments.manifest import parse_manifest
from experiments.models import Experiment, Status
from projects.models import ApiToken
from tests.api.conftest import streamed
from tests.helpers import manifest_yaml

pytestmark = pytest.mark.django_db

API = "/api/v1"


def new_experiment(project, user, **fields) -> Experiment:
    fields.setdefault("commit_sha", "a" * 40)
    fields.setdefault("branch", "main")
    return services.create_experiment(
        project=project, author=user, manifest_path="aichor_manifests/manifest.yaml", **fields
    )


def finished(project, user) -> Experiment:
    experiment = new_experiment(project, user, message="done")
    services.finish_experiment(experiment.pk, Status.FAILED, reason="boom", exit_code=1)
    return experiment


# (method, path template, body kind, status for a member) — {exp} is created per call.
ROUTES = [
    ("get", "/projects/vision", None, 200),
    ("get", "/projects/vision/engines", None, 200),
    ("get", "/projects/vision/experiments", None, 200),
    ("post", "/projects/vision/experiments", "commit", 201),
    ("get", "/experiments/{exp}", None, 200),
    ("get", "/experiments/{exp}/steps", None, 200),
    ("get", "/experiments/{exp}/logs/streams", None, 200),
    ("get", "/experiments/{exp}/logs", None, 200),
    ("post", "/experiments/{exp}/cancel", None, 200),
    ("post", "/experiments/{done}/resubmit", None, 201),
]
UNSCOPED = [("/me", 200), ("/projects", 200), ("/engines", 200)]


def call(client, project, admin_user, method, template, body, headers):
    path = API + template.format(exp=new_experiment(project, admin_user).pk, done=finished(project, admin_user).pk)
    if body == "commit":
        return client.post(path, {"sha": "b" * 40, "branch": "main"}, content_type="application/json", headers=headers)
    return getattr(client, method)(path, headers=headers)


@pytest.mark.parametrize("method,template,body,ok", ROUTES)
@pytest.mark.parametrize("persona", ["admin", "member", "outsider", "anonymous", "expired", "revoked"])
def test_every_route_for_every_persona(
    client, project_with_all, admin_user, tokens, persona, method, template, body, ok
):
    response = call(client, project_with_all, admin_user, method, template, body, tokens[persona])
    expected = {"admin": ok, "member": ok, "outsider": 404}.get(persona, 401)
    assert response.status_code == expected, response.content


@pytest.mark.parametrize("path,ok", UNSCOPED)
@pytest.mark.parametrize("persona", ["admin", "member", "outsider", "anonymous", "expired", "revoked"])
def test_account_routes_for_every_persona(client, project_with_all, tokens, persona, path, ok):
    response = client.get(API + path, headers=tokens[persona])
    assert response.status_code == ({"admin": ok, "member": ok, "outsider": ok}.get(persona, 401))


@pytest.mark.parametrize(
    "method,template,body,ok", [*ROUTES, ("post", "/projects/vision/experiments/archive", None, 201)]
)
def test_wrong_method_is_405(client, project_with_all, admin_user, tokens, method, template, body, ok):
    wrong = "delete" if method == "post" else "put"
    path = API + template.format(exp=new_experiment(project_with_all, admin_user).pk, done="x")
    assert getattr(client, wrong)(path, headers=tokens["member"]).status_code == 405


def test_outsider_sees_no_projects_or_engines(client, project, tokens):
    assert client.get(f"{API}/projects", headers=tokens["outsider"]).json() == []
    assert client.get(f"{API}/engines", headers=tokens["outsider"]).json() == []
    projects = client.get(f"{API}/projects", headers=tokens["member"]).json()
    assert [(p["slug"], p["role"], p["default_engine"]) for p in projects] == [("vision", "member", "local")]
    assert client.get(f"{API}/me", headers=tokens["member"]).json()["username"] == "member@example.com"


def test_session_may_read_but_not_write(client, project, member_user):
    client.force_login(member_user)
    assert client.get(f"{API}/projects/vision").status_code == 200
    response = client.post(
        f"{API}/projects/vision/experiments", {"sha": "b" * 40, "branch": "main"}, content_type="application/json"
    )
    assert response.status_code == 401


def test_token_use_is_recorded(client, project, tokens, member_user):
    assert ApiToken.objects.get(user=member_user, revoked_at=None).last_used_at is None
    client.get(f"{API}/me", headers=tokens["member"])
    assert ApiToken.objects.get(user=member_user, revoked_at=None).last_used_at is not None


def test_submit_commit_creates_experiment_authored_by_caller(client, project, tokens, member_user):
    response = client.post(
        f"{API}/projects/vision/experiments",
        {"sha": "C" * 40, "branch": "feature", "manifest_path": "aichor_manifests/train.yaml", "message": "lr"},
        content_type="application/json",
        headers=tokens["member"],
    )
    assert response.status_code == 201, response.content
    body = response.json()
    assert (body["status"], body["current_step"], body["engine"]) == ("Created", "Waiting", "local")
    experiment = Experiment.objects.get(pk=body["id"])
    assert (experiment.author, experiment.commit_sha, experiment.branch) == (member_user, "c" * 40, "feature")
    assert experiment.manifest_path == "aichor_manifests/train.yaml"


@pytest.mark.parametrize(
    "payload",
    [
        {"sha": "not-hex", "branch": "main"},
        {"sha": "a" * 40, "branch": "main", "manifest_path": "../etc/passwd.yaml"},
        {"sha": "a" * 40, "branch": "main", "manifest_path": "/abs.yaml"},
        {"sha": "a" * 40, "branch": "main", "manifest_path": "manifest.txt"},
        {"sha": "a" * 40},
    ],
)
def test_submit_commit_refuses_bad_input(client, project, tokens, payload):
    response = client.post(
        f"{API}/projects/vision/experiments", payload, content_type="application/json", headers=tokens["member"]
    )
    assert response.status_code == 422
    assert not Experiment.objects.exists()


def test_submit_on_an_engine_the_project_lacks_is_refused(client, project, tokens):
    response = client.post(
        f"{API}/projects/vision/experiments",
        {"sha": "a" * 40, "branch": "main", "engine": "gpu-cluster"},
        content_type="application/json",
        headers=tokens["member"],
    )
    assert response.status_code == 409
    assert "gpu-cluster" in response.json()["detail"]


def test_list_filters_and_keyset_pagination(client, project, tokens, admin_user, member_user):
    made = [new_experiment(project, member_user, message=f"run {i}") for i in range(5)]
    services.finish_experiment(made[0].pk, Status.FAILED, reason="boom")
    new_experiment(project, admin_user, message="admin run")
    url = f"{API}/projects/vision/experiments"
    seen, cursor = [], None
    while True:
        params = {"limit": 2, "author": "member@example.com"} | ({"cursor": cursor} if cursor else {})
        page = client.get(url, params, headers=tokens["member"]).json()
        seen += [item["message"] for item in page["items"]]
        cursor = page["next"]
        if not cursor:
            break
    assert seen == [f"run {i}" for i in reversed(range(5))]
    failed = client.get(url, {"status": "Failed"}, headers=tokens["member"]).json()["items"]
    assert [item["id"] for item in failed] == [str(made[0].pk)]
    assert [i["message"] for i in client.get(url, {"q": "ADMIN"}, headers=tokens["member"]).json()["items"]] == [
        "admin run"
    ]
    assert client.get(url, {"cursor": "garbage"}, headers=tokens["member"]).status_code == 400


GPU_MANIFEST = manifest_yaml(
    "python train.py",
    operator="pytorch",
    types="    worker:\n      count: 2\n      resources: {cpus: 6, memory: 40, accelerators: {gpu: {count: 4, type: a100}}}\n",
)


def with_manifest(experiment: Experiment, text: str) -> Experiment:
    """As Cloning leaves it: the validated manifest stored."""
    Experiment.objects.filter(pk=experiment.pk).update(manifest=parse_manifest(text).to_dict(), manifest_text=text)
    return experiment


def test_list_and_detail_give_the_resources_the_manifest_asks_for(client, project, tokens, member_user):
    gpu = with_manifest(new_experiment(project, member_user, message="gpus"), GPU_MANIFEST)
    unread = new_experiment(project, member_user, message="not cloned yet")
    expected = {
        "processes": 2,
        "cpus": 12,
        "gpus": 8,
        "gpus_by_type": {"a100": 8},
        "memory_gb": 80,
        "tpu_chips": 0,
    }
    items = client.get(f"{API}/projects/vision/experiments", headers=tokens["member"]).json()["items"]
    assert {item["message"]: item["resources"] for item in items} == {"gpus": expected, "not cloned yet": None}
    assert client.get(f"{API}/experiments/{gpu.pk}", headers=tokens["member"]).json()["resources"] == expected
    assert client.get(f"{API}/experiments/{unread.pk}", headers=tokens["member"]).json()["resources"] is None


def test_list_query_count_does_not_grow_with_rows(client, project, tokens, member_user, django_assert_max_num_queries):
    for i in range(30):
        with_manifest(new_experiment(project, member_user, message=f"run {i}"), GPU_MANIFEST)
    with django_assert_max_num_queries(6):
        assert len(client.get(f"{API}/projects/vision/experiments", headers=tokens["member"]).json()["items"]) == 30


def test_steps_and_logs(client, project, tokens, member_user):
    experiment = new_experiment(project, member_user)
    append_log(experiment.pk, "step:Cloning", "cloned\n")
    append_log(experiment.pk, "process:worker-0", "epoch 1\n")
    append_log(experiment.pk, "process:worker-0", "epoch 2\n")
    steps = client.get(f"{API}/experiments/{experiment.pk}/steps", headers=tokens["member"]).json()
    assert [s["name"] for s in steps] == ["Waiting", "Cloning", "Building", "Submitting", "Running", "Completed"]
    assert steps[0]["status"] == "Running"
    response = client.get(f"{API}/experiments/{experiment.pk}/logs", headers=tokens["member"])
    assert response["Content-Type"].startswith("text/plain")
    assert streamed(response) == b"epoch 1\nepoch 2\n"
    response = client.get(f"{API}/experiments/{experiment.pk}/logs?stream=step:Cloning", headers=tokens["member"])
    assert streamed(response) == b"cloned\n"
    streams = client.get(f"{API}/experiments/{experiment.pk}/logs/streams", headers=tokens["member"]).json()
    assert streams == ["process:worker-0", "step:Cloning"]


def test_logs_of_several_processes_are_labelled(client, project, tokens, member_user):
    experiment = new_experiment(project, member_user)
    append_log(experiment.pk, "process:master-0", "hello\n")
    append_log(experiment.pk, "process:worker-0", "hi\n")
    body = streamed(client.get(f"{API}/experiments/{experiment.pk}/logs", headers=tokens["member"]))
    assert body == b"[master-0] hello\n[worker-0] hi\n"


def test_follow_of_a_finished_experiment_ends(client, project, tokens, member_user):
    experiment = finished(project, member_user)
    append_log(experiment.pk, "process:worker-0", "done\n")
    response = client.get(f"{API}/experiments/{experiment.pk}/logs?follow=true", headers=tokens["member"])
    assert streamed(response) == b"done\n"


def test_cancel_and_resubmit(client, project, tokens, member_user):
    experiment = new_experiment(project, member_user)
    response = client.post(f"{API}/experiments/{experiment.pk}/cancel", headers=tokens["member"])
    assert response.json()["status"] == "Cancelled"
    again = client.post(f"{API}/experiments/{experiment.pk}/cancel", headers=tokens["member"])
    assert again.status_code == 409 and "nothing to cancel" in again.json()["detail"]
    response = client.post(f"{API}/experiments/{experiment.pk}/resubmit", headers=tokens["member"])
    assert response.status_code == 201
    assert response.json()["resubmitted_from"] == str(experiment.pk)
    active = response.json()["id"]
    assert client.post(f"{API}/experiments/{active}/resubmit", headers=tokens["member"]).status_code == 409


def test_unknown_or_malformed_experiment_is_404(client, project, tokens):
    assert client.get(f"{API}/experiments/not-a-uuid", headers=tokens["member"]).status_code == 404
    assert (
        client.get(f"{API}/experiments/00000000-0000-0000-0000-000000000000", headers=tokens["member"]).status_code
        == 404
    )


def test_docs_and_schema_load_nothing_from_a_cdn(client):
    from django.contrib.staticfiles import finders

    schema = client.get(f"{API}/openapi.json")
    assert schema.status_code == 200
    assert "/api/v1/projects/{slug}/experiments/archive" in schema.json()["paths"]
    docs = client.get(f"{API}/docs").content.decode()
    assert "swagger-ui-bundle.js" in docs
    assert "cdn" not in docs.lower() and "https://" not in docs
    assert finders.find("ninja/swagger-ui-bundle.js")
