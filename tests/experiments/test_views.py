"""The dashboard's experiment pages through the test client: who sees what, and what each does."""

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from experiments import services
from experiments.logs import append_log
from experiments.manifest import parse_manifest
from experiments.models import Experiment, Status, StepName
from projects.models import Engine
from tests.helpers import manifest_yaml

pytestmark = pytest.mark.django_db

PERSONAS = [("admin_user", 200), ("member_user", 200), ("outsider_user", 404)]
MANIFEST_TEXT = manifest_yaml(
    "python train.py",
    operator="pytorch",
    extra_spec='  env:\n    LR: "3e-4"\n',
    types="    Master:\n      count: 1\n      resources: {cpus: 4, memory: 16}\n"
    "    Worker:\n      count: 2\n      resources: {cpus: 8, ramRatio: 2, accelerators: {gpu: {count: 1, type: a100}}}\n",
)
# What Cloning stores for it.
MANIFEST = parse_manifest(MANIFEST_TEXT).to_dict()


def make_experiment(project, message="aichor[train.yaml]: try lr", **fields) -> Experiment:
    experiment = services.create_experiment(
        project=project,
        message=message,
        author_name="researcher",
        commit_sha="a" * 40,
        manifest_path="aichor_manifests/train.yaml",
    )
    if fields:
        Experiment.objects.filter(pk=experiment.pk).update(**fields)
        experiment.refresh_from_db()
    return experiment


def finished(project, status=Status.SUCCEEDED, **kwargs) -> Experiment:
    experiment = make_experiment(project, **kwargs)
    services.begin_step(experiment.pk, StepName.CLONING)
    services.finish_experiment(
        experiment.pk,
        status,
        reason="worker-0 exited with code 3" if status == "Failed" else "",
        exit_code=3 if status == "Failed" else 0,
    )
    experiment.refresh_from_db()
    return experiment


@pytest.fixture
def experiment(project):
    return make_experiment(project, manifest=MANIFEST, manifest_text=MANIFEST_TEXT)


def as_user(client, request, persona):
    client.force_login(request.getfixturevalue(persona))
    return client


# --- the experiments list ---------------------------------------------------------------------
@pytest.mark.parametrize("persona,status", PERSONAS)
def test_list_is_for_members_only(client, request, project, experiment, persona, status):
    response = as_user(client, request, persona).get("/p/vision/?engine=local")
    assert response.status_code == status
    if status == 200:
        assert experiment.short_id in response.content.decode()


def test_list_sends_anonymous_to_login(client, project):
    response = client.get("/p/vision/?engine=local")
    assert response.status_code == 302
    assert response["Location"].startswith("/login/?next=")


def test_list_refuses_post(client, member_user, project):
    client.force_login(member_user)
    assert client.post("/p/vision/?engine=local").status_code == 405


def test_list_shows_columns_from_the_experiment_and_its_manifest(client, member_user, project, experiment):
    client.force_login(member_user)
    html = client.get("/p/vision/?engine=local").content.decode()
    row = html[html.index(f'id="exp-{experiment.pk}"') :]
    row = row[: row.index("</tr>")]
    assert "aichor[train.yaml]: try lr" in row
    assert 'href="https://github.com/acme/vision/commit/' + "a" * 40 in row
    assert "researcher" in row
    assert "Created" in row and "Waiting" in row
    # 1×4 + 2×8 CPUs, 2 GPUs, 16 + 2×(8×2) GB
    assert resource_cells(row) == ["20", "2 × A100", "48 GB"]


def row_of(html: str, experiment: Experiment) -> str:
    row = html[html.index(f'id="exp-{experiment.pk}"') :]
    return row[: row.index("</tr>")]


def resource_cells(row: str) -> list[str]:
    """The CPUs, GPUs and memory cells of a table row."""
    return [c.split("</td>")[0].strip() for c in row.split('<td class="num opt">')[1:4]]


