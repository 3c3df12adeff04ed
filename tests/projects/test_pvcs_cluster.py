"""PVC records are claims on their engine's cluster: creating a record creates the claim in the
project's namespace, the page shows its phase read live (one list call), deleting the record
deletes the claim, refused while an experiment that has not ended mounts it. No cluster can run
here: the cluster is the fake API server of tests/k8s/ (it binds every claim at once but those
of storage class "unbound"), reached through the official `kubernetes` client."""

import re
import socket
import time

import pytest
import yaml
from kubernetes import client as k8s
from kubernetes.client.rest import ApiException

from experiments.manifest import parse_manifest
from experiments.models import Experiment, Status
from experiments.services import create_experiment
from projects.models import Engine, PersistentVolumeClaim
from tests.experiments.test_pipeline_kubernetes import k8s_project, registry  # noqa: F401 (fixtures)
from tests.helpers import manifest_yaml, wait_for
from tests.k8s.conftest import fake_k8s, fake_k8s_server, kube_api, kubeconfig  # noqa: F401 (fixtures)

pytestmark = pytest.mark.docker
URL = "/p/vision/pvcs/"


@pytest.fixture
def cluster(project, kubeconfig):  # noqa: F811
    engine = Engine.objects.create(name="cluster", kind=Engine.Kind.KUBERNETES, config={"kubeconfig": str(kubeconfig)})
    project.engines.add(engine)
    return engine


@pytest.fixture
def core(kube_api):  # noqa: F811
    return k8s.CoreV1Api(kube_api)


def form(engine, **overrides) -> dict:
    data = {"name": "datasets-cache", "size_mib": "2048", "engine": engine.pk, "storage_class": "standard-rwo",
            "access_mode": "ReadWriteMany"}  # fmt: skip
    return {**data, **overrides}


def phases(page: str) -> dict[str, str]:
    """The Phase column, by claim name."""
    rows = re.findall(r"<td><code>([^<]+)</code></td>.*?data-phase=\"([^\"]*)\"", page, re.S)
    return dict(rows)


def claim_on_cluster(core, project, name: str):
    try:
        return core.read_namespaced_persistent_volume_claim(name, project.namespace)
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise


def kubeconfig_for(port: int) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "c", "cluster": {"server": f"http://127.0.0.1:{port}"}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}],
        "current-context": "c",
    }


