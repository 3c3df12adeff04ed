"""The REST API (/api/v1/): what the `aichor` CLI talks to. Token-authenticated
(`Authorization: Bearer <token>`); a logged-in browser session may read (GET) too. Every
protected object comes through projects.access, so an outsider gets 404, never 403."""

from django.conf import settings
from django.http import HttpRequest
from ninja import NinjaAPI
from ninja.security import APIKeyCookie, HttpBearer

from experiments.api import router as experiments_router
from experiments.services import ExperimentError
from experiments.upload_api import router as upload_router
from metrics.api import router as metrics_router
from projects.api import router as projects_router
from projects.tokens import authenticate_token


class TokenAuth(HttpBearer):
    def authenticate(self, request: HttpRequest, token: str):
        user = authenticate_token(token)
        if user is not None:
            # Services record the actor from request.user, as for the dashboard.
            request.user = user
        return user


class ReadOnlySessionAuth(APIKeyCookie):
    """The dashboard's session may read; writes need a token (no CSRF dance for the CLI)."""

    param_name = settings.SESSION_COOKIE_NAME

    def __call__(self, request: HttpRequest):
        if request.method not in ("GET", "HEAD"):
            return None
        return super().__call__(request)

    def authenticate(self, request: HttpRequest, key: str | None):
        return request.user if request.user.is_authenticated else None


api = NinjaAPI(
    title="aichor API",
    version="1",
    description="Projects, engines and experiments of an aichor server. Authenticate with "
    "`Authorization: Bearer <token>` (create one on the API token page).",
    auth=[TokenAuth(), ReadOnlySessionAuth(csrf=False)],
    urls_namespace="api",
)
api.add_router("/", projects_router)
api.add_router("/", experiments_router)
# After the experiments' own routes, as when they were mounted inside them.
api.add_router("/", metrics_router)
api.add_router("/", upload_router)


@api.exception_handler(ExperimentError)
def experiment_error(request: HttpRequest, exc: ExperimentError):
    return api.create_response(request, {"detail": str(exc)}, status=409)
