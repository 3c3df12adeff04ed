"""Project variables (SPEC §7): runtime ones reach every process's environment, build-time ones
the image build. Members manage them; sensitive values are never shown again."""

from django import forms
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_http_methods, require_POST

from aichor.lib.variables import PROTECTED_VARS
from projects.access import get_project
from projects.models import ProjectVariable
from projects.services import delete_variable, set_variable


class VariableForm(forms.Form):
    name = forms.RegexField(
        regex=r"^[A-Za-z_][A-Za-z0-9_]*$",
        max_length=128,
        error_messages={"invalid": "Letters, digits and _, not starting with a digit."},
    )
    kind = forms.ChoiceField(choices=ProjectVariable.Kind.choices, initial=ProjectVariable.Kind.RUNTIME)
    value = forms.CharField(widget=forms.Textarea(attrs={"rows": 2}), required=False, strip=False)
    sensitive = forms.BooleanField(required=False, help_text="Encrypted at rest and never shown again.")

    def clean_name(self) -> str:
        name = self.cleaned_data["name"]
        if name in PROTECTED_VARS:
            raise forms.ValidationError(f"{name} is set by aichor and cannot be overridden.")
        return name


@login_required
@require_http_methods(["GET", "POST"])
def variables(request: HttpRequest, slug: str) -> HttpResponse:
    project, _ = get_project(request.user, slug)
    form = VariableForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        set_variable(project, **form.cleaned_data)
        messages.success(request, f"Variable {form.cleaned_data['name']} saved.")
        return redirect("variables", slug=project.slug)
    context = {"project": project, "section": "details", "form": form, "variables": project.variables.all()}
    return render(request, "projects/variables.html", context, status=400 if form.errors else 200)


@login_required
@require_POST
def variable_delete(request: HttpRequest, slug: str, pk: int) -> HttpResponse:
    project, _ = get_project(request.user, slug)
    if not delete_variable(project, pk):
        raise Http404("No such variable")
    return redirect("variables", slug=project.slug)