GPU_WORKERS = (
    "    worker:\n      count: 2\n      resources: {cpus: 6, memory: 40, accelerators: {gpu: {count: 4, type: a100}}}\n"
)
KUBERAY = (
    "    Head:\n      resources: {cpus: 4, memory: 8}\n"
    "    Workers:\n"
    "      - name: cpu\n        count: 3\n        resources: {cpus: 2, ramRatio: 2}\n"
    "      - name: gpu\n        count: 2\n        resources: {cpus: 8, memory: 32, accelerators: {gpu: {count: 1}}}\n"
)


@pytest.mark.parametrize(
    "operator,types,cells",
    [
        # 2 workers × 4 A100s, 2 × 6 CPUs, 2 × 40 GB
        ("pytorch", GPU_WORKERS, ["12", "8 × A100", "80 GB"]),
        # the head and both pools: 4 + 3×2 + 2×8 CPUs, 2×1 GPUs, 8 + 3×4 + 2×32 GB
        ("kuberay", KUBERAY, ["26", "2", "84 GB"]),
    ],
)
def test_list_counts_every_process_of_the_manifest(client, member_user, project, operator, types, cells):
    text = manifest_yaml("python train.py", operator=operator, types=types)
    experiment = make_experiment(project, manifest=parse_manifest(text).to_dict(), manifest_text=text)
    unread = make_experiment(project)
    client.force_login(member_user)
    html = client.get("/p/vision/?engine=local").content.decode()
    assert resource_cells(row_of(html, experiment)) == cells
    assert 'title="known once the manifest is read">—</td>' in row_of(html, unread)
    page = client.get(f"/experiments/{experiment.pk}/").content.decode()
    cpus, gpus, memory = cells
    assert f"<dt>Resources</dt><dd>{cpus} CPU · {gpus} GPU · {memory}</dd>" in page


def test_list_shows_all_engines_by_default_with_an_engine_column(client, member_user, project):
    other = Engine.objects.create(name="gpu-docker", kind=Engine.Kind.DOCKER)
    project.engines.add(other)
    here = make_experiment(project, message="on local")
    there = services.create_experiment(
        project=project, engine=other, commit_sha="b" * 40, manifest_path="manifest.yaml", message="on gpu"
    )
    client.force_login(member_user)
    response = client.get("/p/vision/")
    assert response.status_code == 200
    html = response.content.decode()
    assert '<option value="" selected>All engines</option>' in html
    assert '<th scope="col" class="opt">Engine</th>' in html
    assert '<td class="engine nowrap opt">local</td>' in row_of(html, here)
    assert '<td class="engine nowrap opt">gpu-docker</td>' in row_of(html, there)


def test_list_remembers_the_chosen_engine_and_all_engines(client, member_user, project):
    other = Engine.objects.create(name="gpu-docker", kind=Engine.Kind.DOCKER)
    project.engines.add(other)
    client.force_login(member_user)
    client.get("/p/vision/?engine=gpu-docker")
    # The choice is remembered and put back in the URL, so the page can be shared.
    assert client.get("/p/vision/")["Location"] == "/p/vision/?engine=gpu-docker"
    assert 'value="gpu-docker" selected' in client.get("/p/vision/details/").content.decode()
    client.get("/p/vision/?engine=")
    response = client.get("/p/vision/")
    assert response.status_code == 200 and '<option value="" selected>All engines</option>' in response.content.decode()
    assert client.get("/")["Location"] == "/p/vision/"


def test_opening_an_experiment_never_changes_the_engine_filter(client, member_user, project):
    other = Engine.objects.create(name="gpu-docker", kind=Engine.Kind.DOCKER)
    project.engines.add(other)
    on_gpu = services.create_experiment(project=project, engine=other, commit_sha="b" * 40, manifest_path="m.yaml")
    client.force_login(member_user)
    client.get("/p/vision/?engine=local")
    page = client.get(f"/experiments/{on_gpu.pk}/").content.decode()
    assert 'value="local" selected' in page and 'value="gpu-docker" selected' not in page
    assert client.get("/p/vision/")["Location"] == "/p/vision/?engine=local"
    client.get("/p/vision/?engine=")
    client.get(f"/experiments/{on_gpu.pk}/")
    assert client.get("/p/vision/").status_code == 200  # still All engines


