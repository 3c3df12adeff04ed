"""The dashboard points of issue 15 through the test client: Resubmit on another engine, the
New experiment page (against a real Git repository), short ids in URLs, the error pages,
labelled status chips, the shared form rendering and the Datasets hints."""

import pytest
from django.test import RequestFactory
from django.views.defaults import server_error

from experiments import services
from experiments.models import Experiment, Status, StepName
from projects.models import Engine
from tests.experiments.test_views import as_user, finished, make_experiment
from tests.helpers import manifest_yaml

pytestmark = pytest.mark.django_db

MANIFEST = manifest_yaml("python train.py")


@pytest.fixture
def gpu_engine(project):
    engine = Engine.objects.create(name="gpu-docker", kind=Engine.Kind.DOCKER)
    project.engines.add(engine)
    return engine


# --- Resubmit on an engine of the user's choice ---------------------------------------------
def test_resubmit_offers_the_projects_engines_with_the_originals_chosen(client, member_user, project, gpu_engine):
    original = finished(project, Status.FAILED)
    client.force_login(member_user)
    html = client.get(f"/experiments/{original.pk}/").content.decode()
    form = html[html.index('<form class="resubmit"') :]
    form = form[: form.index("</form>")]
    assert '<option value="local" selected>local (local)</option>' in form
    assert '<option value="gpu-docker">gpu-docker (docker)</option>' in form


def test_resubmit_runs_on_the_chosen_engine(client, member_user, project, gpu_engine):
    original = finished(project)
    client.force_login(member_user)
    response = client.post(f"/experiments/{original.pk}/resubmit/", {"engine": "gpu-docker"})
    new = Experiment.objects.get(resubmitted_from=original)
    assert response["Location"] == f"/experiments/{new.pk}/"
    assert new.engine == gpu_engine and original.engine.name == "local"
    assert new.commit_sha == original.commit_sha and new.manifest_path == original.manifest_path


def test_resubmit_without_an_engine_keeps_the_originals(client, member_user, project, gpu_engine):
    original = finished(project)
    client.force_login(member_user)
    client.post(f"/experiments/{original.pk}/resubmit/")
    assert Experiment.objects.get(resubmitted_from=original).engine.name == "local"


def test_resubmit_on_an_engine_outside_the_project_is_refused(client, member_user, project):
    Engine.objects.create(name="elsewhere", kind=Engine.Kind.DOCKER)
    original = finished(project)
    client.force_login(member_user)
    response = client.post(f"/experiments/{original.pk}/resubmit/", {"engine": "elsewhere"}, follow=True)
    assert "engine elsewhere is not enabled for project vision" in response.content.decode()
    assert not Experiment.objects.filter(resubmitted_from=original).exists()


def test_resubmit_engine_is_a_service_parameter(project, gpu_engine, member_user):
    original = finished(project)
    new = services.resubmit_experiment(original, actor=member_user, engine=gpu_engine)
    assert new.engine == gpu_engine and new.resubmitted_from == original


# --- New experiment --------------------------------------------------------------------------
@pytest.fixture
def pushed(git_repo):
    """main: two commits (train.yaml, then eval.yaml and a root manifest); dev: one more."""
    first = git_repo.commit({"aichor_manifests/train.yaml": MANIFEST, "Dockerfile": "FROM scratch\n"}, "first")
    head = git_repo.commit({"aichor_manifests/eval.yaml": MANIFEST, "manifest.yaml": MANIFEST}, "second")
    git_repo._git("checkout", "-q", "-b", "dev")
    dev = git_repo.commit({"aichor_manifests/dev-only.yml": MANIFEST}, "on dev", branch="dev")
    git_repo._git("checkout", "-q", "main")
    return {"first": first, "head": head, "dev": dev}


@pytest.mark.parametrize("persona,status", [("admin_user", 200), ("member_user", 200), ("outsider_user", 404)])
def test_new_experiment_page_is_for_members_only(client, request, project, pushed, persona, status):
    response = as_user(client, request, persona).get("/p/vision/new/")
    assert response.status_code == status
    response = client.post("/p/vision/new/", {"branch": "main", "manifest_path": "aichor_manifests/train.yaml"})
    assert response.status_code == (404 if status == 404 else 302)


def test_new_experiment_anonymous_and_wrong_method(client, member_user, project):
    assert client.get("/p/vision/new/")["Location"].startswith("/login/")
    client.force_login(member_user)
    assert client.put("/p/vision/new/").status_code == 405


