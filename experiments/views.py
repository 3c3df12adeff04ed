"""Dashboard pages for experiments: the list, the experiment page and its log endpoints.

Each live region is one partial that renders both inside the page and as the htmx poll answer;
polls answer htmx's stop-polling (286) once nothing they show can change any more."""

from dataclasses import replace

from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.db.models import OuterRef, Q, Subquery
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse, StreamingHttpResponse
from django.shortcuts import redirect, render
from django.template.loader import render_to_string
from django.urls import reverse
from django.views.decorators.http import require_GET, require_http_methods, require_POST
from django_htmx.http import HttpResponseClientRedirect, HttpResponseStopPolling

from aichor.lib.sql import distinct_values
from experiments import logview, repo, services
from experiments.access import get_experiment
from experiments.engines import get_engine, process_names
from experiments.engines.base import EngineError
from experiments.forms import ExperimentFilterForm, LogRangeForm, LogSearchForm, NewExperimentForm
from experiments.models import ACTIVE_STATUSES, STEP_ORDER, Experiment, Step
from experiments.workload import Variable, environment, mount_point
from projects.access import get_project
from projects.models import Engine
from projects.views import remember

PAGE_SIZE = 50


ALL_ENGINES = ""  # the engine filter's value for "All engines", in the URL and the session


def _engine_filter(request: HttpRequest, slug: str, engines: list[Engine]) -> tuple[Engine | None, str | None]:
    """The engine the list shows (None: every engine), and a URL to redirect to when the choice
    comes from the session rather than the URL (the URL then shows it and can be shared)."""
    key = f"engine:{slug}"
    if "engine" in request.GET:
        name = request.GET["engine"]
        engine = next((e for e in engines if e.name == name), None)
        wanted = engine.name if engine else ALL_ENGINES
        # Written only when it changes, so a poll does not cost a session UPDATE.
        if not request.htmx and request.session.get(key) != wanted:
            request.session[key] = wanted
        return engine, None
    remembered = next((e for e in engines if e.name == request.session.get(key)), None)
    if remembered is None or request.htmx:
        return None, None
    query = request.GET.copy()
    query["engine"] = remembered.name
    return remembered, f"{request.path}?{query.urlencode()}"


def _filtered(experiments, filters: dict):
    if filters.get("status"):
        experiments = experiments.filter(status=filters["status"])
    if filters.get("author"):
        # Exact: PostgreSQL has statistics for the column (not for UPPER(...) LIKE), so it keeps
        # walking exp_list_idx in order instead of sorting every row of a big project.
        experiments = experiments.filter(author_name=filters["author"])
    if filters.get("q"):
        q = filters["q"]
        experiments = experiments.filter(Q(message__icontains=q) | Q(commit_sha__startswith=q.lower()))
    return experiments


ELSEWHERE_CAP = 1000


def _elsewhere(in_project, project_id: int, engine: Engine, filters: dict) -> int:
    """How many of the project's runs (up to ELSEWHERE_CAP) match the filters on engines other
    than `engine`. A plain count read every experiment of the project on each view and poll
    (50 ms at 100 000, 0.3 s at a million): the engines in use are found first, one index probe
    each, and most projects have runs on one engine only."""
    # One index probe per engine the project's runs used (exp_list_idx starts with project, engine).
    others = set(distinct_values(Experiment, "engine_id", "project_id", project_id)) - {engine.pk}
    if not others:
        return 0
    return _filtered(in_project.filter(engine_id__in=others), filters)[:ELSEWHERE_CAP].count()