def test_list_of_one_engine_says_how_many_runs_are_on_others(client, member_user, project, experiment):
    other = Engine.objects.create(name="gpu-docker", kind=Engine.Kind.DOCKER)
    project.engines.add(other)
    client.force_login(member_user)
    html = client.get("/p/vision/?engine=gpu-docker").content.decode()
    assert experiment.short_id not in html
    assert "No experiment in Vision on gpu-docker yet" in html
    assert '1 run on other engines: <a href="/p/vision/?engine=">show all engines</a>' in html
    # Filters carry over to the count and the link.
    html = client.get("/p/vision/?engine=gpu-docker&status=Failed").content.decode()
    assert 'id="elsewhere"' not in html
    html = client.get("/p/vision/?engine=gpu-docker&author=researcher").content.decode()
    assert "1 run on other engines matches these filters" in html
    assert 'href="/p/vision/?engine=&amp;author=researcher"' in html
    assert 'id="elsewhere"' not in client.get("/p/vision/?engine=local").content.decode()


def test_runs_on_other_engines_are_counted_up_to_a_cap(client, member_user, project, monkeypatch):
    # Counted on every view and poll of the list: bounded, so a project with a million runs on
    # its other engines does not count them all each time.
    from experiments import views

    gpu = Engine.objects.create(name="gpu-docker", kind=Engine.Kind.DOCKER)
    cpu = Engine.objects.create(name="cpu-docker", kind=Engine.Kind.DOCKER)
    project.engines.add(gpu, cpu)
    for engine in (gpu, gpu, cpu):
        services.create_experiment(project=project, engine=engine, manifest_path="m.yaml")
    client.force_login(member_user)
    assert "3 runs on other engines" in client.get("/p/vision/?engine=local").content.decode()
    assert "1 run on other engines" in client.get("/p/vision/?engine=gpu-docker").content.decode()
    monkeypatch.setattr(views, "ELSEWHERE_CAP", 2)
    assert "2+ runs on other engines" in client.get("/p/vision/?engine=local").content.decode()


def test_list_filters_by_status_author_and_text(client, member_user, project):
    running = make_experiment(project, message="aichor[a.yaml]: resnet baseline")
    done = finished(project, message="aichor[b.yaml]: vit sweep")
    Experiment.objects.filter(pk=done.pk).update(author_name="alice@example.com")
    client.force_login(member_user)

    def ids(query):
        html = client.get(f"/p/vision/?engine=local&{query}").content.decode()
        return {e.short_id for e in (running, done) if f'id="exp-{e.pk}"' in html}

    assert ids("status=Succeeded") == {done.short_id}
    assert ids("author=alice%40example.com") == {done.short_id}
    assert ids("author=alice") == set()  # exact: the author links in the table fill it in
    assert ids("q=RESNET") == {running.short_id}
    assert ids("q=nothing-like-this") == set()
    assert "No experiment matches these filters" in client.get("/p/vision/?engine=local&q=zzz").content.decode()


def test_list_pages_with_a_keyset_cursor(client, member_user, project):
    from datetime import timedelta

    from django.utils import timezone

    now = timezone.now()
    made = [make_experiment(project, message=f"run {i:03d}", created_at=now - timedelta(minutes=i)) for i in range(55)]
    client.force_login(member_user)
    first = client.get("/p/vision/?engine=local")
    html = first.content.decode()
    assert "run 000" in html and "run 049" in html and "run 050" not in html
    older = html[html.index('href="', html.index('class="pager"')) + 6 :].split('"')[0].replace("&amp;", "&")
    assert "before=" in older
    html2 = client.get(older).content.decode()
    assert "run 050" in html2 and "run 054" in html2 and "run 049" not in html2
    assert "Newest" in html2
    assert len(made) == 55