def test_list_has_a_new_experiment_button(client, member_user, project):
    client.force_login(member_user)
    assert 'href="/p/vision/new/">New experiment</a>' in client.get("/p/vision/").content.decode()


def test_new_experiment_preselects_the_default_branch_and_lists_its_manifests(client, member_user, project, pushed):
    client.force_login(member_user)
    html = client.get("/p/vision/new/").content.decode()
    assert '<option value="main" selected>main</option>' in html and '<option value="dev">dev</option>' in html
    manifests = html[html.index('id="manifest-field"') :]
    manifests = manifests[: manifests.index("</select>")]
    assert manifests.count("<option") == 3
    assert manifests.index('value="manifest.yaml"') < manifests.index('value="aichor_manifests/eval.yaml"')
    assert 'value="aichor_manifests/train.yaml"' in manifests and "dev-only" not in manifests
    assert '<option value="local" selected>local (local)</option>' in html
    # Choosing another branch lists its manifests.
    html = client.get("/p/vision/new/?branch=dev", headers={"HX-Request": "true"}).content.decode()
    assert 'value="aichor_manifests/dev-only.yml"' in html


def test_new_experiment_from_a_branch_runs_its_latest_commit(client, member_user, project, pushed, gpu_engine):
    client.force_login(member_user)
    response = client.post(
        "/p/vision/new/",
        {"branch": "main", "manifest_path": "aichor_manifests/eval.yaml", "engine": "gpu-docker", "message": "eval"},
    )
    experiment = Experiment.objects.get()
    assert response["Location"] == f"/experiments/{experiment.pk}/"
    assert (experiment.commit_sha, experiment.branch, experiment.manifest_path) == (
        pushed["head"],
        "main",
        "aichor_manifests/eval.yaml",
    )
    assert experiment.engine == gpu_engine and experiment.message == "eval"
    assert experiment.author == member_user and experiment.source == Experiment.Source.GIT
    assert experiment.status == Status.CREATED


def test_new_experiment_from_an_older_commit_by_its_short_sha(client, member_user, project, pushed):
    client.force_login(member_user)
    client.post(
        "/p/vision/new/",
        {"branch": "main", "commit": pushed["first"][:8].upper(), "manifest_path": "aichor_manifests/train.yaml"},
    )
    experiment = Experiment.objects.get()
    assert experiment.commit_sha == pushed["first"] and experiment.engine.name == "local"


@pytest.mark.parametrize(
    "commit,expected",
    [
        ("deadbeef", "commit deadbeef not found on branch main"),
        # On the repository, but not on that branch.
        ("DEV", "not found on branch main"),
    ],
)
def test_unknown_commit_is_refused_at_once_in_words(client, member_user, project, pushed, commit, expected):
    commit = pushed["dev"][:10] if commit == "DEV" else commit
    client.force_login(member_user)
    response = client.post(
        "/p/vision/new/", {"branch": "main", "commit": commit, "manifest_path": "aichor_manifests/train.yaml"}
    )
    html = response.content.decode()
    assert response.status_code == 400
    assert expected in html and "pathspec" not in html and "fatal" not in html
    assert not Experiment.objects.exists()


def test_new_experiment_refuses_a_manifest_the_commit_lacks(client, member_user, project, pushed):
    client.force_login(member_user)
    response = client.post(
        "/p/vision/new/", {"branch": "main", "commit": pushed["first"], "manifest_path": "aichor_manifests/eval.yaml"}
    )
    assert response.status_code == 400
    assert (
        f"manifest aichor_manifests/eval.yaml not found in commit {pushed['first'][:12]}" in response.content.decode()
    )
    response = client.post("/p/vision/new/", {"branch": "main", "manifest_path": "../etc/passwd.yaml"})
    assert response.status_code == 400 and "must be relative" in response.content.decode()
    assert not Experiment.objects.exists()


def test_new_experiment_says_when_the_repository_cannot_be_read(client, member_user, project, tmp_path):
    type(project).objects.filter(pk=project.pk).update(repo_clone_url=f"file://{tmp_path}/missing.git")
    client.force_login(member_user)
    response = client.get("/p/vision/new/")
    html = response.content.decode()
    assert response.status_code == 200
    assert "the repository cannot be read" in html and "Start experiment</button>" in html and " disabled>" in html


# --- short ids and error pages ---------------------------------------------------------------
def test_a_short_id_redirects_to_the_experiment(client, member_user, project):
    experiment = make_experiment(project)
    client.force_login(member_user)
    response = client.get(f"/experiments/{experiment.short_id}/")
    assert response.status_code == 302 and response["Location"] == f"/experiments/{experiment.pk}/"
    longer = str(experiment.pk)[:13].upper()
    assert client.get(f"/experiments/{longer}/")["Location"] == f"/experiments/{experiment.pk}/"