@login_required
@require_GET
def experiment_list(request: HttpRequest, slug: str) -> HttpResponse:
    project, _ = get_project(request.user, slug)
    engines = list(project.engines.all())
    engine, redirect_to = _engine_filter(request, slug, engines)
    if redirect_to:
        return redirect(redirect_to)
    remember(request, project)

    form = ExperimentFilterForm(request.GET)
    filters = form.cleaned_data if form.is_valid() else {}
    in_project = Experiment.objects.filter(project=project)
    shown = in_project.filter(engine=engine) if engine else in_project
    experiments = _filtered(shown, filters)
    # The colour of the step chip is the current step's own status: one subquery, no query per row.
    current = Step.objects.filter(experiment=OuterRef("pk"), name=OuterRef("current_step")).values("status")[:1]
    experiments = experiments.defer("manifest_text", "handle").annotate(step_status=Subquery(current))
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
    engine_of = {e.pk: e for e in engines}
    for row in rows:
        row.project = project  # commit links need it: one project, not one query per row
        row.engine_name = engine_of[row.engine_id].name if row.engine_id in engine_of else "(removed)"
        row.resources = row.typed_manifest.totals() if row.manifest else None
    any_active = shown.filter(status__in=ACTIVE_STATUSES).exists()
    newest_query = request.GET.copy()
    newest_query.pop("before", None)
    all_query = newest_query.copy()
    all_query["engine"] = ALL_ENGINES
    context = {
        "project": project,
        "engine": engine,
        "engines": engines,
        "form": form,
        "experiments": rows,
        "elsewhere": _elsewhere(in_project, project.pk, engine, filters) if engine else 0,
        "elsewhere_cap": ELSEWHERE_CAP,
        "all_engines_url": f"{request.path}?{all_query.urlencode()}",
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


@login_required
@require_http_methods(["GET", "POST"])
def experiment_new(request: HttpRequest, slug: str) -> HttpResponse:
    """Run a pushed commit: a branch's latest or one of its commits, with one of its manifests."""
    project, _ = get_project(request.user, slug)
    engines = list(project.engines.all())
    repo_error = ""
    try:
        branches = repo.branches(project.repo_clone_url)
    except repo.RepoError as exc:
        branches, repo_error = repo.Branches(default="", names=[]), str(exc)
    data = request.POST if request.method == "POST" else None
    branch = (data or request.GET).get("branch") or branches.default
    default_engine = next((e for e in engines if e.pk == project.default_engine_id), None)
    initial = {"branch": branch, "engine": default_engine.name if default_engine else ""}
    form = NewExperimentForm(data, initial=initial, branches=branches.names, engines=engines)
    if data is not None and form.is_valid():
        fields = form.cleaned_data
        try:
            # The slow part (a fetch) runs before any transaction: create_experiment opens its own.
            commit = repo.read_commit(
                project.repo_clone_url, fields["branch"], fields["commit"], manifest_path=fields["manifest_path"]
            )
            experiment = services.create_experiment(
                project=project,
                engine=services.chosen_engine(project, fields["engine"]),
                source=Experiment.Source.GIT,
                commit_sha=commit.sha,
                branch=fields["branch"],
                message=fields["message"],
                author=request.user,
                manifest_path=fields["manifest_path"],
            )
        except repo.RepoError as exc:
            text = str(exc)
            form.add_error("manifest_path" if text.startswith("manifest") else "commit", text)
        except services.ExperimentError as exc:
            form.add_error("engine", str(exc))
        else:
            return redirect("experiment-detail", experiment_id=experiment.pk)
    if branch in branches.names:
        try:
            form.offer_manifests(repo.read_commit(project.repo_clone_url, branch).manifests)
        except repo.RepoError as exc:
            repo_error = str(exc)
    context = {
        "project": project,
        "form": form,
        "repo_error": repo_error,
        "section": "experiments",
    }
    return render(request, "experiments/new.html", context, status=400 if form.errors else 200)


SHORT_ID_MIN = 8


@login_required
@require_GET
def experiment_by_prefix(request: HttpRequest, prefix: str) -> HttpResponse:
    """/experiments/d9977b02/ (the short id the list and the CLI print) to the experiment's
    page, when the prefix names exactly one experiment the user may see."""
    prefix = prefix.lower()
    if len(prefix) < SHORT_ID_MIN or prefix.strip("0123456789abcdef-"):
        raise Http404(f"An experiment id has at least {SHORT_ID_MIN} hexadecimal characters")
    found = list(
        Experiment.objects.for_user(request.user).filter(id__startswith=prefix).values_list("pk", flat=True)[:2]
    )
    if len(found) != 1:
        raise Http404("No experiment has this id" if not found else f"More than one experiment id starts with {prefix}")
    return redirect("experiment-detail", experiment_id=found[0])


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
        # Resubmit offers the project's engines, the original's first chosen.
        "resubmit_engines": list(experiment.project.engines.all()) if experiment.is_terminal else [],
        "poll": not experiment.is_terminal,
        # The watcher's count of a jobset's held-back completions (`completed 37/100`).
        "progress": (experiment.watch_state or {}).get("progress", "") if experiment.status in ACTIVE_STATUSES else "",
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
    # The list's engine filter is the user's choice: opening an experiment never changes it.
    remember(request, experiment.project)
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
        "role": role,
        "variables": injected_variables(experiment),
        "streams": streams,
        "initial_stream": initial,
        "resources": experiment.typed_manifest.totals() if experiment.manifest else None,
        # Only a finished experiment can be resubmitted: a running one has none to look up.
        "resubmissions": list(experiment.resubmissions.only("id", "created_at", "status"))
        if experiment.is_terminal
        else [],
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
        new = services.resubmit_experiment(
            experiment,
            actor=request.user,
            engine=services.chosen_engine(experiment.project, request.POST.get("engine")),
        )
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
