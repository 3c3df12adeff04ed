"""PVC records: project admins only; name rule, size > 0, a Kubernetes engine of the project."""

import pytest

from experiments.manifest import ManifestError, parse_manifest
from experiments.manifest.types import PvcMount
from projects.models import Engine, PersistentVolumeClaim
from tests.helpers import manifest_yaml
from tests.k8s.conftest import fake_k8s, fake_k8s_server, kubeconfig  # noqa: F401 (fixtures)

URL = "/p/vision/pvcs/"


@pytest.fixture
def k8s(project, kubeconfig):  # noqa: F811
    # A record is a claim on the cluster (tests/projects/test_pvcs_cluster.py): the fake one.
    engine = Engine.objects.create(name="cluster", kind=Engine.Kind.KUBERNETES, config={"kubeconfig": str(kubeconfig)})
    project.engines.add(engine)
    return engine


def form(engine, **overrides):
    data = {"name": "datasets-cache", "size_mib": "2048", "engine": engine.pk, "storage_class": "standard-rwo",
            "access_mode": "ReadWriteOnce"}  # fmt: skip
    data.update(overrides)
    return data


def test_admin_creates_lists_and_deletes_a_pvc(client, admin_user, project, k8s):
    client.force_login(admin_user)
    response = client.post(URL, form(k8s))
    assert response.status_code == 302
    page = client.get(URL).content.decode()
    assert "datasets-cache" in page and "2048 MiB" in page and "standard-rwo" in page
    pvc = PersistentVolumeClaim.objects.get(project=project)
    assert client.post(f"{URL}{pvc.pk}/delete/").status_code == 302
    assert not PersistentVolumeClaim.objects.exists()


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"name": "Bad_Name"}, "name"),
        ({"name": "-lead"}, "name"),
        ({"name": "x" * 65}, "name"),
        ({"size_mib": "0"}, "size_mib"),
        ({"size_mib": "-5"}, "size_mib"),
        ({"access_mode": "ReadWriteSometimes"}, "access_mode"),
    ],
)
def test_invalid_pvcs_are_refused_with_the_reason(client, admin_user, project, k8s, overrides, field):
    client.force_login(admin_user)
    response = client.post(URL, form(k8s, **overrides))
    assert response.status_code == 400
    assert field in response.context["form"].errors
    assert not PersistentVolumeClaim.objects.exists()


def test_engine_must_be_a_kubernetes_engine_of_the_project(client, admin_user, project, k8s, local_engine):
    client.force_login(admin_user)
    other_cluster = Engine.objects.create(name="elsewhere", kind=Engine.Kind.KUBERNETES)
    for engine in (local_engine, other_cluster):
        response = client.post(URL, {**form(k8s), "engine": engine.pk})
        assert response.status_code == 400 and "engine" in response.context["form"].errors


def test_duplicate_name_is_refused(client, admin_user, project, k8s):
    client.force_login(admin_user)
    client.post(URL, form(k8s))
    response = client.post(URL, form(k8s))
    assert response.status_code == 400 and "already" in str(response.context["form"].errors["name"])


def test_member_outsider_get_404_and_anonymous_logs_in(client, member_user, outsider_user, project, k8s):
    pvc = PersistentVolumeClaim.objects.create(project=project, engine=k8s, name="keep", size_mib=1)
    response = client.get(URL)
    assert response.status_code == 302 and "/login/" in response["Location"]
    for user in (member_user, outsider_user):
        client.force_login(user)
        assert client.get(URL).status_code == 404
        assert client.post(URL, form(k8s, name="other")).status_code == 404
        assert client.post(f"{URL}{pvc.pk}/delete/").status_code == 404
    assert list(PersistentVolumeClaim.objects.values_list("name", flat=True)) == ["keep"]


def test_wrong_methods_get_405(client, admin_user, project, k8s):
    client.force_login(admin_user)
    assert client.delete(URL).status_code == 405
    assert client.get(f"{URL}1/delete/").status_code == 405


def test_manifest_knows_the_pvcs(project, k8s):
    PersistentVolumeClaim.objects.create(project=project, engine=k8s, name="cache", size_mib=10)
    spec = "  storage:\n    attachExistingPVCs:\n      - name: cache\n        mountPoint: /cache\n"
    known = set(project.pvcs.values_list("name", flat=True))
    manifest = parse_manifest(manifest_yaml("true", extra_spec=spec), known_pvcs=known)
    assert manifest.spec.storage.pvcs == [PvcMount("cache", "/cache")]
    with pytest.raises(ManifestError):
        parse_manifest(manifest_yaml("true", extra_spec=spec.replace("cache\n", "missing\n", 1)), known_pvcs=known)
