"""Django admin: organisation admins (superusers) manage everything; a project admin manages
their own projects (settings, engines, members) and sees nothing of other projects (SPEC §1)."""

import secrets

from django.contrib import admin
from django.db import models
from django.db.models import QuerySet
from django.http import HttpRequest

from aichor.lib.crypto import encrypt
from projects.models import Engine, Membership, Project, new_namespace


def admin_project_ids(user) -> QuerySet:
    return Membership.objects.filter(user=user, role=Membership.Role.ADMIN).values("project_id")


def is_project_admin(user) -> bool:
    return user.is_active and user.is_authenticated and admin_project_ids(user).exists()


def manages(user, project_id) -> bool:
    return user.is_superuser or admin_project_ids(user).filter(project_id=project_id).exists()


_staff_only = admin.site.has_permission


def _has_permission(request: HttpRequest) -> bool:
    # Project admins use the admin without being Django staff; every ModelAdmin below scopes
    # them to their own projects, and models they hold no Django permission on stay hidden.
    return _staff_only(request) or is_project_admin(request.user)


admin.site.has_permission = _has_permission
admin.site.site_header = "aichor administration"
admin.site.site_title = "aichor admin"
admin.site.site_url = "/"


class ProjectScopedAdmin(admin.ModelAdmin):
    """Rights from project membership (role admin), not from Django model permissions."""

    project_field = "project"

    def get_queryset(self, request: HttpRequest) -> QuerySet:
        qs = super().get_queryset(request)
        if request.user.is_superuser:
            return qs
        return qs.filter(**{f"{self.project_field}__in": admin_project_ids(request.user)})

    def _project_id(self, obj) -> int:
        return obj.pk if self.project_field == "id" else getattr(obj, f"{self.project_field}_id")

    def has_module_permission(self, request: HttpRequest) -> bool:
        return request.user.is_superuser or is_project_admin(request.user)

    def has_view_permission(self, request: HttpRequest, obj=None) -> bool:
        if request.user.is_superuser:
            return True
        return is_project_admin(request.user) if obj is None else manages(request.user, self._project_id(obj))

    def has_change_permission(self, request: HttpRequest, obj=None) -> bool:
        return self.has_view_permission(request, obj)

    def has_add_permission(self, request: HttpRequest, obj=None) -> bool:
        return request.user.is_superuser

    def has_delete_permission(self, request: HttpRequest, obj=None) -> bool:
        return request.user.is_superuser


class MembershipInline(admin.TabularInline):
    model = Membership
    extra = 1

    # Inline rights follow the project's: a project admin manages its members.
    def has_view_permission(self, request: HttpRequest, obj=None) -> bool:
        return obj is None or manages(request.user, obj.pk)

    has_change_permission = has_add_permission = has_delete_permission = has_view_permission


@admin.register(Project)
class ProjectAdmin(ProjectScopedAdmin):
    project_field = "id"
    list_display = ("name", "slug", "namespace", "default_engine")
    search_fields = ("name", "slug")
    filter_horizontal = ("engines",)
    inlines = [MembershipInline]
    formfield_overrides = {models.URLField: {"assume_scheme": "https"}}

    def get_fields(self, request: HttpRequest, obj=None) -> list[str]:
        return ["name", "slug", "namespace", "repo_clone_url", "repo_web_url", "engines", "default_engine"]

    def get_readonly_fields(self, request: HttpRequest, obj=None) -> tuple[str, ...]:
        # The slug names the webhook URLs and the namespace names buckets: fixed once created.
        return ("namespace", "slug") if obj else ("namespace",)

    def save_model(self, request: HttpRequest, obj: Project, form, change: bool) -> None:
        if not change:
            obj.namespace = new_namespace(obj.slug)
            obj.webhook_secret_encrypted = encrypt(secrets.token_hex(20))
        super().save_model(request, obj, form, change)


@admin.register(Engine)
class EngineAdmin(admin.ModelAdmin):
    # Engines are the organisation's: only superusers (Django permissions) manage them.
    list_display = ("name", "kind", "created_at")
    list_filter = ("kind",)
