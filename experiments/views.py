"""Dashboard pages for experiments: the list, the experiment page and its log endpoints.

Each live region is one partial that renders both inside the page and as the htmx poll answer;
polls answer htmx's stop-polling (286) once nothing they show can change any more."""

from dataclasses import replace

from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.db.models import Q
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse, StreamingHttpResponse
from django.shortcuts import redirect, render
from django.template.loader import render_to_string
from django.urls import reverse
from django.views.decorators.http import require_GET, require_POST
from django_htmx.http import HttpResponseClientRedirect, HttpResponseStopPolling

from experiments import logview, services
from experiments.access import get_experiment
from experiments.engines import get_engine, process_names
from experiments.engines.base import EngineError
from experiments.forms import ExperimentFilterForm, LogRangeForm, LogSearchForm
from experiments.models import ACTIVE_STATUSES, STEP_ORDER, Experiment
from experiments.workload import Variable, environment, mount_point
from projects.access import get_project
from projects.views import remember

PAGE_SIZE = 50


@login_required
@require_GET
def experiment_list(request: HttpRequest, slug: str) -> HttpResponse:
    project, _ = get_project(request.user, slug)
    engines = list(project.engines.all())
    name = request.GET.get("engine")
    engine = next((e for e in engines if e.name == name), None)
    if engine is None and not request.htmx:
        # Put the engine in the URL so the page can be shared; the last one used comes first.
        remembered = request.session.get(f"engine:{slug}")
        fallback = next((e for e in engines if e.name == remembered), None) or project.default_engine
        fallback = fallback if fallback in engines else (engines[0] if engines else None)
        if fallback is not None:
            query = request.GET.copy()
            query["engine"] = fallback.name
            return redirect(f"{request.path}?{query.urlencode()}")
    remember(request, project, engine)

    form = ExperimentFilterForm(request.GET)
    filters = form.cleaned_data if form.is_valid() else {}
    experiments = Experiment.objects.filter(project=project, engine=engine).defer("manifest_text", "handle")
    if filters.get("status"):
        experiments = experiments.filter(status=filters["status"])
    if filters.get("author"):
        # Exact: PostgreSQL has statistics for the column (not for UPPER(...) LIKE), so it keeps
        # walking exp_list_idx in order instead of sorting every row of a big project.
        experiments = experiments.filter(author_name=filters["author"])
    if filters.get("q"):
        q = filters["q"]
        experiments = experiments.filter(Q(message__icontains=q) | Q(commit_sha__startswith=q.lower()))
    if filters.get("before"):
        created, pk = filters["before"]
        # `created_at <= x` is an index range condition (exp_list_idx); the tie on equal
        # timestamps is settled by id in a cheap filter, instead of an OR the planner cannot
        # turn into a range.
        experiments = experiments.filter(created_at__lte=created).exclude(created_at=created, id__gte=pk)
    rows = list(experiments.order_by("-created_at", "-id")[: PAGE_SIZE + 1])
    next_url = ""
    if len(rows) > PAGE_SIZE:
        rows = rows[:PAGE_SIZE]
        query = request.GET.copy()
        query["before"] = f"{rows[-1].created_at.isoformat()}_{rows[-1].pk}"
        next_url = f"{request.path}?{query.urlencode()}"
    for row in rows:
        row.project = project  # commit links need it: one project, not one query per row
        row.resources = row.typed_manifest.totals() if row.manifest else None
    any_active = (
        engine is not None
        and Experiment.objects.filter(project=project, engine=engine, status__in=ACTIVE_STATUSES).exists()
    )
    newest_query = request.GET.copy()
    newest_query.pop("before", None)
    context = {
        "project": project,
        "engine": engine,
        "engines": engines,
        "form": form,
        "experiments": rows,
        "next_url": next_url,
        "newest_url": f"{request.path}?{newest_query.urlencode()}",
        "is_first_page": not filters.get("before"),
        "filtered": bool(filters.get("status") or filters.get("author") or filters.get("q")),
        "any_active": any_active,
        "poll_url": request.get_full_path(),
        "section": "experiments",
        "public_url": settings.PUBLIC_URL,
    }
    if request.htmx:
        rows_html = render_to_string("experiments/_list_rows.html", context, request)
        return HttpResponse(rows_html) if any_active else HttpResponseStopPolling(rows_html)
    return render(request, "experiments/list.html", context)


def _live_context(request: HttpRequest, experiment: Experiment) -> dict:
    steps = sorted(experiment.steps.all(), key=lambda s: STEP_ORDER.index(s.name))
    failed_step = next((s for s in steps if s.status == "Failed"), None)
    return {
        "experiment": experiment,
        "project": experiment.project,
        "steps": steps,
        "failed_step": failed_step,
        "can_cancel": experiment.status in ACTIVE_STATUSES,
        "can_resubmit": experiment.is_terminal,
        "poll": not experiment.is_terminal,
        **_terminal_context(request, experiment),
    }


def _terminal_context(request: HttpRequest, experiment: Experiment) -> dict:
    """The terminal card lives outside the polled section (re-rendering it would cut an open
    session). The section tells each update whether the page shows the card, so the update
    adds it out of band once, when a terminal becomes possible."""
    can_open = experiment.can_open_terminal
    processes = process_names(experiment.engine, experiment.handle) if can_open else []
    if not request.htmx:
        return {"terminal_shown": can_open, "terminal_oob": False, "processes": processes}
    # hx-vals of the section: in the query of a poll, in the body of a Cancel inside it.
    shown = (request.POST if request.method == "POST" else request.GET).get("terminal_shown") == "1"
    oob = can_open and not shown
    return {"terminal_shown": shown or can_open, "terminal_oob": oob, "processes": processes if oob else []}


