"""HTTP calls to the aichor API, with every failure turned into one readable line."""

import click
import requests

from aichor.cli import config


class CliError(click.ClickException):
    """Printed as one line (`Error: ...`), exit code 1."""


class Client:
    def __init__(self, url: str | None = None, token: str | None = None) -> None:
        settings = config.load()
        self.url = (url or settings.get("url") or config.DEFAULT_URL).rstrip("/")
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
        if response.status_code == 401:
            raise CliError("the API token is invalid, expired or revoked: create one and run `aichor auth key`")
        if response.status_code == 404:
            raise CliError(not_found)
        if response.status_code >= 400:
            raise CliError(f"{_detail(response)} (HTTP {response.status_code})")
        return response

    def get(self, path: str, **kwargs):
        return self.request("GET", path, **kwargs).json()

    def post(self, path: str, **kwargs):
        return self.request("POST", path, **kwargs).json()


def _detail(response: requests.Response) -> str:
    try:
        detail = response.json().get("detail")
    except ValueError:
        return response.text.strip().splitlines()[0] if response.text.strip() else response.reason
    if isinstance(detail, list):  # validation errors: [{"loc": [...], "msg": ...}]
        return "; ".join(f"{'.'.join(str(p) for p in d.get('loc', [])[1:])}: {d.get('msg')}" for d in detail)
    return str(detail)
