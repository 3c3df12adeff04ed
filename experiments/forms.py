from datetime import datetime
from uuid import UUID

from django import forms

from experiments.api import check_manifest_path
from experiments.models import Status


class ExperimentFilterForm(forms.Form):
    status = forms.ChoiceField(choices=[("", "Any status"), *Status.choices], required=False)
    author = forms.CharField(required=False, max_length=255)
    q = forms.CharField(required=False, max_length=200, label="Search")
    # Keyset cursor "<created_at ISO>_<id>": the last row of the previous page. An offset would
    # make page 10 000 of a million rows scan 500 000 of them.
    before = forms.CharField(required=False, max_length=100, widget=forms.HiddenInput)

    def clean_before(self) -> tuple[datetime, UUID] | None:
        value = self.cleaned_data["before"]
        if not value:
            return None
        try:
            created, _, pk = value.rpartition("_")
            return datetime.fromisoformat(created), UUID(pk)
        except ValueError:
            raise forms.ValidationError("not a page cursor") from None


class LogSearchForm(forms.Form):
    stream = forms.CharField(max_length=100)
    q = forms.CharField(max_length=200, strip=False)


class LogRangeForm(forms.Form):
    stream = forms.CharField(max_length=100)
    start = forms.IntegerField(min_value=0, required=False)
    end = forms.IntegerField(min_value=0, required=False)


class NewExperimentForm(forms.Form):
    """Run a pushed commit from the dashboard, as `aichor experiments submit commit-sha` does."""

    branch = forms.ChoiceField()
    commit = forms.RegexField(
        regex=r"^[0-9a-fA-F]{7,64}$",
        required=False,
        max_length=64,
        help_text="Optional: a commit on this branch. Empty: its latest commit.",
        error_messages={"invalid": "A commit sha is 7 to 64 hexadecimal characters."},
        widget=forms.TextInput(attrs={"placeholder": "latest commit of the branch", "class": "mono", "size": 20}),
    )
    manifest_path = forms.CharField(label="Manifest", max_length=500)
    engine = forms.ChoiceField(required=False)  # the project's default when not sent
    message = forms.CharField(required=False, max_length=10000, widget=forms.TextInput(attrs={"size": 50}))

    def __init__(self, *args, branches: list[str], engines: list, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.fields["branch"].choices = [(b, b) for b in branches]
        self.fields["engine"].choices = [(e.name, f"{e.name} ({e.kind})") for e in engines]

    def offer_manifests(self, manifests: list[str]) -> None:
        """A choice of the manifests at the branch's head; a text box when it has none."""
        field = self.fields["manifest_path"]
        if manifests:
            field.widget = forms.Select(choices=[(m, m) for m in manifests])
        else:
            field.help_text = "No manifest at the branch's head: type its path."

    def clean_manifest_path(self) -> str:
        try:
            return check_manifest_path(self.cleaned_data["manifest_path"])
        except ValueError as exc:
            raise forms.ValidationError(str(exc)) from None

    def clean_commit(self) -> str:
        return self.cleaned_data["commit"].lower()
