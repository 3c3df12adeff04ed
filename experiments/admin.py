"""Experiments in the Django admin: read-only history, scoped like projects (a project admin sees
only their projects' experiments). State changes go through the dashboard's services."""

from django.contrib import admin
from django.http import HttpRequest

from experiments.models import Event, Experiment, Step
from projects.admin import ProjectScopedAdmin


class StepInline(admin.TabularInline):
    model = Step
    fields = ("name", "status", "started_at", "ended_at")
    readonly_fields = fields
    extra = 0
    can_delete = False

    def has_add_permission(self, request: HttpRequest, obj=None) -> bool:
        return False

    def has_view_permission(self, request: HttpRequest, obj=None) -> bool:
        return True  # shown only inside an experiment the user may view

    def has_change_permission(self, request: HttpRequest, obj=None) -> bool:
        return False


class EventInline(StepInline):
    model = Event
    fields = ("created_at", "kind", "step", "old", "new", "reason", "actor")
    readonly_fields = fields


@admin.register(Experiment)
class ExperimentAdmin(ProjectScopedAdmin):
    list_display = ("short_id", "project", "engine", "status", "current_step", "author_name", "created_at")
    list_select_related = ("project", "engine")
    search_fields = ("message", "commit_sha", "author_name")
    date_hierarchy = None
    inlines = [StepInline, EventInline]
    # Counting a million rows on every page is what makes admin lists slow.
    show_full_result_count = False
    readonly_fields = [f.name for f in Experiment._meta.fields]

    def get_list_filter(self, request: HttpRequest) -> tuple:
        # A project filter would list every project's name: superusers only.
        return ("status", "project", "engine") if request.user.is_superuser else ("status",)

    def has_change_permission(self, request: HttpRequest, obj=None) -> bool:
        return False