def _render_live(request: HttpRequest, experiment: Experiment) -> HttpResponse:
    html = render_to_string("experiments/_live.html", _live_context(request, experiment), request)
    return HttpResponseStopPolling(html) if experiment.is_terminal else HttpResponse(html)


def injected_variables(experiment: Experiment) -> list[Variable]:
    """What every process's environment holds (SPEC §5), as the engine's processes see the
    buckets: the very function the workload's environment comes from."""
    try:
        path_of = get_engine(experiment.engine).volume_path
    except EngineError:
        path_of = mount_point  # an engine this server cannot run: where a container would see them
    # A sensitive value never reaches the template, let alone the page.
    return [replace(v, value="") if v.sensitive else v for v in environment(experiment, path_of=path_of)[0]]


@login_required
@require_GET
def experiment_detail(request: HttpRequest, experiment_id) -> HttpResponse:
    experiment, role = get_experiment(request.user, experiment_id)
    if request.htmx:
        return _render_live(request, experiment)
    remember(request, experiment.project, experiment.engine)
    processes = process_names(experiment.engine, experiment.handle)
    stored = logview.stream_names(experiment.pk)
    process_streams = sorted({*stored, *(f"process:{p}" for p in processes)} - {f"step:{s}" for s in STEP_ORDER})
    step_streams = [f"step:{s}" for s in STEP_ORDER if f"step:{s}" in stored]
    streams = [s for s in process_streams if s.startswith("process:")] + step_streams
    initial = request.GET.get("stream") or (process_streams[0] if process_streams else "")
    if not initial:
        initial = f"step:{experiment.current_step}"
    context = {
        **_live_context(request, experiment),
        "engine": experiment.engine,
        "role": role,
        "variables": injected_variables(experiment),
        "streams": streams,
        "initial_stream": initial,
        "resources": experiment.typed_manifest.totals() if experiment.manifest else None,
        "resubmissions": list(experiment.resubmissions.only("id", "created_at", "status")),
        "ws_path": f"/ws/experiments/{experiment.pk}/logs/",
        "section": "experiments",
    }
    return render(request, "experiments/detail.html", context)


@login_required
@require_POST
def experiment_cancel(request: HttpRequest, experiment_id) -> HttpResponse:
    experiment, _ = get_experiment(request.user, experiment_id)
    try:
        services.cancel_experiment(experiment, actor=request.user)
    except services.ExperimentError as exc:
        messages.error(request, str(exc))
        experiment.refresh_from_db()
    if request.htmx:
        return _render_live(request, experiment)
    return redirect("experiment-detail", experiment_id=experiment.pk)


@login_required
@require_POST
def experiment_resubmit(request: HttpRequest, experiment_id) -> HttpResponse:
    experiment, _ = get_experiment(request.user, experiment_id)
    try:
        new = services.resubmit_experiment(experiment, actor=request.user)
    except services.ExperimentError as exc:
        messages.error(request, str(exc))
        if request.htmx:
            return _render_live(request, experiment)
        return redirect("experiment-detail", experiment_id=experiment.pk)
    url = reverse("experiment-detail", kwargs={"experiment_id": new.pk})
    return HttpResponseClientRedirect(url) if request.htmx else redirect(url)


@login_required
@require_GET
def log_lines(request: HttpRequest, experiment_id) -> JsonResponse:
    """Lines [start, end) of a stream: earlier lines on demand and the window around a search hit."""
    experiment, _ = get_experiment(request.user, experiment_id)
    form = LogRangeForm(request.GET)
    if not form.is_valid():
        return JsonResponse({"errors": form.errors}, status=400)
    stream = form.cleaned_data["stream"]
    total = logview.total_lines(experiment.pk, stream)
    end = form.cleaned_data["end"]
    end = total if end is None else min(end, total)
    start = form.cleaned_data["start"]
    start = max(0, end - logview.MAX_LINES) if start is None else start
    first, lines = logview.line_range(experiment.pk, stream, start, end)
    return JsonResponse({"stream": stream, "first": first, "lines": lines, "total": total})


@login_required
@require_GET
def log_search(request: HttpRequest, experiment_id) -> HttpResponse:
    experiment, _ = get_experiment(request.user, experiment_id)
    form = LogSearchForm(request.GET)
    matches, truncated = [], False
    if form.is_valid():
        matches, truncated = logview.search(experiment.pk, form.cleaned_data["stream"], form.cleaned_data["q"])
    context = {"experiment": experiment, "form": form, "matches": matches, "truncated": truncated}
    return render(request, "experiments/_log_search.html", context)


@login_required
@require_GET
def log_download(request: HttpRequest, experiment_id) -> StreamingHttpResponse:
    experiment, _ = get_experiment(request.user, experiment_id)
    stream = request.GET.get("stream", "")
    if not stream or stream not in logview.stream_names(experiment.pk):
        raise Http404("No such log")
    filename = f"{experiment.short_id}-{stream.replace(':', '-')}.log"
    response = StreamingHttpResponse(logview.iter_text(experiment.pk, stream), content_type="text/plain; charset=utf-8")
    response["Content-Disposition"] = f'attachment; filename="{filename}"'
    return response
