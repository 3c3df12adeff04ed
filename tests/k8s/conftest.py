"""The fake Kubernetes cluster (no cluster can run here): one API server per test session on a
random port of 127.0.0.1, emptied before and after each test. Tests elsewhere can import these
fixtures (`from tests.k8s.conftest import fake_k8s, fake_k8s_server, kubeconfig`).

Knobs a test may turn on `fake_k8s` (reset restores them): `kubelet.node_labels` (a pod whose
nodeSelector they miss stays Pending), `kubelet.capacity` (`nvidia.com/gpu` etc., 0 by default);
PVCs of storage class `kubelet.UNBOUND_CLASS` ("unbound") never bind. `request_log` lists the
API calls (method, path, query) since the last reset."""

import pytest

from tests.k8s.fake_api import FakeCluster


@pytest.fixture(scope="session")
def fake_k8s_server(docker_client):
    cluster = FakeCluster(docker_client)
    yield cluster
    cluster.close()


@pytest.fixture
def fake_k8s(fake_k8s_server):
    """The cluster, empty but for the default namespaces; every pod's container goes after."""
    fake_k8s_server.reset()
    yield fake_k8s_server
    fake_k8s_server.reset()


@pytest.fixture
def kubeconfig(fake_k8s, tmp_path):
    return fake_k8s.write_kubeconfig(tmp_path / "kubeconfig")


@pytest.fixture
def kube_api(kubeconfig):
    """An ApiClient of the official `kubernetes` client, configured from the kubeconfig file."""
    from kubernetes import config

    api = config.new_client_from_config(str(kubeconfig))
    yield api
    api.close()