def test_list_query_count_does_not_grow_with_rows(client, member_user, project):
    client.force_login(member_user)
    for _ in range(3):
        make_experiment(project, manifest=MANIFEST)
    client.get("/p/vision/?engine=local")  # the session is written once, on the first visit
    with CaptureQueriesContext(connection) as few:
        assert client.get("/p/vision/?engine=local").status_code == 200
    for _ in range(60):
        make_experiment(project, manifest=MANIFEST)
    with CaptureQueriesContext(connection) as many:
        assert client.get("/p/vision/?engine=local").status_code == 200
    assert len(few) == len(many), [q["sql"][:120] for q in many.captured_queries]
    assert len(many) <= 8, [q["sql"] for q in many.captured_queries]


def test_list_poll_stops_with_286_when_nothing_is_active(client, member_user, project):
    client.force_login(member_user)
    active = make_experiment(project)
    response = client.get("/p/vision/?engine=local", headers={"HX-Request": "true"})
    assert response.status_code == 200
    assert 'id="experiment-rows"' in response.content.decode() and "<html" not in response.content.decode()
    assert 'hx-trigger="every 2s"' in response.content.decode()
    services.cancel_experiment(active)
    response = client.get("/p/vision/?engine=local", headers={"HX-Request": "true"})
    assert response.status_code == 286
    assert "Cancelled" in response.content.decode()


def test_empty_project_tells_how_to_start(client, member_user, project):
    client.force_login(member_user)
    html = client.get("/p/vision/?engine=local").content.decode()
    assert "aichor[train.yaml]: first run" in html
    assert "aichor experiments submit local" in html
    assert "aichor context set project vision" in html


def test_topbar_offers_only_the_users_projects_and_the_projects_engines(client, member_user, outsider_user, project):
    from projects.services import create_project

    create_project(name="Secret", slug="secret", admins=[outsider_user])
    mine = create_project(name="Audio", slug="audio", members=[member_user])
    client.force_login(member_user)
    html = client.get("/p/vision/?engine=local").content.decode()
    assert 'value="vision" selected' in html and 'value="audio"' in html and "secret" not in html
    assert 'value="local" selected' in html
    assert client.get("/?project=audio")["Location"] == f"/p/{mine.slug}/"


# --- the experiment page ----------------------------------------------------------------------
@pytest.mark.parametrize("persona,status", PERSONAS)
def test_experiment_page_is_for_members_only(client, request, experiment, persona, status):
    response = as_user(client, request, persona).get(f"/experiments/{experiment.pk}/")
    assert response.status_code == status


def test_experiment_page_anonymous_and_wrong_method(client, member_user, experiment):
    assert client.get(f"/experiments/{experiment.pk}/")["Location"].startswith("/login/")
    client.force_login(member_user)
    assert client.post(f"/experiments/{experiment.pk}/").status_code == 405


def test_experiment_page_shows_steps_manifest_and_masked_variables(client, member_user, project, experiment):
    from aichor.lib.crypto import encrypt
    from projects.models import ProjectVariable

    ProjectVariable.objects.create(
        project=project, name="WANDB_KEY", sensitive=True, value_encrypted=encrypt("hunter2-secret")
    )
    ProjectVariable.objects.create(project=project, name="DATASET", value="imagenet")
    client.force_login(member_user)
    html = client.get(f"/experiments/{experiment.pk}/").content.decode()
    for step in ("Waiting", "Cloning", "Building", "Submitting", "Running", "Completed"):
        assert f'data-step="{step}"' in html
    assert "kind: AIchorManifest" in html
    assert "WANDB_KEY" in html and "hunter2-secret" not in html
    assert "imagenet" in html and "LR" in html and "3e-4" in html
    assert "AICHOR_EXPERIMENT_ID" in html and str(experiment.pk) in html
    assert f"output/{experiment.pk}/" in html
    assert "Cancel experiment" in html and "Resubmit" not in html


