"""A fake Kubernetes API server for the tests: no cluster can run on this machine, so the real
`kubernetes` client talks over real HTTP (and WebSockets for exec and port-forward) to this
threaded server on 127.0.0.1. It serves discovery, CRUD with label/field selectors, patches,
the status subresource, list-watch, owner-reference deletion (fake_store.py), pod logs, exec
and port-forward (fake_streams.py); operators.py and kubelet.py stand in for the operators and
the node, running each pod as a real Docker container.

`FakeCluster` bundles them; `write_kubeconfig` points a client at it with a bearer token."""

import base64
import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import yaml

from tests.k8s import fake_streams
from tests.k8s.fake_store import (
    BY_PATH,
    RESOURCES,
    ApiError,
    Resource,
    Store,
    fields_match,
    labels_match,
    parse_field_selector,
    parse_label_selector,
)

GIT_VERSION = "v1.36.0"
# How long a watch without timeoutSeconds lasts (the real server picks 30-60 minutes).
DEFAULT_WATCH_SECONDS = 1800


class FakeCluster:
    """The API server and, when `docker_client` is given, the kubelet and operators running pods
    as real containers. `reset()` between tests keeps the server (and its port) alive."""

    def __init__(self, docker_client=None, *, run_operators: bool = True) -> None:
        self.store = Store()
        self.token = uuid.uuid4().hex
        self.closed = threading.Event()
        # Every API call (method, path, query) since the last reset: benchmarks count them.
        self.request_log: list[tuple[str, str, str]] = []
        self.kubelet = None
        self.operators = None
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.server.daemon_threads = True
        self.server.cluster = self  # type: ignore[attr-defined]
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self.server.serve_forever, name="fake-k8s-api", daemon=True)
        self._thread.start()
        if docker_client is not None and run_operators:
            from tests.k8s.kubelet import Kubelet
            from tests.k8s.operators import Operators

            self.kubelet = Kubelet(self.store, docker_client)
            self.operators = Operators(self.store)

    def reset(self) -> None:
        """An empty cluster (the three namespaces every cluster has): every pod's container goes."""
        if self.operators:
            self.operators.pause()
        if self.kubelet:
            self.kubelet.remove_everything()
        self.store.reset()
        self.store.requests = 0
        self.request_log.clear()
        if self.operators:
            self.operators.resume()

    def close(self) -> None:
        self.closed.set()
        with self.store.lock:
            self.store.closed = True
            self.store.changed.notify_all()
        self.server.shutdown()
        self.server.server_close()
        if self.operators:
            self.operators.stop()
        if self.kubelet:
            self.kubelet.stop()

    def write_kubeconfig(self, path: Path, namespace: str = "default", context: str = "fake") -> Path:
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "fake-admin", "user": {"token": self.token}}],
            "contexts": [
                {"name": context, "context": {"cluster": "fake", "user": "fake-admin", "namespace": namespace}}
            ],
            "current-context": context,
        }
        path.write_text(yaml.safe_dump(config))
        return path

    def api_client(self, tmp_dir: Path):
        from kubernetes import config

        return config.new_client_from_config(str(self.write_kubeconfig(tmp_dir / "kubeconfig")))


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "fake-kube-apiserver"

    def log_message(self, format, *args) -> None:  # noqa: A002 - the base class's name
        pass  # the test output stays readable; failures surface as Status bodies

    @property
    def cluster(self) -> FakeCluster:
        return self.server.cluster  # type: ignore[attr-defined]

    # -- HTTP plumbing
    def do_GET(self):
        self._serve("GET")

    def do_POST(self):
        self._serve("POST")

    def do_PUT(self):
        self._serve("PUT")

    def do_PATCH(self):
        self._serve("PATCH")

    def do_DELETE(self):
        self._serve("DELETE")

    def _serve(self, method: str) -> None:
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
        self.query_all = parse_qs(url.query, keep_blank_values=True)
        self.cluster.store.requests += 1
        self.cluster.request_log.append((method, url.path, url.query))
        try:
            if self.headers.get("Authorization") != f"Bearer {self.cluster.token}":
                raise ApiError(401, "Unauthorized", "Unauthorized")
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            body = None
            if raw:
                try:
                    body = json.loads(raw)
                except ValueError:
                    body = yaml.safe_load(raw) if "yaml" in (self.headers.get("Content-Type") or "") else None
                    if body is None:
                        raise ApiError(400, "BadRequest", "the body of the request was in an unknown format") from None
            self._route(method, [p for p in url.path.split("/") if p], query, body)
        except ApiError as exc:
            self._json(exc.code, exc.status())
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _json(self, code: int, body) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def start_chunked(self, content_type: str) -> None:
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

    def chunk(self, data: bytes) -> None:
        if data:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()

    def end_chunked(self) -> None:
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    # -- routing
    def _route(self, method: str, parts: list[str], query: dict, body) -> None:
        if parts == ["version"]:
            return self._json(200, _version())
        if parts == ["api"]:
            return self._json(200, {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []})
        if parts == ["apis"]:
            return self._json(200, _group_list())
        if parts[:1] == ["apis"] and len(parts) == 2:
            group = next((g for g in _group_list()["groups"] if g["name"] == parts[1]), None)
            if not group:
                raise ApiError(404, "NotFound", "the server could not find the requested resource")
            return self._json(200, {"kind": "APIGroup", "apiVersion": "v1", **group})
        if parts[:1] == ["api"] and len(parts) >= 2:
            group, version, rest = "", parts[1], parts[2:]
        elif parts[:1] == ["apis"] and len(parts) >= 3:
            group, version, rest = parts[1], parts[2], parts[3:]
        else:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        if not rest:
            return self._json(200, _resource_list(group, version))
        ns = None
        if rest[0] == "namespaces" and len(rest) >= 3 and rest[2] not in ("status", "finalize"):
            ns, rest = rest[1], rest[2:]
        res = BY_PATH.get((group, version, rest[0]))
        if res is None or (ns is not None and not res.namespaced):
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        name = rest[1] if len(rest) > 1 else None
        sub = rest[2] if len(rest) > 2 else None
        if len(rest) > 3 or (sub and sub not in ("status", "log", "exec", "attach", "portforward")):
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        if sub == "status" and not res.has_status:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        if res.namespaced and name is not None and ns is None:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        store = self.cluster.store
        if sub in ("log", "exec", "attach", "portforward"):
            if res.kind != "Pod":
                raise ApiError(404, "NotFound", "the server could not find the requested resource")
            pod = store.get(res, ns, name)
            return fake_streams.serve(self, sub, method, pod, self.cluster.kubelet)
        if name is None:
            if method == "GET":
                if _go_bool(query.get("watch")):
                    return self._watch(res, ns, query)
                return self._list(res, ns, query)
            if method == "POST":
                created = store.create(res, ns, body, dry_run=query.get("dryRun") == "All")
                return self._json(201, created)
            if method == "DELETE":
                items, _ = store.list(res, ns, query.get("labelSelector"), query.get("fieldSelector"))
                for item in items:
                    store.delete(res, ns, item["metadata"]["name"], propagation=(body or {}).get("propagationPolicy"))
                return self._json(
                    200, {"kind": f"{res.kind}List", "apiVersion": res.api_version, "metadata": {}, "items": items}
                )
            raise ApiError(405, "MethodNotAllowed", "the server does not allow this method on the requested resource")
        if method == "GET":
            return self._json(200, store.get(res, ns, name))
        if method == "PUT":
            return self._json(200, store.replace(res, ns, name, body, subresource=sub))
        if method == "PATCH":
            content_type = self.headers.get("Content-Type") or ""
            return self._json(200, store.patch(res, ns, name, body, content_type, subresource=sub))
        if method == "DELETE":
            options = body or {}
            propagation = options.get("propagationPolicy") or query.get("propagationPolicy")
            if options.get("orphanDependents") is True:
                propagation = "Orphan"
            grace = options.get("gracePeriodSeconds", query.get("gracePeriodSeconds"))
            obj, gone = store.delete(
                res, ns, name, propagation=propagation, grace=None if grace is None else int(grace)
            )
            return self._json(200 if gone else 202, obj)
        raise ApiError(405, "MethodNotAllowed", "the server does not allow this method on the requested resource")

    def _list(self, res: Resource, ns, query: dict) -> None:
        items, rv = self.cluster.store.list(res, ns, query.get("labelSelector"), query.get("fieldSelector"))
        meta = {"resourceVersion": rv}
        limit = int(query.get("limit") or 0)
        if limit:
            offset = 0
            if query.get("continue"):
                try:
                    token = json.loads(base64.urlsafe_b64decode(query["continue"]))
                    offset = int(token["offset"])
                except (ValueError, KeyError):
                    raise ApiError(400, "BadRequest", "continue key is not valid") from None
            page, rest = items[offset : offset + limit], items[offset + limit :]
            if rest:
                meta["continue"] = base64.urlsafe_b64encode(json.dumps({"offset": offset + limit}).encode()).decode()
                meta["remainingItemCount"] = len(rest)
            items = page
        self._json(200, {"kind": f"{res.kind}List", "apiVersion": res.api_version, "metadata": meta, "items": items})

    def _watch(self, res: Resource, ns, query: dict) -> None:
        store = self.cluster.store
        labels = parse_label_selector(query.get("labelSelector"))
        fields = parse_field_selector(query.get("fieldSelector"))
        deadline = time.monotonic() + float(query.get("timeoutSeconds") or DEFAULT_WATCH_SECONDS)
        seen: set[str] = set()
        rv_text = query.get("resourceVersion") or ""
        known = rv_text in ("", "0")
        if not rv_text.isdigit() and rv_text:
            raise ApiError(400, "BadRequest", f'invalid resource version "{rv_text}"')
        with store.lock:
            if rv_text in ("", "0"):  # "now": the current objects as ADDED first
                items, rv = store.list(res, ns, query.get("labelSelector"), query.get("fieldSelector"))
                last, initial = int(rv), items
            else:
                last, initial = int(rv_text), []
                if store.events_since(last, res.qualified) is None:
                    raise ApiError(410, "Expired", f"too old resource version: {last} ({store.history[0][0]})")
        self.start_chunked("application/json")
        try:
            for obj in initial:
                seen.add(obj["metadata"]["uid"])
                self._event("ADDED", obj)
            while not self.cluster.closed.is_set() and time.monotonic() < deadline:
                with store.changed:
                    if store.rv <= last:
                        store.changed.wait(min(0.5, max(0.0, deadline - time.monotonic())))
                    events = store.events_since(last, res.qualified)
                    current = store.rv
                if events is None:
                    status = ApiError(410, "Expired", f"too old resource version: {last}").status()
                    self._event("ERROR", status)
                    break
                for _, kind, obj in events:
                    meta = obj["metadata"]
                    if ns is not None and meta.get("namespace") != ns:
                        continue
                    uid = meta["uid"]
                    matches = labels_match(meta.get("labels") or {}, labels) and fields_match(obj, fields)
                    if kind == "DELETED":
                        if matches or uid in seen:
                            self._event("DELETED", obj)
                        seen.discard(uid)
                    elif matches:
                        # Started from a list, the watch knows what the client has: an object
                        # that starts matching (a label added) is new to it.
                        self._event("ADDED" if known and uid not in seen else kind, obj)
                        seen.add(uid)
                    elif uid in seen:
                        seen.discard(uid)
                        self._event("DELETED", obj)
                last = current
            if _go_bool(query.get("allowWatchBookmarks")):
                bookmark = {"kind": res.kind, "apiVersion": res.api_version, "metadata": {"resourceVersion": str(last)}}
                self._event("BOOKMARK", bookmark)
            self.end_chunked()
        except (BrokenPipeError, ConnectionResetError, OSError):
            self.close_connection = True

    def _event(self, kind: str, obj: dict) -> None:
        self.chunk(json.dumps({"type": kind, "object": obj}).encode() + b"\n")


