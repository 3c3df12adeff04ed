"""HTTP requests to addresses members give (notification endpoints, a Git host's API URL).

A member must never reach the server itself or its network through them: a notification endpoint
at http://127.0.0.1:6379/ or http://169.254.169.254/ (a cloud's metadata service) would turn the
server into the member's client. Only public (globally routable) addresses are reached, plus the
networks an operator lists in AICHOR_OUTBOUND_ALLOW_NETWORKS (e.g. `10.0.0.0/8` for a Git host
on the company network). The address is checked twice: when the URL is saved (a clear form
error), and on the connected socket before a byte is sent, so a name that resolves differently
later (DNS rebinding) cannot slip through.

Requests through a proxy (HTTPS_PROXY…) are not checked here: the proxy decides where they go."""

import ipaddress
import socket
from functools import lru_cache
from urllib.parse import urlsplit

import requests
from django.conf import settings
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


class InternalAddress(OSError):
    """The URL leads to an address members may not reach (requests reports it as a
    ConnectionError: nothing was sent)."""


@lru_cache(maxsize=8)
def _networks(spec: str) -> tuple:
    return tuple(ipaddress.ip_network(part.strip(), strict=False) for part in spec.split(",") if part.strip())


def allowed(address: str | Address) -> bool:
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped  # ::ffff:127.0.0.1 is loopback too
    if any(ip in network for network in _networks(settings.OUTBOUND_ALLOW_NETWORKS)):
        return True
    return ip.is_global and not ip.is_multicast


def check_url(url: str) -> None:
    """Raise InternalAddress, with a sentence a member understands, when the URL's host resolves
    to an address outside what members may reach. A host that does not resolve passes: delivery
    will report it unreachable, and the address is checked again then."""
    host = urlsplit(url).hostname
    if not host:
        return
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        return
    for *_, sockaddr in infos:
        if not allowed(sockaddr[0]):
            where = host if host == sockaddr[0] else f"{host} resolves to {sockaddr[0]}, which"
            raise InternalAddress(
                f"{where} is an address internal to the server's network; "
                "the server does not send requests there (an operator can allow a network with "
                "AICHOR_OUTBOUND_ALLOW_NETWORKS)"
            )


def refused(exc: BaseException) -> bool:
    """Whether a requests exception comes from InternalAddress (urllib3 wraps it twice)."""
    todo, seen = [exc], set()
    while todo:
        error = todo.pop()
        if isinstance(error, InternalAddress):
            return True
        if id(error) in seen:
            continue
        seen.add(id(error))
        todo += [arg for arg in getattr(error, "args", ()) if isinstance(arg, BaseException)]
        todo += [
            value
            for value in (getattr(error, "reason", None), error.__cause__, error.__context__)
            if isinstance(value, BaseException)
        ]
    return False


def _checked(sock: socket.socket, host: str) -> socket.socket:
    peer = sock.getpeername()[0]
    if not allowed(peer):
        sock.close()
        raise InternalAddress(f"{host} resolved to {peer}, an address internal to the server's network")
    return sock


class _HTTPConnection(HTTPConnection):
    def _new_conn(self) -> socket.socket:
        return _checked(super()._new_conn(), self.host)


class _HTTPSConnection(HTTPSConnection):
    def _new_conn(self) -> socket.socket:
        return _checked(super()._new_conn(), self.host)


class _HTTPPool(HTTPConnectionPool):
    ConnectionCls = _HTTPConnection


class _HTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _HTTPSConnection


class _Adapter(HTTPAdapter):
    def init_poolmanager(self, *args, **kwargs) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {"http": _HTTPPool, "https": _HTTPSPool}


def post(url: str, **kwargs) -> requests.Response:
    """requests.post that connects to allowed addresses only (see the module's docstring)."""
    with requests.Session() as session:
        session.mount("http://", _Adapter())
        session.mount("https://", _Adapter())
        return session.post(url, **kwargs)
