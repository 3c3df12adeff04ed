"""API tokens: the page where a user creates (shown once) and revokes theirs, and the one
function every token-authenticated entry point (REST API, WebSockets) uses to check one."""

from datetime import timedelta

from django import forms
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.utils import timezone
from django.views.decorators.http import require_GET, require_POST

from aichor.lib.crypto import decrypt, encrypt
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
    name = forms.CharField(
        max_length=64,
        help_text="What uses it, e.g. “laptop” or “CI”.",
        widget=forms.TextInput(attrs={"autofocus": True}),
    )
    expires_at = forms.DateTimeField(
        required=False,
        label="Expires",
        help_text="Optional. Leave empty for a token that never expires.",
        widget=forms.DateTimeInput(attrs={"type": "datetime-local"}),
    )

    def __init__(self, *args, user, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.user = user

    def clean_name(self) -> str:
        name = self.cleaned_data["name"].strip()
        if ApiToken.objects.filter(user=self.user, name=name, revoked_at__isnull=True).exists():
            raise forms.ValidationError("You already have a token with this name: revoke it or pick another name.")
        return name

    def clean_expires_at(self):
        value = self.cleaned_data["expires_at"]
        if value and value <= timezone.now():
            raise forms.ValidationError("The expiry must be in the future.")
        return value


# The clear token waits in the session, encrypted, for exactly one GET after the creating POST.
NEW_TOKEN_KEY = "new_api_token"


def _page(request: HttpRequest, form: TokenForm, new: dict | None = None, status: int = 200) -> HttpResponse:
    # Revoked tokens are gone for good; expired ones stay listed so "why does CI fail" shows.
    tokens = ApiToken.objects.filter(user=request.user, revoked_at__isnull=True).order_by("-created_at")
    response = render(
        request,
        "projects/tokens.html",
        {"form": form, "tokens": tokens, "new": new, "section": "tokens"},
        status=status,
    )
    response["Cache-Control"] = "no-store"
    return response


@login_required
@require_GET
def tokens(request: HttpRequest) -> HttpResponse:
    new = request.session.pop(NEW_TOKEN_KEY, None)
    if new:
        new = {"name": new["name"], "raw": decrypt(new["raw"])}
    return _page(request, TokenForm(user=request.user), new)


@login_required
@require_POST
def create_token(request: HttpRequest) -> HttpResponse:
    form = TokenForm(request.POST, user=request.user)
    if not form.is_valid():
        return _page(request, form, status=400)
    name = form.cleaned_data["name"]
    raw = services.create_api_token(request.user, form.cleaned_data["expires_at"], name=name)
    # Redirected, so a refresh neither re-posts (minting another) nor shows the token again.
    request.session[NEW_TOKEN_KEY] = {"name": name, "raw": encrypt(raw)}
    return redirect("tokens")


@login_required
@require_POST
def revoke_token(request: HttpRequest, pk: int) -> HttpResponse:
    if not services.revoke_api_token(request.user, pk):
        raise Http404("No such token")
    messages.success(request, "Token revoked.")
    return redirect("tokens")