@pytest.fixture
def gone(project, tmp_path) -> Engine:
    """An engine whose API server refuses connections (a port nothing listens on)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = tmp_path / "gone-kubeconfig"
    path.write_text(yaml.safe_dump(kubeconfig_for(port)))
    engine = Engine.objects.create(name="gone", kind=Engine.Kind.KUBERNETES, config={"kubeconfig": str(path)})
    project.engines.add(engine)
    return engine


def test_creating_a_record_creates_the_claim_in_the_project_namespace(client, admin_user, project, cluster, core):
    client.force_login(admin_user)
    assert client.post(URL, form(cluster)).status_code == 302
    claim = claim_on_cluster(core, project, "datasets-cache")
    assert claim is not None
    assert claim.spec.resources.requests == {"storage": "2048Mi"}
    assert claim.spec.storage_class_name == "standard-rwo"
    assert claim.spec.access_modes == ["ReadWriteMany"]
    assert claim.metadata.labels["aichor.io/project"] == str(project.pk)
    # The namespace was made on first use, with aichor's labels.
    namespace = core.read_namespace(project.namespace)
    assert namespace.metadata.labels["aichor.io/project"] == str(project.pk)


def test_an_empty_storage_class_takes_the_engines_default(client, admin_user, project, cluster, core):
    cluster.config = {**cluster.config, "storage_class": "fast-ssd"}
    cluster.save()
    client.force_login(admin_user)
    assert client.post(URL, form(cluster, storage_class="", access_mode="ReadWriteOnce")).status_code == 302
    claim = claim_on_cluster(core, project, "datasets-cache")
    assert claim.spec.storage_class_name == "fast-ssd" and claim.spec.access_modes == ["ReadWriteOnce"]


def test_page_shows_each_claims_phase_from_one_list_call(client, admin_user, project, cluster, fake_k8s):  # noqa: F811
    client.force_login(admin_user)
    client.post(URL, form(cluster, name="bound-one"))
    client.post(URL, form(cluster, name="never-bound", storage_class="unbound"))
    wait_for(lambda: phases(client.get(URL).content.decode()).get("bound-one") == "Bound", message="the claim bound")
    fake_k8s.request_log.clear()
    page = client.get(URL).content.decode()
    assert phases(page) == {"bound-one": "Bound", "never-bound": "Pending"}
    assert [(method, path) for method, path, _ in fake_k8s.request_log] == [
        ("GET", f"/api/v1/namespaces/{project.namespace}/persistentvolumeclaims")
    ]


def test_a_claim_deleted_on_the_cluster_shows_missing(client, admin_user, project, cluster, core):
    client.force_login(admin_user)
    client.post(URL, form(cluster))
    core.delete_namespaced_persistent_volume_claim("datasets-cache", project.namespace)
    assert phases(client.get(URL).content.decode()) == {"datasets-cache": "Missing"}


def test_deleting_a_record_deletes_the_claim(client, admin_user, project, cluster, core):
    client.force_login(admin_user)
    client.post(URL, form(cluster))
    pvc = PersistentVolumeClaim.objects.get(project=project)
    assert client.post(f"{URL}{pvc.pk}/delete/").status_code == 302
    assert not PersistentVolumeClaim.objects.exists()
    assert claim_on_cluster(core, project, "datasets-cache") is None


def mounting_experiment(project, engine, claim: str, status: str) -> Experiment:
    """An experiment whose validated manifest attaches `claim`, in `status`."""
    experiment = create_experiment(project=project, engine=engine, manifest_path="manifest.yaml")
    spec = f"  storage:\n    attachExistingPVCs:\n      - name: {claim}\n        mountPoint: /data\n"
    manifest = parse_manifest(manifest_yaml("sleep 600", extra_spec=spec), known_pvcs={claim})
    Experiment.objects.filter(pk=experiment.pk).update(manifest=manifest.to_dict(), status=status)
    return experiment


def test_deleting_is_refused_while_a_running_experiment_mounts_the_claim(client, admin_user, project, cluster, core):
    client.force_login(admin_user)
    client.post(URL, form(cluster))
    client.post(URL, form(cluster, name="unused"))
    running = mounting_experiment(project, cluster, "datasets-cache", Status.PROCESSING)
    mounting_experiment(project, cluster, "datasets-cache", Status.SUCCEEDED)  # ended: no hold
    pvc = PersistentVolumeClaim.objects.get(project=project, name="datasets-cache")

    response = client.post(f"{URL}{pvc.pk}/delete/", follow=True)
    page = response.content.decode()
    assert "mounted by 1 running experiment" in page and str(running.pk)[:8] in page
    assert PersistentVolumeClaim.objects.filter(pk=pvc.pk).exists()
    assert claim_on_cluster(core, project, "datasets-cache") is not None
    # Another claim of the project is free to go meanwhile.
    unused = PersistentVolumeClaim.objects.get(project=project, name="unused")
    client.post(f"{URL}{unused.pk}/delete/")
    assert claim_on_cluster(core, project, "unused") is None

    Experiment.objects.filter(pk=running.pk).update(status=Status.CANCELLED)
    client.post(f"{URL}{pvc.pk}/delete/")
    assert not PersistentVolumeClaim.objects.filter(pk=pvc.pk).exists()
    assert claim_on_cluster(core, project, "datasets-cache") is None


def test_the_cluster_refusing_the_claim_leaves_no_record(client, admin_user, project, cluster, core):
    # A claim of that name already in the namespace (its record went behind aichor's back):
    # the API server answers 409.
    client.force_login(admin_user)
    client.post(URL, form(cluster))
    PersistentVolumeClaim.objects.all().delete()
    response = client.post(URL, form(cluster))
    assert response.status_code == 400
    assert "not created on cluster" in response.content.decode() and "already exists" in response.content.decode()
    assert not PersistentVolumeClaim.objects.exists()


def test_an_unreachable_cluster_is_said_and_nothing_is_lost(client, admin_user, project, cluster, gone):
    client.force_login(admin_user)
    client.post(URL, form(cluster, name="reachable"))
    response = client.post(URL, form(gone, name="nowhere"))
    assert response.status_code == 400 and "not created on gone" in response.content.decode()
    assert not PersistentVolumeClaim.objects.filter(name="nowhere").exists()

    stranded = PersistentVolumeClaim.objects.create(project=project, engine=gone, name="stranded", size_mib=1)
    response = client.get(URL)
    page = response.content.decode()
    assert response.status_code == 200
    assert phases(page)["stranded"] == "cluster unreachable" and "Cluster unreachable" in page
    assert phases(page)["reachable"] in ("Pending", "Bound")  # the other cluster still answers
    # Deleting the record would forget a claim that may still hold storage: refused, said.
    page = client.post(f"{URL}{stranded.pk}/delete/", follow=True).content.decode()
    assert "was not deleted on gone" in page
    assert PersistentVolumeClaim.objects.filter(pk=stranded.pk).exists()


def test_a_silent_cluster_is_said_unreachable_within_seconds(client, admin_user, project, tmp_path):
    # An API server that takes the connection and never answers (nothing accepts it).
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        path = tmp_path / "silent-kubeconfig"
        path.write_text(yaml.safe_dump(kubeconfig_for(silent.getsockname()[1])))
        engine = Engine.objects.create(name="silent", kind=Engine.Kind.KUBERNETES, config={"kubeconfig": str(path)})
        project.engines.add(engine)
        PersistentVolumeClaim.objects.create(project=project, engine=engine, name="quiet", size_mib=1)
        client.force_login(admin_user)
        started = time.monotonic()
        page = client.get(URL).content.decode()
        assert time.monotonic() - started < 15
    assert phases(page) == {"quiet": "cluster unreachable"} and "Cluster unreachable" in page


def test_member_and_outsider_get_404_and_the_claim_stays(
    client, admin_user, member_user, outsider_user, project, cluster, core
):
    client.force_login(admin_user)
    client.post(URL, form(cluster))
    pvc = PersistentVolumeClaim.objects.get(project=project)
    for user in (member_user, outsider_user):
        client.force_login(user)
        assert client.get(URL).status_code == 404
        assert client.post(f"{URL}{pvc.pk}/delete/").status_code == 404
        assert client.post(URL, form(cluster, name="theirs")).status_code == 404
    assert claim_on_cluster(core, project, "datasets-cache") is not None
    assert claim_on_cluster(core, project, "theirs") is None


def test_posts_without_the_csrf_token_are_refused(admin_user, project, cluster, core):
    from django.test import Client

    strict = Client(enforce_csrf_checks=True)
    strict.force_login(admin_user)
    assert strict.post(URL, form(cluster)).status_code == 403
    assert claim_on_cluster(core, project, "datasets-cache") is None
    pvc = PersistentVolumeClaim.objects.create(project=project, engine=cluster, name="kept", size_mib=1)
    assert strict.post(f"{URL}{pvc.pk}/delete/").status_code == 403
    assert PersistentVolumeClaim.objects.filter(pk=pvc.pk).exists()


@pytest.mark.django_db(transaction=True)
def test_a_pushed_experiment_mounts_the_claim_and_holds_its_deletion(
    client,
    admin_user,
    k8s_project,  # noqa: F811
    git_repo,
    celery_worker_thread,
    core,
):
    """End to end: the claim the page made is mounted by a real run, whose pod writes to it;
    the record cannot go while it runs, and goes with its claim once the run is cancelled."""
    from experiments import logs
    from experiments.services import cancel_experiment
    from tests.helpers import ended, push

    url = f"/p/{k8s_project.slug}/pvcs/"
    client.force_login(admin_user)
    assert client.post(url, form(k8s_project.default_engine, storage_class="standard")).status_code == 302
    spec = "  storage:\n    attachExistingPVCs:\n      - name: datasets-cache\n        mountPoint: /data\n"
    command = "echo kept > /data/marker && cat /data/marker && sleep 300"
    experiment_id = push(client, k8s_project, git_repo, command, extra_spec=spec)
    wait_for(
        lambda: logs.log_text(experiment_id, "process:worker-0").strip() == "kept",
        timeout=180,
        message="the pod to write to the claim",
    )
    pvc = PersistentVolumeClaim.objects.get(project=k8s_project)
    page = client.post(f"{url}{pvc.pk}/delete/", follow=True).content.decode()
    assert "mounted by 1 running experiment" in page
    assert claim_on_cluster(core, k8s_project, "datasets-cache") is not None

    cancel_experiment(Experiment.objects.get(pk=experiment_id), actor=None)
    assert ended(experiment_id, timeout=90).status == Status.CANCELLED
    client.post(f"{url}{pvc.pk}/delete/")
    assert not PersistentVolumeClaim.objects.exists()
    assert claim_on_cluster(core, k8s_project, "datasets-cache") is None
