"""HTTP calls to the aichor API, with every failure turned into one readable line."""

import http.client
import io
import json
import os
import select
import socket
import ssl
import urllib.request
from base64 import b64encode
from collections.abc import Callable
from urllib.parse import unquote, urlencode, urlsplit

import certifi
import click
import requests

from aichor.cli import config

# How long to wait for the server's go-ahead (100 Continue) before sending a body regardless,
# as RFC 9110 allows for servers and proxies that never send one.
CONTINUE_TIMEOUT = 5


class CliError(click.ClickException):
    """Printed as one line (`Error: ...`), exit code 1."""


def server_url(value: str) -> str:
    """The server's address as given, refused up front when requests could only fail on it
    later with a message about its own internals ("No connection adapters were found")."""
    url = value.strip().rstrip("/")
    if "://" not in url:
        raise CliError(f"the server address {url} has no scheme: give it as --url https://{url} (or http://)")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise CliError(f"the server address {url} must start with https:// or http://")
    if not parts.hostname:
        raise CliError(f"the server address {url} names no host: give it as --url https://HOST")
    return url


class Client:
    def __init__(self, url: str | None = None, token: str | None = None) -> None:
        settings = config.load()
        self.url = server_url(url or settings.get("url") or config.DEFAULT_URL)
        self.token = token or settings.get("token")
        self.session = requests.Session()

    def _headers(self) -> dict:
        if not self.token:
            raise CliError("no API token configured: run `aichor auth key --apikey TOKEN`")
        return {"Authorization": f"Bearer {self.token}"}

    def request(self, method: str, path: str, *, not_found: str = "not found", **kwargs) -> requests.Response:
        kwargs.setdefault("timeout", (10, 300))
        try:
            headers = self._headers() | kwargs.pop("headers", {})
            response = self.session.request(method, f"{self.url}/api/v1{path}", headers=headers, **kwargs)
        except requests.exceptions.ConnectionError:
            raise CliError(f"cannot reach the aichor server at {self.url}") from None
        except requests.exceptions.Timeout:
            raise CliError(f"the aichor server at {self.url} did not answer in time") from None
        except requests.exceptions.RequestException as exc:
            raise CliError(f"request to {self.url} failed: {exc}") from None
        _raise_for(response.status_code, lambda: _detail(response), not_found)
        return response

    def get(self, path: str, **kwargs):
        return self.request("GET", path, **kwargs).json()

    def post(self, path: str, **kwargs):
        return self.request("POST", path, **kwargs).json()

    def upload(
        self,
        path: str,
        *,
        params: dict,
        length: int,
        content_type: str,
        send_body: Callable[[socket.socket], None],
        not_found: str = "not found",
    ):
        """POST a body of known `length` that `send_body` writes to the socket itself (files go
        out with sendfile; requests would copy each byte through Python). The request asks for
        the server's go-ahead first (Expect: 100-continue): a refusal (bad token, no project,
        over the size limit) arrives before any of the body is sent."""
        url = urlsplit(f"{self.url}/api/v1{path}?{urlencode(params)}")
        headers = self._headers() | {
            "Content-Type": content_type,
            "Content-Length": str(length),
            "Expect": "100-continue",
            "User-Agent": "aichor-cli",
        }
        conn, target, proxy_headers = _connection(url)
        try:
            conn.putrequest("POST", target, skip_accept_encoding=True)
            for name, value in (headers | proxy_headers).items():
                conn.putheader(name, value)
            conn.endheaders()
            head = _interim_answer(conn.sock)
            if head is None:
                try:
                    send_body(conn.sock)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # refused midway: the server's answer says why
                response = http.client.HTTPResponse(conn.sock, method="POST")
            else:
                response = http.client.HTTPResponse(_Replay(head, conn.sock), method="POST")
            response.begin()
            body = response.read()
        except TimeoutError:
            raise CliError(f"the aichor server at {self.url} did not answer in time") from None
        except (OSError, http.client.HTTPException) as exc:
            if isinstance(exc, ssl.SSLError):
                raise CliError(f"TLS with {self.url} failed: {exc}") from None
            raise CliError(f"cannot reach the aichor server at {self.url}") from None
        finally:
            conn.close()
        _raise_for(response.status, lambda: _detail_of(body, response.reason), not_found)
        return json.loads(body)


