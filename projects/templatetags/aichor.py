"""Template helpers of the dashboard: the top bar every page shares, and small formatters."""

from datetime import timedelta

from django import template

from projects.models import Project

register = template.Library()


@register.inclusion_tag("_topbar.html", takes_context=True)
def topbar(context) -> dict:
    """The project and engine dropdowns. Pages of other apps only need `project` in their
    context (or none at all): the rest is found here."""
    request = context["request"]
    user = request.user
    project = context.get("project")
    if not user.is_authenticated:
        return {"user": user}
    projects = Project.objects.visible_to(user)
    engines = context.get("engines")
    if project is not None and engines is None:
        engines = list(project.engines.all())
    # The engine dropdown is the experiments list's filter, as the list last saved it; None is
    # "All engines". An experiment's own engine never shows here (its page would change it).
    engine = None
    if project is not None:
        remembered = request.session.get(f"engine:{project.slug}")
        engine = next((e for e in engines if e.name == remembered), None)
    return {
        "request": request,
        "user": user,
        "projects": list(projects.only("slug", "name").order_by("name")),
        "project": project,
        "engines": engines or [],
        "engine": engine,
        "section": context.get("section", ""),
    }


@register.filter
def duration(value: timedelta | None) -> str:
    if value is None:
        return ""
    seconds = int(value.total_seconds())
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes:02d}m"
    if minutes:
        return f"{minutes}m {seconds:02d}s"
    return f"{seconds}s"


@register.filter
def stream_label(stream: str) -> str:
    kind, _, name = stream.partition(":")
    return f"{name} step log" if kind == "step" else name


@register.filter
def status_class(status: str) -> str:
    return f"badge badge-{(status or '').lower()}"


@register.filter
def ago(value) -> str:
    from django.utils import timezone
    from django.utils.timesince import timesince

    if value is None:
        return ""
    if (timezone.now() - value).total_seconds() < 60:
        return "just now"
    return f"{timesince(value, depth=1)} ago"