def _go_bool(value: str | None) -> bool:
    """Go's strconv.ParseBool, which the API server uses: the client sends `watch=True`."""
    return value in ("1", "t", "T", "true", "TRUE", "True")


def _version() -> dict:
    return {
        "major": "1",
        "minor": "36",
        "gitVersion": GIT_VERSION,
        "gitCommit": "0" * 40,
        "gitTreeState": "clean",
        "buildDate": "2026-04-22T00:00:00Z",
        "goVersion": "go1.26.2",
        "compiler": "gc",
        "platform": "linux/amd64",
    }


def _group_list() -> dict:
    groups: dict[str, list[str]] = {}
    for res in RESOURCES:
        if res.group:
            groups.setdefault(res.group, [])
            if res.version not in groups[res.group]:
                groups[res.group].append(res.version)
    return {
        "kind": "APIGroupList",
        "apiVersion": "v1",
        "groups": [
            {
                "name": group,
                "versions": [{"groupVersion": f"{group}/{v}", "version": v} for v in versions],
                "preferredVersion": {"groupVersion": f"{group}/{versions[0]}", "version": versions[0]},
            }
            for group, versions in groups.items()
        ],
    }


def _resource_list(group: str, version: str) -> dict:
    verbs = ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"]
    resources = []
    for res in RESOURCES:
        if (res.group, res.version) != (group, version):
            continue
        resources.append(
            {
                "name": res.plural,
                "singularName": res.kind.lower(),
                "namespaced": res.namespaced,
                "kind": res.kind,
                "verbs": verbs,
                **({"shortNames": list(res.short)} if res.short else {}),
            }
        )
        if res.has_status:
            resources.append(
                {
                    "name": f"{res.plural}/status",
                    "singularName": "",
                    "namespaced": res.namespaced,
                    "kind": res.kind,
                    "verbs": ["get", "patch", "update"],
                }
            )
        if res.kind == "Pod":
            for sub, kind, sub_verbs in (
                ("log", "Pod", ["get"]),
                ("exec", "PodExecOptions", ["create", "get"]),
                ("attach", "PodAttachOptions", ["create", "get"]),
                ("portforward", "PodPortForwardOptions", ["create", "get"]),
            ):
                resources.append(
                    {"name": f"pods/{sub}", "singularName": "", "namespaced": True, "kind": kind, "verbs": sub_verbs}
                )
    if not resources:
        raise ApiError(404, "NotFound", "the server could not find the requested resource")
    gv = f"{group}/{version}" if group else version
    return {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": resources}