def _raise_for(status: int, detail: Callable[[], str], not_found: str) -> None:
    if status == 401:
        raise CliError("the API token is invalid, expired or revoked: create one and run `aichor auth key`")
    if status == 404:
        raise CliError(not_found)
    if status >= 400:
        raise CliError(f"{detail()} (HTTP {status})")


def _connection(url) -> tuple[http.client.HTTPConnection, str, dict]:
    """A connection for `url`, the request target and headers for the proxy, through the proxy
    the environment names (HTTPS_PROXY, HTTP_PROXY, NO_PROXY), as requests would."""
    https = url.scheme == "https"
    host, port = url.hostname or "", url.port or (443 if https else 80)
    target = url.path + (f"?{url.query}" if url.query else "")
    context = None
    if https:
        # The CA bundle requests uses, so both paths of the CLI trust the same servers.
        cafile = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") or certifi.where()
        context = ssl.create_default_context(cafile=cafile)
    proxy = urllib.request.getproxies().get(url.scheme)
    if not proxy or urllib.request.proxy_bypass(host):
        if https:
            return http.client.HTTPSConnection(host, port, timeout=300, context=context), target, {}
        return http.client.HTTPConnection(host, port, timeout=300), target, {}
    via = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    auth = {}
    if via.username:
        pair = f"{unquote(via.username)}:{unquote(via.password or '')}".encode()
        auth = {"Proxy-Authorization": "Basic " + b64encode(pair).decode()}
    if https:
        conn = http.client.HTTPSConnection(via.hostname, via.port or 8080, timeout=300, context=context)
        conn.set_tunnel(host, port, headers=auth)
        return conn, target, {}
    # Plain HTTP through a proxy: the absolute URL as the target, the credentials as a header.
    return (
        http.client.HTTPConnection(via.hostname, via.port or 8080, timeout=300),
        f"http://{host}:{port}{target}",
        auth,
    )


def _interim_answer(sock: socket.socket) -> bytes | None:
    """None when the server says go on (100 Continue) or stays silent; else the head of its
    final answer, read so far. Read a byte at a time: nothing past the head may be taken from
    the socket, and a head is a few dozen bytes."""
    pending = isinstance(sock, ssl.SSLSocket) and sock.pending()
    if not pending and not select.select([sock], [], [], CONTINUE_TIMEOUT)[0]:
        return None
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        byte = sock.recv(1)
        if not byte:
            break  # closed: the response parser reports it
        head += byte
    return None if head.split(b" ", 2)[1:2] == [b"100"] else head


class _Replay(io.RawIOBase):
    """A socket whose first bytes were already read: http.client parses the answer from here."""

    def __init__(self, head: bytes, sock: socket.socket) -> None:
        self.head, self.sock = head, sock

    def makefile(self, mode: str):
        return io.BufferedReader(self)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if self.head:
            n = min(len(buffer), len(self.head))
            buffer[:n], self.head = self.head[:n], self.head[n:]
            return n
        return self.sock.recv_into(buffer)


def _detail_of(body: bytes, reason: str) -> str:
    try:
        detail = json.loads(body).get("detail")
    except (ValueError, AttributeError):
        text = body.decode(errors="replace").strip()
        return text.splitlines()[0] if text else reason
    return _describe(detail)


def _detail(response: requests.Response) -> str:
    return _detail_of(response.content, response.reason)


def _describe(detail) -> str:
    if isinstance(detail, list):  # validation errors: [{"loc": [...], "msg": ...}]
        return "; ".join(f"{'.'.join(str(p) for p in d.get('loc', [])[1:])}: {d.get('msg')}" for d in detail)
    return str(detail)
