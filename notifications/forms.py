from django import forms
from django.core.validators import URLValidator

from aichor.lib import outbound
from experiments.signals import EVENTS
from notifications.models import EmailPreference, Endpoint, GitHost

HTTP_ONLY = URLValidator(schemes=["http", "https"], message="Enter an http:// or https:// URL.")


def reachable(url: str) -> None:
    """The server only sends to public addresses (aichor.lib.outbound): say so on save."""
    try:
        outbound.check_url(url)
    except outbound.InternalAddress as exc:
        raise forms.ValidationError(str(exc)[0].upper() + str(exc)[1:] + ".") from None


EVENT_LABELS = {
    "created": "created",
    "running": "started running",
    "succeeded": "succeeded",
    "failed": "failed",
    "cancelled": "cancelled",
}


class GitHostForm(forms.Form):
    kind = forms.ChoiceField(label="Git host", choices=GitHost.Kind.choices, required=False)
    api_url = forms.CharField(
        label="API base URL",
        required=False,
        max_length=500,
        validators=[HTTP_ONLY, reachable],
        help_text="Empty: https://api.github.com or https://gitlab.com/api/v4 (or the repository's own host). "
        "GitHub Enterprise: https://HOST/api/v3; self-hosted GitLab: https://HOST/api/v4.",
    )
    repository = forms.RegexField(
        regex=r"^(\d+|[\w.-]+(/[\w.-]+)+)$",
        required=False,
        max_length=300,
        help_text="owner/name (GitHub), group/name or the project id (GitLab). Empty: read from the repository URL.",
        error_messages={"invalid": "owner/name, group/sub/name, or a numeric project id."},
    )
    token = forms.CharField(
        required=False,
        max_length=500,
        strip=True,
        widget=forms.PasswordInput(render_value=False, attrs={"autocomplete": "off"}),
        help_text="GitHub: a fine-grained token with Commit statuses: write. GitLab: a project access token with "
        "the api scope (Developer role). Encrypted at rest, never shown again; empty keeps the current one.",
    )


class EndpointForm(forms.Form):
    url = forms.CharField(label="URL", max_length=500, validators=[HTTP_ONLY, reachable])
    events = forms.MultipleChoiceField(
        choices=[(event, EVENT_LABELS[event]) for event in EVENTS], widget=forms.CheckboxSelectMultiple
    )
    format = forms.ChoiceField(choices=Endpoint.Format.choices, initial=Endpoint.Format.JSON)
    secret = forms.CharField(
        min_length=16,
        max_length=200,
        widget=forms.PasswordInput(render_value=False, attrs={"autocomplete": "off"}),
        help_text="At least 16 characters. Bodies are signed with it: X-Aichor-Signature-256: sha256=HMAC-SHA256(body).",
    )


class EmailPreferenceForm(forms.ModelForm):
    class Meta:
        model = EmailPreference
        fields = ["on_succeeded", "on_failed"]
