"""Django admin: organisation admins (superusers) manage everything; a project admin manages
their own projects (settings, engines, members) and sees nothing of other projects (SPEC §1)."""

from django import forms
from django.contrib import admin, messages
from django.contrib.auth import get_user_model
from django.db import models
from django.db.models import QuerySet
from django.http import HttpRequest
from django.utils.html import format_html
from django.utils.safestring import mark_safe

from projects.models import Engine, Membership, Project
from projects.services import create_project

HOST_NETWORK_WARNING = (
    "This engine runs workloads and builds on the Docker host's own network (network: host): every "
    "member's code can reach the services listening on that host (databases, Redis, metadata "
    "endpoints). Use a Docker network (bridge) unless this host runs nothing else."
)
LOCAL_ENGINE_WARNING = (
    "A local engine runs workloads as the server's own user, on the server's own host: every "
    "member's code can read what the server can. It exists only when AICHOR_LOCAL_ENGINE=true "
    "(the embedded default of make run); use it to try aichor on a laptop, never for a shared server."
)


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


def colleague_emails(user) -> list[str]:
    """E-mails a member picker may suggest: everyone for an organisation admin, otherwise only
    the people who already share a project with `user` (the organisation's directory is not
    a project admin's to browse)."""
    User = get_user_model()
    users = User.objects.filter(is_active=True).exclude(email="")
    if not user.is_superuser:
        users = users.filter(memberships__project__memberships__user=user)
    return sorted(set(users.values_list("email", flat=True)))


class EmailPicker(forms.EmailInput):
    """A plain e-mail box whose suggestions (a <datalist>) come from colleague_emails."""

    def __init__(self, suggestions: list[str], attrs=None) -> None:
        super().__init__(attrs)
        self.suggestions = suggestions

    def render(self, name, value, attrs=None, renderer=None) -> str:
        list_id = f"{(attrs or {}).get('id') or name}_suggestions"
        box = super().render(name, value, {**(attrs or {}), "list": list_id, "autocomplete": "off"}, renderer)
        options = "".join(format_html('<option value="{}">', email) for email in self.suggestions)
        return box + format_html('<datalist id="{}">', list_id) + mark_safe(options) + mark_safe("</datalist>")


class MembershipForm(forms.ModelForm):
    """A member is added by their exact e-mail, never picked from a list of every user."""

    email = forms.EmailField(label="E-mail", help_text="The exact e-mail the person logs in with.")
    # Set per request on a subclass (MembershipInline.get_formset), never on this shared class.
    suggestions: list[str] = []

    class Meta:
        model = Membership
        fields = ["email", "role"]

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.fields["email"].widget = EmailPicker(self.suggestions)
        if self.instance.pk:
            self.fields["email"].initial = self.instance.user.email

    def clean_email(self) -> str:
        email = self.cleaned_data["email"].strip()
        matches = list(get_user_model().objects.filter(email__iexact=email, is_active=True)[:2])
        if len(matches) != 1:
            # The same answer for no user and for an ambiguous address: nothing to enumerate.
            raise forms.ValidationError(f"No user with the e-mail {email}.")
        user = matches[0]
        project_id = self.instance.project_id
        if project_id and (
            Membership.objects.filter(project_id=project_id, user=user).exclude(pk=self.instance.pk).exists()
        ):
            raise forms.ValidationError(f"{email} is already a member of this project.")
        self.instance.user = user
        return email


class MembershipInline(admin.TabularInline):
    model = Membership
    form = MembershipForm
    extra = 1

    def get_formset(self, request: HttpRequest, obj=None, **kwargs):
        kwargs["form"] = type("MembershipForm", (MembershipForm,), {"suggestions": colleague_emails(request.user)})
        return super().get_formset(request, obj, **kwargs)

    def get_queryset(self, request: HttpRequest) -> QuerySet:
        return super().get_queryset(request).select_related("user")

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
        if change:
            super().save_model(request, obj, form, change)
            return
        # A new project gets what every project gets (namespace, secret, buckets) from the one
        # service; `obj` then becomes that row, as the member inlines save against `obj`.
        project = create_project(
            name=obj.name,
            slug=obj.slug,
            repo_clone_url=obj.repo_clone_url,
            repo_web_url=obj.repo_web_url,
            engines=form.cleaned_data.get("engines") or (),
            default_engine=obj.default_engine,
        )
        obj.pk, obj._state.adding = project.pk, False
        obj.refresh_from_db()


@admin.register(Engine)
class EngineAdmin(admin.ModelAdmin):
    # Engines are the organisation's: only superusers (Django permissions) manage them.
    list_display = ("name", "kind", "created_at")
    list_filter = ("kind",)

    def formfield_for_dbfield(self, db_field, request, **kwargs):
        field = super().formfield_for_dbfield(db_field, request, **kwargs)
        if db_field.name == "config":
            field.help_text = (
                'Docker: {"docker_host": "tcp://…", "network": "bridge"}. `network` is the Docker network '
                "every experiment's shared namespace and every build joins (default bridge); "
                "`host` puts workloads on this Docker host's own network."
            )
        return field

    def render_change_form(self, request: HttpRequest, context, add=False, change=False, form_url="", obj=None):
        if obj is not None and obj.kind == Engine.Kind.DOCKER and (obj.config or {}).get("network") == "host":
            messages.warning(request, HOST_NETWORK_WARNING)
        if obj is not None and obj.kind == Engine.Kind.LOCAL:
            messages.warning(request, LOCAL_ENGINE_WARNING)
        return super().render_change_form(request, context, add=add, change=change, form_url=form_url, obj=obj)