def test_failed_experiment_says_why_in_one_sentence(client, member_user, project):
    experiment = finished(project, Status.FAILED)
    client.force_login(member_user)
    html = client.get(f"/experiments/{experiment.pk}/").content.decode()
    assert (
        "Failed in the <strong>Cloning</strong> step with exit code <strong>3</strong>: worker-0 exited with code 3."
        in html
    )
    assert "Resubmit" in html and "Cancel experiment" not in html


def test_live_partial_polls_while_active_and_stops_with_286(client, member_user, project, experiment):
    client.force_login(member_user)
    response = client.get(f"/experiments/{experiment.pk}/", headers={"HX-Request": "true"})
    assert response.status_code == 200
    html = response.content.decode()
    assert html.startswith('<section id="experiment-live"') and 'hx-trigger="every 2s"' in html
    services.cancel_experiment(experiment)
    response = client.get(f"/experiments/{experiment.pk}/", headers={"HX-Request": "true"})
    assert response.status_code == 286
    assert "hx-trigger" not in response.content.decode()


# --- cancel and resubmit ----------------------------------------------------------------------
@pytest.mark.parametrize("persona,status", [("admin_user", 302), ("member_user", 302), ("outsider_user", 404)])
def test_cancel_by_members_only(client, request, experiment, persona, status):
    response = as_user(client, request, persona).post(f"/experiments/{experiment.pk}/cancel/")
    assert response.status_code == status
    experiment.refresh_from_db()
    assert experiment.status == (Status.CANCELLED if status == 302 else Status.CREATED)


def test_cancel_anonymous_and_wrong_method(client, member_user, experiment):
    assert client.post(f"/experiments/{experiment.pk}/cancel/")["Location"].startswith("/login/")
    client.force_login(member_user)
    assert client.get(f"/experiments/{experiment.pk}/cancel/").status_code == 405
    experiment.refresh_from_db()
    assert experiment.status == Status.CREATED


def test_cancel_over_htmx_returns_the_updated_partial(client, member_user, experiment):
    client.force_login(member_user)
    response = client.post(f"/experiments/{experiment.pk}/cancel/", headers={"HX-Request": "true"})
    html = response.content.decode()
    assert html.startswith('<section id="experiment-live"')
    assert "Cancelled by member@example.com" in html
    assert experiment.events.filter(actor__username="member@example.com", new="Cancelled").exists()


def test_cancel_of_a_finished_experiment_explains(client, member_user, project):
    experiment = finished(project)
    client.force_login(member_user)
    response = client.post(f"/experiments/{experiment.pk}/cancel/", follow=True)
    assert "nothing to cancel" in response.content.decode()


@pytest.mark.parametrize("persona,status", [("admin_user", 302), ("member_user", 302), ("outsider_user", 404)])
def test_resubmit_by_members_only(client, request, project, persona, status):
    original = finished(project, Status.FAILED)
    response = as_user(client, request, persona).post(f"/experiments/{original.pk}/resubmit/")
    assert response.status_code == status
    resubmissions = Experiment.objects.filter(resubmitted_from=original)
    if status == 302:
        new = resubmissions.get()
        assert response["Location"] == f"/experiments/{new.pk}/"
        assert new.commit_sha == original.commit_sha and new.manifest_path == original.manifest_path
    else:
        assert not resubmissions.exists()


def test_resubmit_over_htmx_redirects_the_page_and_links_back(client, member_user, project):
    original = finished(project)
    client.force_login(member_user)
    response = client.post(f"/experiments/{original.pk}/resubmit/", headers={"HX-Request": "true"})
    new = Experiment.objects.get(resubmitted_from=original)
    assert response["HX-Redirect"] == f"/experiments/{new.pk}/"
    html = client.get(f"/experiments/{new.pk}/").content.decode()
    assert f'href="/experiments/{original.pk}/"' in html and "Resubmission of" in html


