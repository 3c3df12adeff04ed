"""The TensorBoard tab (every path under /experiments/<id>/tensorboard/ goes to the
experiment's own TensorBoard, metrics.tensorboard), the project's TensorBoard over chosen
experiments (/p/<slug>/tensorboard/<key>/…) and the comparison of runs; members only."""

import uuid

import requests
from django.contrib.auth.decorators import login_required
from django.http import Http404, HttpRequest, HttpResponse, StreamingHttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.clickjacking import xframe_options_sameorigin
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_safe

from experiments.access import get_experiment
from experiments.models import Experiment
from metrics import compare, tensorboard
from projects.access import get_project

# Hop-by-hop headers and those the proxy recomputes are not passed on.
DROPPED = {"connection", "keep-alive", "transfer-encoding", "content-length", "content-encoding", "host", "cookie"}
ALLOWED_METHODS = ("GET", "HEAD", "POST")


# TensorBoard's frontend POSTs data queries without Django's CSRF token; TensorBoard itself
# refuses POSTs lacking its X-XSRF-Protected header, which a cross-site form cannot send.
@csrf_exempt
@xframe_options_sameorigin
@login_required
def tensorboard_proxy(request: HttpRequest, experiment_id, path: str = "") -> HttpResponse:
    experiment, _ = get_experiment(request.user, experiment_id)
    if request.method not in ALLOWED_METHODS:
        return HttpResponse(status=405, headers={"Allow": ", ".join(ALLOWED_METHODS)})
    try:
        tensorboard.refresh_mirror(experiment)
        instance = tensorboard.instance_for(experiment)
    except tensorboard.TensorBoardUnavailable as exc:
        return HttpResponse(f"TensorBoard is unavailable: {exc}", status=503, content_type="text/plain")
    return _proxy(request, instance, path)


@login_required
@require_safe  # a link to follow; it changes nothing
def project_tensorboard(request: HttpRequest, slug: str) -> HttpResponse:
    """/p/<slug>/tensorboard/?e=<id>&e=<id>…: to the chosen set's own URL (its key)."""
    project, _ = get_project(request.user, slug)
    experiments = _chosen(project, request.GET.getlist("e"))
    if not 1 <= len(experiments) <= compare.MAX_RUNS:
        return HttpResponse(f"Choose 1 to {compare.MAX_RUNS} experiments.", status=400, content_type="text/plain")
    return redirect(tensorboard.set_prefix(project.slug, tensorboard.set_key(e.pk for e in experiments)) + "/")


@csrf_exempt  # as tensorboard_proxy
@xframe_options_sameorigin
@login_required
def project_tensorboard_proxy(request: HttpRequest, slug: str, key: str, path: str = "") -> HttpResponse:
    project, _ = get_project(request.user, slug)
    ids = tensorboard.set_ids(key)
    if ids is None:
        raise Http404("No such experiment")
    experiments = _chosen(project, ids)
    if request.method not in ALLOWED_METHODS:
        return HttpResponse(status=405, headers={"Allow": ", ".join(ALLOWED_METHODS)})
    try:
        for experiment in experiments:
            tensorboard.refresh_mirror(experiment)
        instance = tensorboard.instance_for_set(project.slug, experiments)
    except tensorboard.TensorBoardUnavailable as exc:
        return HttpResponse(f"TensorBoard is unavailable: {exc}", status=503, content_type="text/plain")
    return _proxy(request, instance, path)


def _chosen(project, values: list[str]) -> list[Experiment]:
    """The project's experiments with these ids, in the order given; 404 should one be
    malformed, missing or another project's (the same answer for each)."""
    try:
        ids = list(dict.fromkeys(uuid.UUID(value) for value in values))
    except ValueError:
        raise Http404("No such experiment") from None
    found = {e.pk: e for e in Experiment.objects.filter(project=project, pk__in=ids).select_related("project")}
    if len(found) != len(ids):
        raise Http404("No such experiment")
    return [found[pk] for pk in ids]


def _proxy(request: HttpRequest, instance: tensorboard.Instance, path: str) -> HttpResponse:
    headers = {k: v for k, v in request.headers.items() if k.lower() not in DROPPED}
    upstream = requests.request(
        request.method,
        f"http://127.0.0.1:{instance.port}{instance.prefix}/{path}",
        params=[(key, value) for key, values in request.GET.lists() for value in values],
        data=request.body if request.method == "POST" else None,
        headers=headers,
        stream=True,
        allow_redirects=False,
        timeout=(5, 120),
    )
    response = StreamingHttpResponse(_body(upstream), status=upstream.status_code)
    for name, value in upstream.headers.items():
        if name.lower() not in DROPPED:
            response[name] = value
    if "Location" in response:
        # TensorBoard redirects to its own loopback address: the browser follows our path.
        response["Location"] = response["Location"].replace(f"http://127.0.0.1:{instance.port}", "", 1)
    return response


def _body(upstream: requests.Response):
    try:
        yield from upstream.raw.stream(64 * 1024, decode_content=True)
    finally:
        upstream.close()


@login_required
@require_safe  # a link to follow; it changes nothing
def compare_runs(request: HttpRequest, slug: str) -> HttpResponse:
    """/p/<slug>/compare/?e=<id>&e=<id>…: a URL to paste into a discussion."""
    project, _ = get_project(request.user, slug)
    try:
        ids = list(dict.fromkeys(uuid.UUID(value) for value in request.GET.getlist("e")))
    except ValueError:
        raise Http404("No such experiment") from None
    if not compare.MIN_RUNS <= len(ids) <= compare.MAX_RUNS:
        message = f"Choose {compare.MIN_RUNS} to {compare.MAX_RUNS} experiments to compare."
        return render(request, "metrics/compare.html", {"project": project, "error": message}, status=400)
    found = {e.pk: e for e in Experiment.objects.filter(project=project, pk__in=ids).select_related("engine")}
    if len(found) != len(ids):
        raise Http404("No such experiment")  # another project's, or none: the same answer
    experiments = [found[pk] for pk in ids]
    table, charts = compare.curves(experiments)
    context = {
        "project": project,
        "experiments": experiments,
        "rows": compare.manifest_rows(experiments),
        "metrics": table,
        "charts": {"runs": [e.short_id for e in experiments], "metrics": charts},
        "tensorboard_url": tensorboard.set_prefix(project.slug, tensorboard.set_key(ids)) + "/",
        "section": "experiments",
    }
    return render(request, "metrics/compare.html", context)
