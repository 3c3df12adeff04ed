"""Read-only views for organisation admins (project admins hold no Django permission on these
models, so the admin hides them; they use the project's notification settings page)."""

from django.contrib import admin

from notifications.models import CommitStatus, Delivery, EmailPreference, Endpoint, GitHost


class ReadOnlyAdmin(admin.ModelAdmin):
    def has_add_permission(self, request, obj=None) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False


@admin.register(GitHost)
class GitHostAdmin(ReadOnlyAdmin):
    list_display = ["project", "kind", "api_url", "repository", "token_ending", "updated_at"]
    # token_encrypted is not editable, so never shown.


@admin.register(CommitStatus)
class CommitStatusAdmin(ReadOnlyAdmin):
    list_display = ["experiment", "project", "seq", "posted_seq", "posted_state", "error", "error_at"]
    list_filter = ["project"]


@admin.register(Endpoint)
class EndpointAdmin(ReadOnlyAdmin):
    list_display = ["url", "project", "format", "events", "created_at"]
    list_filter = ["project"]


@admin.register(Delivery)
class DeliveryAdmin(ReadOnlyAdmin):
    list_display = ["id", "endpoint", "event", "state", "attempts", "response_code", "created_at"]
    list_filter = ["state", "event"]


@admin.register(EmailPreference)
class EmailPreferenceAdmin(ReadOnlyAdmin):
    list_display = ["user", "on_succeeded", "on_failed"]
