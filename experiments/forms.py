from datetime import datetime
from uuid import UUID

from django import forms

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
