"""Persistent Volume Claim records (SPEC §6), managed by project admins. Experiments mount them
with spec.storage.attachExistingPVCs. Each record is a claim on its engine's cluster: the
services announce creation and deletion (projects/signals.py) and the Kubernetes side acts."""

from django import forms
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_http_methods, require_POST

from projects import signals
from projects.access import get_project
from projects.models import Engine, PersistentVolumeClaim, Project
from projects.services import create_pvc, delete_pvc


class PvcForm(forms.ModelForm):
    class Meta:
        model = PersistentVolumeClaim
        fields = ["name", "size_mib", "engine", "storage_class", "access_mode"]
        labels = {"size_mib": "Size (MiB)"}
        help_texts = {
            "name": "Lowercase letters, digits and '-', starting and ending with a letter or digit; at most 64.",
            "storage_class": "Empty: the engine's default storage class, else the cluster's.",
        }

    def __init__(self, *args, project: Project, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.project = project
        # Only Kubernetes engines enabled for this project can hold a PVC.
        self.fields["engine"].queryset = project.engines.filter(kind=Engine.Kind.KUBERNETES)
        self.fields["engine"].empty_label = None

    def clean_name(self) -> str:
        name = self.cleaned_data["name"]
        if PersistentVolumeClaim.objects.filter(project=self.project, name=name).exists():
            raise forms.ValidationError("This project already has a PVC with this name.")
        return name


def _admin_project(request: HttpRequest, slug: str) -> Project:
    project, _ = get_project(request.user, slug, admin=True)
    return project


@login_required
@require_http_methods(["GET", "POST"])
def pvcs(request: HttpRequest, slug: str) -> HttpResponse:
    project = _admin_project(request, slug)
    form = PvcForm(request.POST or None, project=project)
    if request.method == "POST" and form.is_valid() and create_pvc(project, form):
        return redirect("pvc-list", slug=project.slug)
    records = list(project.pvcs.select_related("engine"))
    phases = claim_phases(project, records)
    context = {
        "project": project,
        "section": "details",
        "form": form,
        "pvcs": [(pvc, phases.get(pvc.pk, "")) for pvc in records],
        "unreachable": sorted({pvc.engine.name for pvc in records if phases.get(pvc.pk) == signals.UNREACHABLE}),
        "has_kubernetes": project.engines.filter(kind=Engine.Kind.KUBERNETES).exists(),
    }
    return render(request, "projects/pvcs.html", context, status=400 if form.errors else 200)


@login_required
@require_POST
def pvc_delete(request: HttpRequest, slug: str, pk: int) -> HttpResponse:
    project = _admin_project(request, slug)
    get_object_or_404(PersistentVolumeClaim, project=project, pk=pk)
    refused = delete_pvc(project, pk)
    if refused:
        messages.error(request, refused)
    return redirect("pvc-list", slug=project.slug)


def claim_phases(project: Project, pvcs: list[PersistentVolumeClaim]) -> dict[int, str]:
    """The phase of each record's claim, read live from its cluster, by record pk."""
    found: dict[int, str] = {}
    for _receiver, answer in signals.pvc_phases.send(sender=PersistentVolumeClaim, project=project, pvcs=pvcs):
        found.update(answer or {})
    return found