def test_short_ids_too_short_ambiguous_or_hidden_are_404_in_the_site_layout(
    client, member_user, outsider_user, project
):
    a = make_experiment(project)
    client.force_login(member_user)
    assert client.get(f"/experiments/{str(a.pk)[:7]}/").status_code == 404
    assert client.get("/experiments/not-hex-at-all/").status_code == 404
    client.force_login(outsider_user)
    response = client.get(f"/experiments/{a.short_id}/")
    html = response.content.decode()
    assert response.status_code == 404
    assert '<header class="topbar">' in html and "/static/aichor.css" in html and "<h1>Not found</h1>" in html


def test_an_id_prefix_shared_by_two_experiments_is_404(client, member_user, project):
    a = make_experiment(project)
    # Another id with the same first 8 characters.
    pk = str(a.pk)
    twin = pk[:9] + ("0" if pk[9] != "0" else "1") + pk[10:]
    Experiment.objects.create(id=twin, project=project, engine=project.default_engine, manifest_path="m.yaml")
    client.force_login(member_user)
    response = client.get(f"/experiments/{a.short_id}/")
    assert response.status_code == 404 and "More than one experiment id starts with" in response.content.decode()


def test_unknown_urls_get_the_site_layout(client, member_user, project):
    client.force_login(member_user)
    response = client.get("/no/such/page/")
    html = response.content.decode()
    assert response.status_code == 404 and '<header class="topbar">' in html and "Resolver404" not in html
    assert "member@example.com" in html  # the account part of the top bar


def test_the_500_page_uses_the_site_layout_without_a_request_context():
    response = server_error(RequestFactory().get("/"))
    html = response.content.decode()
    assert response.status_code == 500
    assert '<header class="topbar">' in html and "/static/aichor.css" in html
    assert "Something went wrong on the server" in html


# --- labelled chips ----------------------------------------------------------------------------
def test_chips_say_status_and_step_and_the_step_wears_its_own_status(client, member_user, project):
    experiment = make_experiment(project)
    services.begin_step(experiment.pk, StepName.CLONING)
    services.cancel_experiment(experiment)
    experiment.refresh_from_db()
    step = experiment.steps.get(name=experiment.current_step)
    client.force_login(member_user)
    for html in (
        client.get("/p/vision/").content.decode(),
        client.get(f"/experiments/{experiment.pk}/").content.decode(),
    ):
        assert "Status: Cancelled</span>" in html
        assert f'class="badge badge-{step.status.lower()} badge-step" data-chip="step"' in html
        assert f"Step: {experiment.current_step}</span>" in html


# --- one form rendering ----------------------------------------------------------------------
def test_forms_render_through_the_site_templates_with_the_checkbox_in_its_label(client, member_user, project):
    client.force_login(member_user)
    html = client.get("/p/vision/variables/").content.decode()
    sensitive = html[html.index('<div class="field field-checkbox">') :]
    label = sensitive.index('<label class="check" for="id_sensitive">')
    assert (
        label < sensitive.index('name="sensitive"') < sensitive.index("</label>") < sensitive.index('class="helptext"')
    )
    assert '<div class="field field-text">' in html
    tokens = client.get("/account/tokens/").content.decode()
    assert 'class="field field-' in tokens


# --- Datasets hints ----------------------------------------------------------------------------
def test_empty_buckets_speak_of_their_own_use_and_folders_have_an_svg_icon(client, member_user, project):
    client.force_login(member_user)
    inputs = client.get("/p/vision/datasets/?bucket=inputs").content.decode()
    assert "Upload your data below: experiments read this bucket at <code>$AICHOR_INPUT_PATH</code>" in inputs
    assert "AICHOR_OUTPUT_PATH" not in inputs.split('class="ds-empty"')[1].split("</td>")[0]
    outputs = client.get("/p/vision/datasets/?bucket=outputs").content.decode()
    assert "Experiments write their results here" in outputs.split('class="ds-empty"')[1]
    client.post("/p/vision/datasets/folders/", {"bucket": "inputs", "prefix": "", "name": "data"})
    listing = client.get("/p/vision/datasets/?bucket=inputs").content.decode()
    folder = listing[listing.index('class="ds-folder"') :]
    assert folder.index('<svg class="ds-icon"') < folder.index("data/</a>") and "📁" not in listing