def test_resubmit_anonymous_wrong_method_and_active(client, member_user, experiment):
    assert client.post(f"/experiments/{experiment.pk}/resubmit/")["Location"].startswith("/login/")
    client.force_login(member_user)
    assert client.get(f"/experiments/{experiment.pk}/resubmit/").status_code == 405
    response = client.post(f"/experiments/{experiment.pk}/resubmit/", follow=True)
    assert "is still Created" in response.content.decode()
    assert not Experiment.objects.filter(resubmitted_from=experiment).exists()


# --- logs: ranges, search, download -----------------------------------------------------------
@pytest.fixture
def long_log(experiment):
    # 3 000 lines in chunks of 250, as the pipeline's writer stores them.
    for c in range(12):
        append_log(experiment.pk, "process:worker-0", "".join(f"line {c * 250 + i}\n" for i in range(250)))
    append_log(experiment.pk, "process:worker-0", "\x1b[31mERROR\x1b[0m loss is nan\n")
    return experiment


@pytest.mark.parametrize("persona,status", PERSONAS)
@pytest.mark.parametrize(
    "path",
    [
        "log/?stream=process:worker-0",
        "log/search/?stream=process:worker-0&q=nan",
        "log/download/?stream=process:worker-0",
    ],
)
def test_log_endpoints_for_members_only(client, request, long_log, persona, status, path):
    response = as_user(client, request, persona).get(f"/experiments/{long_log.pk}/{path}")
    assert response.status_code == status


@pytest.mark.parametrize("path", ["log/", "log/search/", "log/download/"])
def test_log_endpoints_anonymous_and_wrong_method(client, member_user, long_log, path):
    url = f"/experiments/{long_log.pk}/{path}?stream=process:worker-0&q=x"
    assert client.get(url)["Location"].startswith("/login/")
    client.force_login(member_user)
    assert client.post(url).status_code == 405


def test_log_lines_give_the_tail_and_any_earlier_range(client, member_user, long_log):
    client.force_login(member_user)
    tail = client.get(f"/experiments/{long_log.pk}/log/?stream=process:worker-0").json()
    assert tail["total"] == 3001 and tail["first"] == 1001 and len(tail["lines"]) == 2000
    assert tail["lines"][-1] == "\x1b[31mERROR\x1b[0m loss is nan"
    window = client.get(f"/experiments/{long_log.pk}/log/?stream=process:worker-0&start=240&end=260").json()
    assert window["first"] == 240 and window["lines"] == [f"line {i}" for i in range(240, 260)]


def test_log_search_covers_the_whole_log_and_gives_line_numbers(client, member_user, long_log):
    client.force_login(member_user)
    html = client.get(f"/experiments/{long_log.pk}/log/search/?stream=process:worker-0&q=LINE 7").content.decode()
    # line 7, 70-79, 700-799: 111 hits, from the first chunk onwards
    assert 'data-line="7"' in html and 'data-line="799"' in html and "111 matching lines" in html
    html = client.get(f"/experiments/{long_log.pk}/log/search/?stream=process:worker-0&q=nan").content.decode()
    assert 'data-line="3000"' in html and "ERROR loss is nan" in html  # colour codes stripped


def test_log_download_streams_the_whole_log(client, member_user, long_log):
    client.force_login(member_user)
    response = client.get(f"/experiments/{long_log.pk}/log/download/?stream=process:worker-0")
    assert response["Content-Disposition"] == f'attachment; filename="{long_log.short_id}-process-worker-0.log"'
    text = b"".join(response.streaming_content).decode()
    assert text.startswith("line 0\nline 1\n") and text.count("\n") == 3001
    assert client.get(f"/experiments/{long_log.pk}/log/download/?stream=process:nope").status_code == 404
