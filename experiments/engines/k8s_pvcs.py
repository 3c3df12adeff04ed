"""A project's PVC records on its Kubernetes engine's cluster (SPEC §6): the claim is created in
the project's namespace when the record is, listed for its phase, and deleted with the record.
Plain functions of the engine's config and the namespace; `experiments/pvcs.py` wires them to
the records' signals.

No cluster can run on the machine this was written on: the tests drive these functions against
the fake API server of tests/k8s/ (claims of storage class "unbound" never bind there)."""

import copy
import json

from kubernetes import client as k8s
from kubernetes.client.rest import ApiException

from experiments.engines import k8s_objects
from experiments.engines.base import EngineError
from experiments.engines.kubernetes import KubernetesEngine, NotFoundError, _api_error, collection

# Besides the API's phases (Pending, Bound, Lost): a record whose claim is not on the cluster
# (deleted there by hand).
MISSING = "Missing"
# (connect, read) seconds for the phases a page shows.
PAGE_TIMEOUT = (3, 5)


def claim(
    *, name: str, namespace: str, project_id: str, size_mib: int, storage_class: str, access_mode: str, config: dict
) -> dict:
    labels = {k8s_objects.LABEL_PROJECT: k8s_objects.label_value(project_id), "app.kubernetes.io/managed-by": "aichor"}
    spec: dict = {"accessModes": [access_mode], "resources": {"requests": {"storage": f"{size_mib}Mi"}}}
    # Empty on the record: the engine's default class, else the cluster's own default.
    storage_class = storage_class or config.get("storage_class") or ""
    if storage_class:
        spec["storageClassName"] = storage_class
    meta = {"name": name, "namespace": namespace, "labels": labels}
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": meta, "spec": spec}


def create(config: dict, namespace: str, project_id: str, **record) -> dict:
    """Create the claim (and the project's namespace on first use); the created object."""
    engine = KubernetesEngine(config)
    obj = claim(namespace=namespace, project_id=project_id, config=config, **record)
    if engine._get("Namespace", namespace, namespace) is None:
        ns = k8s_objects.namespace_objects(namespace, project_id, None, config)[0]
        try:
            engine._call("POST", collection("Namespace", None), body=ns)
        except EngineError as exc:
            if "already exists" not in str(exc):  # a concurrent first use is no failure
                raise
    return engine._call("POST", collection("PersistentVolumeClaim", namespace), body=obj)


def delete(config: dict, namespace: str, name: str) -> bool:
    """Delete the claim; False when it was not there (nothing to do either way)."""
    engine = KubernetesEngine(config)
    try:
        engine._call("DELETE", f"{collection('PersistentVolumeClaim', namespace)}/{name}")
    except NotFoundError:
        return False
    return True


def phases(config: dict, namespace: str, project_id: str) -> dict[str, str]:
    """The phase of every claim of the project in its namespace, by name: one list call. A
    namespace not created yet has no claims (the list is empty, not an error)."""
    selector = f"{k8s_objects.LABEL_PROJECT}={k8s_objects.label_value(project_id)}"
    # A page view waits for this: a cluster that does not answer is said after seconds, not
    # after the engine's 30 s per request retried three times by urllib3.
    configuration = copy.deepcopy(KubernetesEngine(config).api.configuration)
    configuration.retries = 0
    try:
        with k8s.ApiClient(configuration) as api:
            response = api.call_api(
                collection("PersistentVolumeClaim", namespace),
                "GET",
                query_params=[("labelSelector", selector)],
                header_params={"Accept": "application/json"},
                auth_settings=["BearerToken"],
                _preload_content=False,
                _return_http_data_only=True,
                _request_timeout=PAGE_TIMEOUT,
            )
    except ApiException as exc:
        raise _api_error(exc) from None
    except Exception as exc:  # urllib3's connection errors and timeouts
        raise EngineError(f"cannot reach the Kubernetes API: {exc}") from None
    found = json.loads(response.data or b"null")
    return {
        item["metadata"]["name"]: (item.get("status") or {}).get("phase") or "Pending"
        for item in (found or {}).get("items", [])
    }
