"""The Kubernetes engine (SPEC §1, §9): a workload becomes the objects `k8s_objects.render`
returns, created in the project's namespace through the official `kubernetes` client; its
processes are the pods the operators make of them.

No cluster can run on the machine this was written on: the test suite drives this module
against a fake API server (tests/k8s/) that validates every object against the real schemas
and runs pods as Docker containers. Nothing here knows it is fake.

Images are built by a Docker Engine (the server's, or `docker_host`), pushed to the engine's
`registry`, and run by digest, so every node runs exactly the image that was built.

A handle holds the namespace, the top object's path and the expected processes; pods are
matched to processes by their labels (`process_names`). The watcher's `states()` reads one
watch of the pods labelled with an experiment id, across namespaces (`_PodWatch`: a LIST, then
a WATCH on a thread), so a poll costs no request whatever the number of experiments; while the
watch is down it is one labelled list.

Logs have a [second, taken] cursor (the API's sinceTime counts whole seconds). The watcher's
follow() reads each running pod's log through one followed request (`follow=true`, read on a
thread, `_LogStream`): one call per process for its whole run, however often it is visited; a
stream the kubelet ended with the log, read to its end, makes the final read free. Waiting pods
are skipped; past MAX_LOG_STREAMS open streams, processes are polled, quiet ones less and less
often; stream opens and polls stay within LOG_READS_PER_SECOND for the whole process (engine
setting `log_reads_per_second`). cancel() reads what the pods printed since the last read before it
deletes them (a deleted pod's logs go with it), for the caller's final read.

Debug hold: the failed run's objects stay as they are until the hold's release deletes them."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from datetime import UTC, datetime

from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes.client.rest import ApiException
from kubernetes.stream import portforward as k8s_portforward
from kubernetes.stream import stream as k8s_stream
from kubernetes.watch.watch import iter_resp_lines
from websocket import WebSocketException

from experiments.engines import k8s_objects
from experiments.engines.base import Cancelled, Engine, EngineError, ExecSession, ProcessInfo, ProcessState
from experiments.engines.docker import DockerEngine
from experiments.workload import Workload

# Collection paths of the top objects, by kind.
KINDS = {
    "Job": "/apis/batch/v1",
    "JobSet": "/apis/jobset.x-k8s.io/v1alpha2",
    "PyTorchJob": "/apis/kubeflow.org/v1",
    "XGBoostJob": "/apis/kubeflow.org/v1",
    "TFJob": "/apis/kubeflow.org/v1",
    "RayJob": "/apis/ray.io/v1",
    "PersistentVolumeClaim": "/api/v1",
    "Secret": "/api/v1",
    "Namespace": "/api/v1",
}
TOP_KINDS = ("Job", "JobSet", "PyTorchJob", "XGBoostJob", "TFJob", "RayJob")
# A read's share of a log: a burst is read in several calls, never held whole.
LOG_BUDGET_BYTES = 1 << 20
# How long cancel waits for the pods to go (foreground deletion): a terminal state means an
# empty namespace, but a stuck finalizer must not hold a worker forever.
DELETE_WAIT_SECONDS = 60.0
# How long states() waits for the pod watch's first list, rather than list beside it.
WATCH_READY_SECONDS = 5.0
_CALLS = threading.local()
log = logging.getLogger(__name__)
PROCESSES_ANNOTATION = "aichor.io/processes"


def _plural(kind: str) -> str:
    return {"PersistentVolumeClaim": "persistentvolumeclaims"}.get(kind, kind.lower() + "s")


def collection(kind: str, namespace: str | None) -> str:
    base = KINDS[kind]
    if kind == "Namespace":
        return f"{base}/namespaces"
    return f"{base}/namespaces/{namespace}/{_plural(kind)}" if namespace else f"{base}/{_plural(kind)}"


def process_names(labels: dict) -> list[str]:
    """The names the process a pod runs may have, most specific first, from the labels its
    operator and aichor put on it: the names the single-host engines give (worker-0, master-0,
    <group>-<job>-<completion>, head, submitter). Ray worker pods are numbered by the caller
    (their names are random)."""
    if "ray.io/node-type" in labels:
        return ["head"] if labels["ray.io/node-type"] == "head" else []
    if labels.get("ray.io/originated-from-crd") == "RayJob":
        return ["submitter"]
    if "training.kubeflow.org/replica-type" in labels:
        replica_type = labels["training.kubeflow.org/replica-type"]
        index = int(labels.get("training.kubeflow.org/replica-index", "0"))
        if (
            labels.get(k8s_objects.LABEL_GROUP) == "worker"
            and labels.get("training.kubeflow.org/operator-name") == "xgboostjob-controller"
        ):
            # The 0.2.3 `worker` form of an XGBoostJob: its worker 0 is the Master replica.
            return [f"worker-{0 if replica_type == 'master' else index + 1}"]
        return [f"{replica_type}-{index}"]
    group = labels.get(k8s_objects.LABEL_GROUP, "")
    if "jobset.sigs.k8s.io/job-index" in labels:
        job = labels["jobset.sigs.k8s.io/job-index"]
        completion = labels.get("batch.kubernetes.io/job-completion-index", "0")
        # A jax JobSet's jobs are its processes: worker-<job>.
        return [f"{group}-{job}-{completion}", f"worker-{job}"]
    return [f"{group.lower()}-0"] if group else []


def expected_processes(workload: Workload) -> list[list]:
    """[name, role, decisive] of every process the objects will have, as the single-host plan
    names them."""
    from experiments.engines.single_host import plan_processes

    planned = plan_processes(workload, host="127.0.0.1", ports=[0, 0])
    return [[p.name, p.role, p.decisive] for p in planned]


class KubernetesEngine(Engine):
    kind = "kubernetes"
    holds_back_completions = True

    def __init__(self, config: dict | None = None) -> None:
        super().__init__(config)
        self._api: k8s.ApiClient | None = None

    # --- connection -----------------------------------------------------------------------
    @property
    def api(self) -> k8s.ApiClient:
        if self._api is None:
            self._api = k8s.ApiClient(self._configuration())
        return self._api

    def _configuration(self) -> k8s.Configuration:
        configuration = k8s.Configuration()
        try:
            if self.config.get("in_cluster"):
                k8s_config.load_incluster_config(client_configuration=configuration)
            else:
                k8s_config.load_kube_config(
                    config_file=self.config.get("kubeconfig") or None,
                    context=self.config.get("context") or None,
                    client_configuration=configuration,
                )
        except (k8s_config.ConfigException, OSError) as exc:
            raise EngineError(f"cannot load the cluster's configuration: {exc}") from None
        return configuration

    def _call(self, method: str, path: str, *, body=None, query: dict | None = None, raw: bool = False):
        _CALLS.count = getattr(_CALLS, "count", 0) + 1
        try:
            response = self.api.call_api(
                path,
                method,
                query_params=list((query or {}).items()),
                header_params={"Content-Type": "application/json", "Accept": "application/json"},
                body=body,
                auth_settings=["BearerToken"],
                _preload_content=False,
                _return_http_data_only=True,
                _request_timeout=30,
            )
        except ApiException as exc:
            raise _api_error(exc) from None
        except Exception as exc:  # urllib3's connection errors: the cluster is unreachable
            raise EngineError(f"cannot reach the Kubernetes API: {exc}") from None
        data = response.data
        return data if raw else json.loads(data or b"null")

    def calls(self) -> int:
        return getattr(_CALLS, "count", 0)

    # --- build ---------------------------------------------------------------------------
    def _docker(self) -> DockerEngine:
        return DockerEngine(
            {"docker_host": self.config.get("docker_host"), "network": self.config.get("build_network")}
        )

    def _registry(self) -> str:
        registry = (self.config.get("registry") or "").rstrip("/")
        if not registry:
            raise EngineError("the Kubernetes engine has no `registry` to push images to: set it in its config")
        return registry

    def build(self, *, context_dir, dockerfile, tag, build_args, target, secrets, log, cancelled) -> str:
        registry = self._registry()
        docker = self._docker()
        built = docker.build(
            context_dir=context_dir,
            dockerfile=dockerfile,
            tag=tag,
            build_args=build_args,
            target=target,
            secrets=secrets,
            log=log,
            cancelled=cancelled,
        )
        repository, _, version = built.rpartition(":")
        remote = f"{registry}/{repository}"
        docker.client.api.tag(built, remote, version)
        log(f"pushing {remote}:{version}\n")
        digest = None
        for chunk in docker.client.api.push(remote, tag=version, stream=True, decode=True):
            if "error" in chunk:
                raise EngineError(f"push to {registry} failed: {chunk['error']}")
            digest = chunk.get("aux", {}).get("Digest") or digest
        if not digest:
            raise EngineError(f"push to {registry} did not return a digest")
        log(f"pushed {remote}@{digest}\n")
        return f"{remote}@{digest}"

    def image_exists(self, image: str) -> bool:
        """Whether the registry has `image` (a reference by digest this engine pushed)."""
        registry = self._registry()
        if not image.startswith(registry + "/") or "@" not in image:
            return False
        try:
            return bool(self._docker().client.api.inspect_distribution(image))
        except Exception:
            return False

    # --- submit --------------------------------------------------------------------------
    def warnings_for(self, workload: Workload) -> list[str]:
        return k8s_objects.render_warnings(workload, self.config)

    def submit(self, workload: Workload, *, log, cancelled=lambda: False) -> dict:
        namespace = workload.namespace
        self._ensure_namespace(workload)
        objects = k8s_objects.render(
            workload,
            namespace=namespace,
            image=workload.image,
            experiment_id=workload.experiment_id,
            config=self.config,
        )
        top = objects[0]
        processes = expected_processes(workload)
        # find() rebuilds the handle from the top object after a crash.
        top["metadata"].setdefault("annotations", {})[PROCESSES_ANNOTATION] = json.dumps(processes)
        handle = {
            "namespace": namespace,
            "kind": top["kind"],
            "name": top["metadata"]["name"],
            "processes": processes,
            "experiment_id": workload.experiment_id,
        }
        existing = self._get(top["kind"], namespace, handle["name"])
        if existing is None:
            created = self._call("POST", collection(top["kind"], namespace), body=top)
            log(f"created {top['kind']} {namespace}/{handle['name']}\n")
        else:
            created = existing  # a retried submit: the objects exist already
        for child in k8s_objects.owned_by(objects[1:], created["metadata"]["uid"]):
            if cancelled():
                self.cancel(handle)
                raise Cancelled()
            try:
                self._call("POST", collection(child["kind"], namespace), body=child)
            except EngineError as exc:
                if "already exists" not in str(exc):
                    self.cancel(handle)
                    raise
            log(f"created {child['kind']} {namespace}/{child['metadata']['name']}\n")
        return handle

    def _ensure_namespace(self, workload: Workload) -> None:
        s3 = {key: workload.env[key] for key in k8s_objects.S3_SECRET_KEYS if key in workload.env}
        for obj in k8s_objects.namespace_objects(workload.namespace, workload.project_id, s3 or None, self.config):
            kind, name = obj["kind"], obj["metadata"]["name"]
            path = collection(kind, None if kind == "Namespace" else workload.namespace)
            if self._get(kind, workload.namespace, name) is None:
                try:
                    self._call("POST", path, body=obj)
                except EngineError as exc:
                    if "already exists" not in str(exc):
                        raise
            elif kind == "Secret":
                # Keys rotate: the Secret follows the platform's current credentials.
                self._call("PUT", f"{path}/{name}", body=obj)

    def _get(self, kind: str, namespace: str, name: str) -> dict | None:
        path = collection(kind, None if kind == "Namespace" else namespace)
        try:
            return self._call("GET", f"{path}/{name}")
        except NotFoundError:
            return None

    # --- processes and state ---------------------------------------------------------------
    def processes(self, handle: dict) -> list[ProcessInfo]:
        return [
            ProcessInfo(name, role, bool(decisive), f"pod in {handle['namespace']}")
            for name, role, decisive in handle.get("processes", [])
        ]

    def find(self, experiment_id: str) -> dict | None:
        selector = f"{k8s_objects.LABEL_EXPERIMENT}={experiment_id}"
        for kind in TOP_KINDS:
            found = self._call("GET", collection(kind, None), query={"labelSelector": selector})
            for item in found.get("items", []):
                return {
                    "namespace": item["metadata"]["namespace"],
                    "kind": kind,
                    "name": item["metadata"]["name"],
                    "processes": json.loads(item["metadata"].get("annotations", {}).get(PROCESSES_ANNOTATION, "[]")),
                    "experiment_id": experiment_id,
                }
        return None

    def _pods(self, selector: str, namespace: str | None = None) -> list[dict]:
        path = f"/api/v1/namespaces/{namespace}/pods" if namespace else "/api/v1/pods"
        return self._call("GET", path, query={"labelSelector": selector}).get("items", [])

    def states(self, handles: dict[str, dict]) -> dict[str, list[ProcessState]]:
        """From the engine's pod watch (one LIST, then one long WATCH of the labelled pods on a
        thread): no request per interval while it is live; one labelled list when it is not."""
        if not handles:
            return {}
        watch = _PodWatch.of(self)
        pods = watch.pods(wait=WATCH_READY_SECONDS) if watch else None
        if pods is None:
            pods = self._pods(k8s_objects.LABEL_EXPERIMENT)
        else:
            _CALLS.count = getattr(_CALLS, "count", 0) + watch.take_opened()
        by_experiment: dict[str, list[dict]] = {}
        for pod in pods:
            by_experiment.setdefault(pod["metadata"]["labels"].get(k8s_objects.LABEL_EXPERIMENT, ""), []).append(pod)
        return {
            experiment_id: self._states_of(handle, by_experiment.get(k8s_objects.label_value(str(experiment_id)), []))
            for experiment_id, handle in handles.items()
        }

    def status(self, handle: dict) -> list[ProcessState]:
        experiment = self._experiment_label(handle)
        return self._states_of(handle, self._pods(f"{k8s_objects.LABEL_EXPERIMENT}={experiment}", handle["namespace"]))

    def _experiment_label(self, handle: dict) -> str:
        return k8s_objects.label_value(handle.get("experiment_id", ""))

    def _states_of(self, handle: dict, pods: list[dict]) -> list[ProcessState]:
        named = pods_by_process(pods, _names(handle))
        _remember(handle, named)
        states = []
        for name, _role, _decisive in handle.get("processes", []):
            pod = named.get(name)
            states.append(pod_state(name, pod) if pod else ProcessState(name, "pending"))
        _PHASES[(handle["namespace"], handle["name"])] = {state.name: state.phase for state in states}
        return states

    # --- logs ------------------------------------------------------------------------------
    def _pod_of(self, handle: dict, process: str) -> tuple[str, str] | None:
        known = _PODS.get((handle["namespace"], handle["name"]), {})
        if process not in known:
            experiment = self._experiment_label(handle)
            pods = self._pods(f"{k8s_objects.LABEL_EXPERIMENT}={experiment}", handle["namespace"])
            _remember(handle, pods_by_process(pods, _names(handle)))
            known = _PODS.get((handle["namespace"], handle["name"]), {})
        return known.get(process)

    def logs(self, handle: dict, process: str, cursor=None) -> tuple[list[str], list | None]:
        return self._read_log(handle, process, cursor, final=False)

    def follow(self, handle: dict, process: str, cursor=None) -> tuple[list[str], list | None]:
        """The watcher's read, every interval: from one followed log stream per running pod
        (`follow=true`, opened once, read on a thread), so a process costs one request for its
        whole run however often it is visited, printing or not. A pod that waits has no log
        yet; past `log_streams` open streams (engine setting, MAX_LOG_STREAMS) a process is read
        by polling instead, quiet ones less and less often (up to QUIET_MAX_SECONDS). Opening a
        stream and a polled read both take from LOG_READS_PER_SECOND for the whole process."""
        key = (handle["namespace"], handle["name"], process)
        phase = _PHASES.get(key[:2], {}).get(process)
        if phase == "pending":
            return [], cursor
        position = tuple(cursor or (0, 0))
        if _DRAINED.get(key) == list(position):
            return [], cursor  # its stream ended with the log: nothing can come after
        now = time.monotonic()
        _sweep_streams(now)
        stream = _STREAMS.get(key)
        if stream is not None and stream.position == position and stream.exhausted():
            if phase == "exited":
                if stream.complete():
                    _DRAINED[key] = list(position)
                return [], cursor  # the final read takes what is left (an unfinished line) from it
            # A clean end is the container's (its exit is on the watch's way; a restart is
            # followed after QUIET_MAX_SECONDS); an error is retried, backing off.
            due, failures = _QUIET.get(key, (0.0, 0))
            if not due:
                failures = 0 if stream.clean else failures + 1
                wait = QUIET_MAX_SECONDS if stream.clean else min(QUIET_MAX_SECONDS, 2.0 ** (failures - 1))
                _QUIET[key] = due, failures = now + wait, failures
            if now < due:
                return [], cursor
            stream = None
        elif stream is not None and stream.position != position:
            stream = None  # another reader moved the cursor (a final read): follow from there
        if stream is None:
            ended = _STREAMS.pop(key, None)
            if ended is not None:
                ended.close()
            if _live_streams() >= self._log_streams():
                return self._poll(handle, process, cursor, key, now)
            due, failures = _QUIET.get(key, (0.0, 0))
            if now < due or not _LOG_READS.take(now, self._log_rate()):
                return [], cursor
            pod = self._pod_of(handle, process)
            if pod is None:
                return [], cursor
            try:
                stream = _LogStream(self, handle["namespace"], pod, position)
            except EngineError as exc:  # not started yet, or gone: try again later, not every visit
                log.info("no log stream of %s/%s now: %s", handle["namespace"], pod[0], exc)
                _QUIET[key] = (now + min(QUIET_MAX_SECONDS, 2.0**failures), failures + 1)
                return [], cursor
            _QUIET[key] = (0.0, failures)
            _STREAMS[key] = stream
        lines, taken = stream.take(LOG_BUDGET_BYTES)
        if lines:
            _QUIET[key] = (0.0, 0)
            _LAST_SECOND[key] = taken[0]  # where a stash before a delete starts
        return lines, (None if cursor is None and taken == (0, 0) else list(taken))

    def _log_streams(self) -> int:
        # null (as the admin's JSON may say) is the default, as a missing key is.
        value = self.config.get("log_streams")
        return MAX_LOG_STREAMS if value is None else int(value)

    def _log_rate(self) -> float:
        return float(self.config.get("log_reads_per_second") or LOG_READS_PER_SECOND)

    def _poll(self, handle: dict, process: str, cursor, key: tuple, now: float) -> tuple[list[str], list | None]:
        """A read of the log's new part, for a process without a stream (too many open)."""
        due, quiet = _QUIET.get(key, (0.0, 0))
        if now < due or not _LOG_READS.take(now, self._log_rate()):
            return [], cursor
        lines, cursor = self._read_log(handle, process, cursor, final=False)
        quiet = 0 if lines else min(quiet + 1, 8)
        _QUIET[key] = (now + min(QUIET_MAX_SECONDS, 0.5 * (2**quiet - 1)), quiet) if quiet else (0.0, 0)
        return lines, cursor

    def _open_log_stream(self, path: str, query: dict):
        """A followed log request, counted as one call however long it lasts."""
        _CALLS.count = getattr(_CALLS, "count", 0) + 1
        try:
            return _stream_client(self).call_api(
                path,
                "GET",
                query_params=list(query.items()),
                header_params={"Accept": "text/plain"},
                auth_settings=["BearerToken"],
                _preload_content=False,
                _return_http_data_only=True,
                _request_timeout=(10, LOG_STREAM_IDLE_SECONDS),
            )
        except ApiException as exc:
            raise _api_error(exc) from None
        except Exception as exc:
            raise EngineError(f"cannot reach the Kubernetes API: {exc}") from None

    def unfollow(self, handle: dict) -> None:
        """Close the streams of these processes, but an exited process's: the final read goes on
        from it (it ends with the log; one still catching up on a burst loses nothing)."""
        if not handle.get("namespace"):
            return
        top = (handle["namespace"], handle["name"])
        # Snapshots (list() of a dict is atomic): the watcher's thread follows other experiments meanwhile.
        for key in [key for key in list(_QUIET) if key[:2] == top]:
            _QUIET.pop(key, None)
        for key in [key for key in list(_STREAMS) if key[:2] == top]:
            if _PHASES.get(top, {}).get(key[2]) == "exited":
                continue
            stream = _STREAMS.pop(key, None)
            if stream is not None:
                stream.close()

    def final_logs(self, handle: dict, process: str, cursor) -> list[str]:
        return self._read_log(handle, process, cursor, final=True)[0]

    def _read_log(self, handle: dict, process: str, cursor, *, final: bool) -> tuple[list[str], list | None]:
        """Lines after `cursor` = [second, taken]: of the lines stamped in that second or later,
        the first `taken` are stored (the API's sinceTime counts whole seconds)."""
        since, taken = (cursor or [0, 0])[0], (cursor or [0, 0])[1]
        key = (handle["namespace"], handle["name"], process)
        if final:
            _FINAL.add(key)
        if key in _DRAINED and _DRAINED[key] == list(cursor or [0, 0]):
            return [], cursor  # an exited process's log was read to its end already
        pod = self._pod_of(handle, process)
        if pod is None:
            return [], cursor
        exited = _PHASES.get(key[:2], {}).get(process) == "exited"
        stashed = _STASH.get((handle["namespace"], pod[0]))
        if stashed is None and exited:
            return self._drain(handle["namespace"], key, pod, cursor, final=final)
        if stashed is not None:
            body = _since(stashed, since)
            if final:
                _STASH.pop((handle["namespace"], pod[0]), None)
        else:
            body = self._fetch_log(handle["namespace"], pod, since, LOG_BUDGET_BYTES)
            if body is None:
                return [], cursor
        text = body.decode("utf-8", "replace")
        pieces = text.split("\n")
        rest = pieces.pop()  # "" after a whole last line; else a line being written or cut
        if rest and (final and len(body) < LOG_BUDGET_BYTES):
            pieces.append(rest)
        stamped = [_split_stamp(piece) for piece in pieces]
        new = stamped[taken:]
        # The whole log of a process that had exited before this read: the next read of the
        # watcher's final pass needs no request.
        drained = exited and stashed is None and len(body) < LOG_BUDGET_BYTES and (final or not rest)
        if not new:
            if drained:
                _DRAINED[key] = list(cursor or [0, 0])
            return [], cursor
        last = new[-1][0]
        count = sum(1 for second, _ in stamped[: taken + len(new)] if second == last)
        if last == since:
            count = taken + len(new)
        _LAST_SECOND[key] = last
        if drained:
            _DRAINED[key] = [last, count]
        return [line + "\n" for _, line in new], [last, count]

    def _drain(self, namespace: str, key: tuple, pod: tuple[str, str], cursor, *, final: bool):
        """An exited process's log after `cursor`, a budget's worth per call, through one request
        for all of it: the stream follow() kept (it ends with the log), else a new one. Paging by
        sinceTime cannot pass a second in which more than a read's budget was printed; a stream
        can. `final`: everything left, the unfinished last line included."""
        position = tuple(cursor or (0, 0))
        stream = _STREAMS.get(key)
        if stream is None or stream.position != position or (stream.exhausted() and not stream.clean):
            if stream is not None:
                _STREAMS.pop(key, None)
                stream.close()
            try:
                stream = _LogStream(self, namespace, pod, position, follow=False)
            except EngineError as exc:  # deleted meanwhile: what was stored stands
                log.info("no logs of %s/%s now: %s", namespace, pod[0], exc)
                return [], cursor
            _STREAMS[key] = stream
        lines: list[str] = []
        while True:
            piece, taken = stream.take(LOG_BUDGET_BYTES, wait=LOG_DRAIN_SECONDS)
            lines += piece
            if not (final and piece):
                break
        if not piece and not stream.ended:
            log.warning("the log of %s/%s stalled for %s s: stored up to here", namespace, pod[0], LOG_DRAIN_SECONDS)
        if not piece and stream.exhausted():
            if final:
                lines += stream.rest()
            if final or stream.complete():
                if stream.clean:
                    _DRAINED[key] = list(stream.position)
                _STREAMS.pop(key, None)
                stream.close()
        if lines:
            _LAST_SECOND[key] = taken[0]
        return lines, (None if cursor is None and taken == (0, 0) else list(taken))

    def _fetch_log(self, namespace: str, pod: tuple[str, str], since: int, limit: int) -> bytes | None:
        query = {"container": pod[1], "timestamps": "true", "limitBytes": str(limit)}
        if since:
            query["sinceTime"] = datetime.fromtimestamp(since, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        try:
            return self._call("GET", f"/api/v1/namespaces/{namespace}/pods/{pod[0]}/log", query=query, raw=True)
        except EngineError as exc:
            # A pod not started yet, or deleted meanwhile: nothing to read now. What the kubelet
            # cannot give stays unread rather than stop the watch of the others.
            log.info("no logs of %s/%s now: %s", namespace, pod[0], exc)
            return None

    def _stash_logs(self, handle: dict) -> None:
        """Keep what the pods printed since the last read, before a delete takes it with them."""
        top = (handle["namespace"], handle["name"])
        if top not in _PODS:
            self._pod_of(handle, "")  # one list: the pods of a handle never watched here
        for process, pod in _PODS.get(top, {}).items():
            if (
                _PHASES.get(top, {}).get(process) == "pending"
                or (*top, process) in _FINAL
                or (handle["namespace"], pod[0]) in _STASH
            ):
                continue
            body = self._fetch_log(handle["namespace"], pod, _LAST_SECOND.get((*top, process), 0), 4 * LOG_BUDGET_BYTES)
            if body:
                while len(_STASH) >= STASH_ENTRIES:  # an abandoned stash must not grow forever
                    _STASH.pop(next(iter(_STASH)))
                _STASH[(handle["namespace"], pod[0])] = body

    # --- exec and port-forward ---------------------------------------------------------------
    def exec(self, handle: dict, process: str, *, command: list[str], tty: bool = True) -> ExecSession:
        pod = self._pod_of(handle, process)
        if pod is None:
            raise EngineError(f"{process} has no pod")
        core = k8s.CoreV1Api(self.api)
        try:
            ws = k8s_stream(
                core.connect_get_namespaced_pod_exec,
                pod[0],
                handle["namespace"],
                container=pod[1],
                command=command,
                stdin=True,
                stdout=True,
                stderr=True,
                tty=tty,
                _preload_content=False,
                binary=True,
            )
        except ApiException as exc:
            raise _api_error(exc) from None
        return KubernetesExecSession(ws)

    def port_forward(self, handle: dict, process: str, port: int) -> ExecSession:
        pod = self._pod_of(handle, process)
        if pod is None:
            raise EngineError(f"{process} has no pod")
        core = k8s.CoreV1Api(self.api)
        try:
            forward = k8s_portforward(
                core.connect_get_namespaced_pod_portforward, pod[0], handle["namespace"], ports=str(port)
            )
        except ApiException as exc:
            raise _api_error(exc) from None
        return KubernetesPortSession(forward, port)

    # --- cancel and cleanup ----------------------------------------------------------------
    def cancel(self, handle: dict) -> None:
        """Delete the top object with foreground propagation and wait until its pods are gone.
        Their logs are read first: the caller's final read comes after (a failure cancels the
        other ranks before the logs are collected), and a deleted pod's logs are gone."""
        path = f"{collection(handle['kind'], handle['namespace'])}/{handle['name']}"
        try:
            if (handle["namespace"], handle["name"]) not in _DELETED:
                self._stash_logs(handle)
        except EngineError as exc:
            log.warning("logs of %s/%s not kept before deletion: %s", handle["namespace"], handle["name"], exc)
        try:
            self._call(
                "DELETE", path, body={"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Foreground"}
            )
        except NotFoundError:
            pass
        deadline, pause = time.monotonic() + DELETE_WAIT_SECONDS, 0.1
        while time.monotonic() < deadline:
            if self._get(handle["kind"], handle["namespace"], handle["name"]) is None:
                _DELETED.add((handle["namespace"], handle["name"]))
                break
            time.sleep(pause)
            pause = min(2.0, pause * 2)  # pods stop within seconds; a stuck finalizer costs few calls

    def cleanup(self, handle: dict) -> None:
        self.cancel(handle)
        self.unfollow(handle)
        top = (handle["namespace"], handle["name"])
        for key in [key for key in list(_STREAMS) if key[:2] == top]:  # the exited ones' too
            stream = _STREAMS.pop(key, None)
            if stream is not None:
                stream.close()
        for pod, _container in _PODS.pop(top, {}).values():
            _STASH.pop((handle["namespace"], pod), None)
        _PHASES.pop(top, None)
        _DELETED.discard(top)
        for key in [key for key in _LAST_SECOND if key[:2] == top]:
            del _LAST_SECOND[key]
        _FINAL.difference_update({key for key in _FINAL if key[:2] == top})
        for key in [key for key in _DRAINED if key[:2] == top]:
            del _DRAINED[key]

    def hold(self, handle: dict, seconds: float) -> dict:
        """A failed run's pods stay as they are (the top object is not deleted): the ranks still
        running can be opened in the terminal, the failed pods described and their logs read with
        kubectl; release_hold's stop deletes them. A terminated container cannot be exec'd into
        on Kubernetes, so no keep-alive copy is made of it."""
        return {**handle, "held_seconds": seconds}


class NotFoundError(EngineError):
    pass


class _PodWatch:
    """The pods labelled with an experiment id, across namespaces, kept by one LIST and then a
    WATCH from its resourceVersion (re-listed on 410 Gone or a broken stream), on a daemon
    thread per cluster configuration in this process. The watcher's states() reads it: a poll
    costs no request whatever the number of experiments. It ends when nobody read it for
    IDLE_SECONDS."""

    # Each watch request asks for this long (the server may end it sooner; the client-go
    # reflector asks for 5-10 minutes): one request per engine per period while nothing breaks.
    WATCH_SECONDS = 300
    IDLE_SECONDS = 120.0
    _all: dict[tuple, _PodWatch] = {}
    _lock = threading.Lock()

    def __init__(self, engine: KubernetesEngine) -> None:
        self.engine = engine
        self.lock = threading.Lock()
        self.items: dict[str, dict] | None = None  # by uid; None until listed, or after a failure
        self.opened = 0
        self.listed = threading.Event()  # set by the first list
        self.waited = False
        self.read_at = time.monotonic()
        self.thread = threading.Thread(target=self.run, name="k8s-pod-watch", daemon=True)

    @classmethod
    def of(cls, engine: KubernetesEngine) -> _PodWatch | None:
        if engine.config.get("watch_pods") is False:
            return None
        key = (engine.config.get("kubeconfig"), engine.config.get("context"), engine.config.get("in_cluster"))
        with cls._lock:
            watch = cls._all.get(key)
            if watch is None or not watch.thread.is_alive():
                watch = cls._all[key] = cls(KubernetesEngine(engine.config))
                watch.thread.start()
        watch.read_at = time.monotonic()
        return watch

    def pods(self, wait: float = 0.0) -> list[dict] | None:
        """The pods now, or None while the watch is not live (the caller lists them itself).
        A watch just started is waited for, up to `wait` seconds: its list is the one this
        interval needs, and listing beside it would be a second."""
        if not self.waited:
            self.waited = True  # once: an unreachable cluster must not hold up every interval
            self.listed.wait(wait)
        with self.lock:
            return None if self.items is None else list(self.items.values())

    def take_opened(self) -> int:
        with self.lock:
            opened, self.opened = self.opened, 0
        return opened

    def run(self) -> None:
        version = None
        while time.monotonic() - self.read_at < self.IDLE_SECONDS:
            try:
                if version is None:
                    listed = self.engine._call(
                        "GET", "/api/v1/pods", query={"labelSelector": k8s_objects.LABEL_EXPERIMENT}
                    )
                    version = listed["metadata"].get("resourceVersion")
                    with self.lock:
                        self.items = {pod["metadata"]["uid"]: pod for pod in listed.get("items", [])}
                        self.opened += 1
                    self.listed.set()
                version = self.follow(version)
            except ApiException as exc:
                if exc.status != 410:
                    self.interrupted(exc)
                # 410 Gone: the version is older than the server's history; what is known
                # stays good for the interval the list takes.
                version = None
            except Exception as exc:  # the cluster is unreachable or the stream broke: list again
                self.interrupted(exc)
                version = None
        with self.lock:
            self.items = None

    def interrupted(self, exc: Exception) -> None:
        """The cluster is unreachable or the stream broke: the callers list, until a list works."""
        log.info("pod watch interrupted: %s", exc)
        with self.lock:
            self.items = None
        time.sleep(1.0)

    def follow(self, version: str) -> str | None:
        """Apply the events of one watch request; the version to go on from (None: list again)."""
        query = {
            "labelSelector": k8s_objects.LABEL_EXPERIMENT,
            "watch": "true",
            "resourceVersion": version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(self.WATCH_SECONDS),
        }
        with self.lock:
            self.opened += 1  # a request, whether it opens or gets 410 Gone
        response = self.engine.api.call_api(
            "/api/v1/pods",
            "GET",
            query_params=list(query.items()),
            header_params={"Accept": "application/json"},
            auth_settings=["BearerToken"],
            _preload_content=False,
            _return_http_data_only=True,
            _request_timeout=(10, self.WATCH_SECONDS + 30),
        )
        try:
            for line in iter_resp_lines(response):
                event = json.loads(line)
                kind, obj = event.get("type"), event.get("object") or {}
                if kind == "ERROR":
                    return None  # 410 Gone: the version is too old to watch from
                version = obj.get("metadata", {}).get("resourceVersion") or version
                if kind == "BOOKMARK":
                    continue
                with self.lock:
                    if self.items is None:
                        return None
                    if kind == "DELETED":
                        self.items.pop(obj["metadata"]["uid"], None)
                    else:
                        self.items[obj["metadata"]["uid"]] = obj
        finally:
            response.release_conn()
        return version


def _api_error(exc: ApiException) -> EngineError:
    """The API server's own words (its Status message), for the step log."""
    try:
        message = json.loads(exc.body or "{}").get("message") or exc.reason
    except ValueError:
        message = exc.reason
    cls = NotFoundError if exc.status == 404 else EngineError
    return cls(f"Kubernetes API: {message} ({exc.status})")


def pods_by_process(pods: list[dict], expected: list[str]) -> dict[str, dict]:
    named: dict[str, dict] = {}
    ray_workers: dict[str, list[dict]] = {}
    for pod in pods:
        labels = pod["metadata"].get("labels", {})
        if labels.get("ray.io/node-type") == "worker":
            pool = labels.get(k8s_objects.LABEL_GROUP) or labels.get("ray.io/group", "workers")
            ray_workers.setdefault(pool, []).append(pod)
            continue
        name = next((n for n in process_names(labels) if n in expected), None)
        if name:
            named[name] = pod
    for group, members in ray_workers.items():
        for i, pod in enumerate(sorted(members, key=lambda p: p["metadata"]["name"])):
            named[f"{group}-{i}"] = pod
    return named


_PODS: dict[tuple[str, str], dict[str, tuple[str, str]]] = {}
# Each process's last phase, by top object, from states(): what follow() decides on.
_PHASES: dict[tuple[str, str], dict[str, str]] = {}
# When follow() reads a process next, and how many quiet reads it had in a row.
_QUIET: dict[tuple[str, str, str], tuple[float, int]] = {}
# The logs cancel() read just before it deleted the pods (by namespace and pod name), so the
# caller's final read after a cancel still finds them: on a cluster a deleted pod's logs go too.
_STASH: dict[tuple[str, str], bytes] = {}
STASH_ENTRIES = 4096
# A quiet process is read again after 1, 2, 4 … at most this many seconds: output is stored
# that late at worst, and a thousand idle pods cost no request per poll.
QUIET_MAX_SECONDS = 8.0
# The cursor at the end of an exited process's log, once a read reached it.
_DRAINED: dict[tuple[str, str, str], list] = {}
# Processes whose final logs were read here: nothing of theirs is left to keep before a delete.
_FINAL: set[tuple[str, str, str]] = set()
# Top objects cancel() saw gone: a second cancel (cleanup's) has no logs left to keep.
_DELETED: set[tuple[str, str]] = set()
# The watcher's log reads in this process, at most this many per second whatever the number of
# pods (a token bucket): past it, the processes not read wait for a later interval, and the
# quiet back-off above makes the ones just read step aside, a round-robin.
LOG_READS_PER_SECOND = 20.0


# Log streams (follow(), and the final read of an exited process), by namespace, top object and
# process: open while their process runs, kept once ended (no thread, no socket) until the
# final read has what they hold.
_STREAMS: dict[tuple[str, str, str], _LogStream] = {}
_STREAMS_LOCK = threading.Lock()
# How long the final read of an exited process waits for its stream's next line (or its end).
LOG_DRAIN_SECONDS = 30.0
# Open streams at most, in this process, unless the engine's `log_streams` says otherwise: one
# thread and one connection each; the processes past it are polled.
MAX_LOG_STREAMS = 256
# A stream that brought nothing for this long is reconnected (a connection that died silently
# must not leave a process unread until its exit): one request per quiet process per period.
LOG_STREAM_IDLE_SECONDS = 600
# A stream nobody read for this long is closed (its experiment is watched by another process now).
LOG_STREAM_UNREAD_SECONDS = 120.0
_SWEPT = [0.0]
_CLIENTS: dict[tuple, k8s.ApiClient] = {}


def _stream_client(engine: KubernetesEngine) -> k8s.ApiClient:
    """The client log streams are opened with: its own pool, as large as the streams may be
    many, so the engine's short requests never wait for, nor discard, a stream's connection."""
    key = (engine.config.get("kubeconfig"), engine.config.get("context"), engine.config.get("in_cluster"))
    with _STREAMS_LOCK:
        client = _CLIENTS.get(key)
        if client is None:
            configuration = engine._configuration()
            configuration.connection_pool_maxsize = engine._log_streams() + 1
            client = _CLIENTS[key] = k8s.ApiClient(configuration)
    return client


def _live_streams() -> int:
    return sum(1 for stream in list(_STREAMS.values()) if not stream.ended)


def _sweep_streams(now: float) -> None:
    if now - _SWEPT[0] < 10.0:
        return
    _SWEPT[0] = now
    for key, stream in list(_STREAMS.items()):
        if now - stream.read_at > LOG_STREAM_UNREAD_SECONDS and _STREAMS.get(key) is stream:
            _STREAMS.pop(key, None)
            stream.close()


class _LogStream:
    """One log request for a pod's container from the cursor's second (`follow=true` while the
    process runs), read on a daemon thread into a bounded buffer (past it, the thread waits and
    TCP holds the kubelet back) that take() hands out in whole lines. The kubelet ends a followed
    one when the container ends; a clean end read to the last byte is the whole log."""

    BUFFER_BYTES = 2 * LOG_BUDGET_BYTES

    def __init__(
        self, engine: KubernetesEngine, namespace: str, pod: tuple[str, str], position: tuple, follow: bool = True
    ) -> None:
        since, taken = position
        query = {"container": pod[1], "timestamps": "true", "follow": "true" if follow else "false"}
        if since:
            query["sinceTime"] = datetime.fromtimestamp(since, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        self.position = tuple(position)  # [second, taken] after the last whole line handed out
        self.skip = taken  # lines of `since` stored already: the request repeats them
        self.data = bytearray()
        self.cond = threading.Condition()
        self.ended = self.clean = self.closed = False
        self.mid_line = False  # a line longer than a read's budget is being handed out in pieces
        self.second = 0
        self.read_at = time.monotonic()
        self.response = engine._open_log_stream(f"/api/v1/namespaces/{namespace}/pods/{pod[0]}/log", query)
        self.thread = threading.Thread(target=self._receive, name="k8s-log", daemon=True)
        self.thread.start()

    def _receive(self) -> None:
        clean = False
        try:
            for chunk in self.response.stream(amt=None, decode_content=False):
                with self.cond:
                    while len(self.data) >= self.BUFFER_BYTES and not self.closed:
                        self.cond.wait(1.0)
                    if self.closed:
                        return
                    self.data += chunk
                    self.cond.notify_all()
            clean = True
        except Exception as exc:  # a broken or timed-out connection, or close(): read again from the cursor
            log.debug("log stream ended: %s", exc)
        finally:
            with self.cond:
                self.ended, self.clean = True, clean and not self.closed
                self.cond.notify_all()
            self._release()

    def _release(self) -> None:
        try:
            self.response.release_conn()
        except Exception:  # already closed by close()
            pass

    def pending(self) -> bool:
        """Whether take() has something to hand out now."""
        with self.cond:
            return self._ready()

    def _ready(self) -> bool:
        return b"\n" in self.data or len(self.data) >= LOG_BUDGET_BYTES

    def rest(self) -> list[str]:
        """Once ended: the unfinished last line, if the log ends with one."""
        with self.cond:
            if not self.ended or not self.data or self.skip:
                return []
            text = bytes(self.data).decode("utf-8", "replace")
            self.data.clear()
            if not self.mid_line:
                self.second, text = _split_stamp(text)
            self.mid_line = False
            return [text]

    def exhausted(self) -> bool:
        """Ended, and nothing left to hand out but maybe an unfinished last line."""
        return self.ended and not self.pending()

    def complete(self) -> bool:
        """Ended with the log's end, every byte of it handed out: the final read has nothing to add."""
        with self.cond:
            return self.ended and self.clean and not self.data and not self.mid_line

    def take(self, budget: int, wait: float = 0.0) -> tuple[list[str], tuple]:
        """Whole lines received, at most `budget` bytes of them, and the position after them;
        waiting up to `wait` seconds for one (lines stored already, skipped, do not count), or
        for the end."""
        self.read_at = time.monotonic()
        deadline = self.read_at + wait
        with self.cond:
            while True:
                out = self._cut(budget)
                remaining = deadline - time.monotonic()
                # Under the lock, an end seen here comes after the last of the data: all was cut.
                if out or self.ended or remaining <= 0:
                    return out, self.position
                self.cond.wait_for(lambda: self._ready() or self.ended, timeout=remaining)

    def _cut(self, budget: int) -> list[str]:
        out: list[str] = []
        data, pos, used = self.data, 0, 0
        while used < budget:
            end = data.find(b"\n", pos)
            if end < 0:
                if len(data) - pos < budget:
                    break  # an unfinished line: it waits for its end (or the final read)
                end, whole = pos + budget, False
            else:
                whole = True
            piece = bytes(data[pos:end])
            pos = end + 1 if whole else end
            used += len(piece) + 1
            if self.skip:
                self.skip -= whole
                continue
            text = piece.decode("utf-8", "replace")
            if not self.mid_line:
                self.second, text = _split_stamp(text)
            self.mid_line = not whole
            if whole:
                since, count = self.position
                self.position = (since, count + 1) if self.second == since else (self.second, 1)
                text += "\n"
            out.append(text)
        del data[:pos]
        self.cond.notify_all()  # room in the buffer for the receiving thread
        return out

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()
        try:
            self.response.shutdown()  # the thread's blocked read returns
        except Exception:
            pass
        self._release()


class _Bucket:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.tokens, self.at = 0.0, 0.0

    def take(self, now: float, rate: float) -> bool:
        with self.lock:
            self.tokens = min(2 * rate, self.tokens + (now - self.at) * rate) if self.at else 2 * rate
            self.at = now
            if self.tokens < 1:
                return False
            self.tokens -= 1
            return True


_LOG_READS = _Bucket()
# The second of each process's last stored line: where a stash before a delete starts.
_LAST_SECOND: dict[tuple[str, str, str], int] = {}


def _names(handle: dict) -> list[str]:
    return [name for name, _role, _decisive in handle.get("processes", [])]


def _remember(handle: dict, named: dict[str, dict]) -> None:
    """Pod and container names by process, so a log read costs one request, not a list too.
    A pod no longer listed stays known until cleanup: the final read after a cancel finds its
    logs in the stash by its name, even when a states() in between saw it deleted."""
    top = (handle["namespace"], handle["name"])
    _PODS[top] = {
        **_PODS.get(top, {}),
        **{name: (pod["metadata"]["name"], pod["spec"]["containers"][0]["name"]) for name, pod in named.items()},
    }


def pod_state(name: str, pod: dict) -> ProcessState:
    status = pod.get("status", {})
    phase = status.get("phase", "Pending")
    if phase in ("Succeeded", "Failed"):
        code = 0 if phase == "Succeeded" else 1
        for container in status.get("containerStatuses", []):
            terminated = container.get("state", {}).get("terminated")
            if terminated and terminated.get("exitCode") is not None:
                code = terminated["exitCode"]
                break
        return ProcessState(name, "exited", code)
    if phase == "Running":
        return ProcessState(name, "running")
    return ProcessState(name, "pending", reason=waiting_reason(pod) or "")


def waiting_reason(pod: dict) -> str | None:
    """Why a pod is not running yet, in words a researcher understands."""
    status = pod.get("status", {})
    for condition in status.get("conditions", []):
        if condition.get("type") == "PodScheduled" and condition.get("status") == "False":
            return f"unschedulable: {condition.get('message') or condition.get('reason')}"
    for container in status.get("containerStatuses", []):
        waiting = container.get("state", {}).get("waiting") or {}
        reason = waiting.get("reason")
        if reason in ("ErrImagePull", "ImagePullBackOff", "InvalidImageName"):
            return f"image pull failure: {waiting.get('message') or reason}"
        if reason in ("CreateContainerConfigError", "CreateContainerError"):
            return f"cannot start the container: {waiting.get('message') or reason}"
    return None


def _since(body: bytes, since: int) -> bytes:
    """The lines of a stashed log stamped `since` or later, as the API's sinceTime returns them."""
    if not since:
        return body
    lines = body.split(b"\n")
    for i, line in enumerate(lines):
        if _split_stamp(line.decode("utf-8", "replace"))[0] >= since:
            return b"\n".join(lines[i:])
    return b""


def _split_stamp(line: str) -> tuple[int, str]:
    stamp, _, text = line.partition(" ")
    try:
        main = stamp.rstrip("Z").split(".")[0]
        second = int(datetime.strptime(main, "%Y-%m-%dT%H:%M:%S").replace(tzinfo=UTC).timestamp())
    except ValueError:
        return 0, line
    return second, text


class KubernetesExecSession(ExecSession):
    """The API server's exec WebSocket (channel protocol); read from a thread (no fileno)."""

    def __init__(self, ws) -> None:
        self.ws = ws
        self.closed = False

    def write(self, data: bytes) -> None:
        self.ws.write_stdin(data)

    def read(self, timeout: float | None = None) -> bytes | None:
        if self.closed or not self.ws.is_open():
            return None
        try:
            self.ws.update(timeout=timeout or 0)
        except (TypeError, ValueError, OSError, WebSocketException):
            # close() from another thread took the socket away under the poll: the end.
            return None
        data = b""
        if self.ws.peek_stdout():
            data += _bytes(self.ws.read_stdout())
        if self.ws.peek_stderr():
            data += _bytes(self.ws.read_stderr())
        if not data and not self.ws.is_open():
            return None
        return data

    def resize(self, rows: int, cols: int) -> None:
        self.ws.write_channel(4, json.dumps({"Width": cols, "Height": rows}))

    def close(self) -> None:
        self.closed = True
        self.ws.close()


def _bytes(data) -> bytes:
    return data if isinstance(data, bytes) else str(data).encode()


class KubernetesPortSession(ExecSession):
    """One connection to a port of a pod, through the API server's port-forward."""

    def __init__(self, forward, port: int) -> None:
        self.forward, self.port = forward, port
        self.sock: socket.socket = forward.socket(port)
        self.sock.setblocking(False)

    def write(self, data: bytes) -> None:
        self.sock.setblocking(True)
        try:
            self.sock.sendall(data)
        finally:
            self.sock.setblocking(False)

    def read(self, timeout: float | None = None) -> bytes | None:
        import select

        if not select.select([self.sock], [], [], timeout or 0)[0]:
            return b""
        try:
            data = self.sock.recv(1 << 16)
        except BlockingIOError:
            return b""
        except OSError:
            return None
        return data or None

    def fileno(self) -> int | None:
        return self.sock.fileno()

    def resize(self, rows: int, cols: int) -> None:
        pass

    def close(self) -> None:
        try:
            self.sock.close()
        finally:
            self.forward.close()

    def failure(self) -> str | None:
        error = self.forward.error(self.port)
        return error or None
