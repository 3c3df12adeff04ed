"""API tokens: the page where a user creates (shown once) and revokes theirs, and the one
function every token-authenticated entry point (REST API, WebSockets) uses to check one."""

from datetime import timedelta

from django import forms
from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.utils import timezone
from django.views.decorators.http import require_GET, require_POST

from projects import services
from projects.models import ApiToken

# last_used_at is advisory: writing it at most once a minute keeps a busy CLI (log follow,
# polling) from turning every read into a write.
TOUCH_INTERVAL = timedelta(seconds=60)


def authenticate_token(raw: str | None):
    """The active user owning this token, or None (unknown, revoked, expired or inactive user)."""
    if not raw:
        return None
    token = ApiToken.objects.active().select_related("user").filter(digest=ApiToken.digest_of(raw.strip())).first()
    if token is None or not token.user.is_active:
        return None
    if token.last_used_at is None or timezone.now() - token.last_used_at > TOUCH_INTERVAL:
        services.touch_api_token(token.pk)
    return token.user


def bearer_of(header: str | None) -> str | None:
    scheme, _, value = (header or "").partition(" ")
    return value.strip() or None if scheme.lower() == "bearer" else None


class TokenForm(forms.Form):
    expires_at = forms.DateTimeField(
        required=False,
        label="Expires",
        help_text="Optional. Leave empty for a token that never expires.",
        widget=forms.DateTimeInput(attrs={"type": "datetime-local"}),
    )

    def clean_expires_at(self):
        value = self.cleaned_data["expires_at"]
        if value and value <= timezone.now():
            raise forms.ValidationError("The expiry must be in the future.")
        return value


def _page(request: HttpRequest, form: TokenForm, raw: str | None = None, status: int = 200) -> HttpResponse:
    current = ApiToken.objects.active().filter(user=request.user).order_by("-created_at").first()
    return render(request, "projects/tokens.html", {"form": form, "token": current, "raw": raw}, status=status)


@login_required
@require_GET
def tokens(request: HttpRequest) -> HttpResponse:
    return _page(request, TokenForm())


@login_required
@require_POST
def create_token(request: HttpRequest) -> HttpResponse:
    form = TokenForm(request.POST)
    if not form.is_valid():
        return _page(request, form, status=400)
    raw = services.create_api_token(request.user, form.cleaned_data["expires_at"])
    # Rendered, not redirected: the clear token exists only in this one response.
    response = _page(request, TokenForm(), raw=raw)
    response["Cache-Control"] = "no-store"
    return response


@login_required
@require_POST
def revoke_token(request: HttpRequest) -> HttpResponse:
    services.revoke_api_token(request.user)
    return redirect("tokens")
