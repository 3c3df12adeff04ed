from django import template

from notifications import services
from notifications.models import GitHost

register = template.Library()


@register.inclusion_tag("notifications/_card.html")
def notifications_card(project, is_admin: bool) -> dict:
    """The project page's notifications card: projects/views.py knows nothing of this app."""
    context = {"project": project, "is_admin": is_admin, "errors": services.last_posting_errors(project)}
    if is_admin:
        context["token_ending"] = GitHost.objects.filter(project=project).values_list("token_ending", flat=True).first()
    return context
