"""Metric charts and TensorBoard (issue 17) on a run with 50 scalar series × 100 000 steps.

Charts: the API answer the page's charts draw from (GET /api/v1/experiments/<id>/metrics: every
series, downsampled to ≤ 1 000 points) through Django's full request stack, and the time to
record the points through the service the log writer and the event file reader use.
Target: server time for the downsampled series ≤ 200 ms (p50), ≤ 1 000 points each. And the
page's charts rendered in ≤ 1 s: Chromium (Playwright) opens the experiment page from a uvicorn
server started as `make run` starts it, timed from navigation until all 50 charts are drawn
(median of 5 loads, the browser cache emptied each time).

TensorBoard's first view: from the tab's first request (its page, through aichor's proxy) to
TensorBoard's scalar data answering, through the proxy, with the last step of the run's last
series (TensorBoard has read the whole file): the same 50 series × 100 000 steps, as one event
file written by TensorBoard's own writer. Measured as a user meets it (the server has served
requests, so its spare TensorBoard is warm: metrics.tensorboard), and cold (no spare, no mirror
of the event files yet) for information.
Target: ready ≤ 5 s."""

import json
import logging
import math
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench._common import MiB, Processes, exit_status, figure, percentile, setup_django  # noqa: E402

SERIES = 50
STEPS = 100_000
BATCH = 10_000  # points per series per record call: a log flush of a fast loop is far smaller
REQUESTS = 20
PAGE_LOADS = 5
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
TB_DEADLINE = 300.0
# A run as most are, where starting TensorBoard, not reading the file, is the wait.
SMALL_STEPS = 1_000


def page_render(env: dict, client, experiment) -> list[float]:
    """Seconds from navigation to every series' chart drawn on the experiment page, per load."""
    from django.conf import settings
    from django.core.management import call_command
    from playwright.sync_api import sync_playwright

    call_command("collectstatic", interactive=False, verbosity=0)  # the server's whitenoise serves them
    procs = Processes(env)
    url = procs.server()
    cookie = client.cookies[settings.SESSION_COOKIE_NAME].value
    seconds = []
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
            for _ in range(PAGE_LOADS + 1):  # the first load warms the server's code paths
                context = browser.new_context(viewport={"width": 1400, "height": 1000})
                context.add_cookies([{"name": settings.SESSION_COOKIE_NAME, "value": cookie, "url": url}])
                page = context.new_page()
                started = time.perf_counter()
                page.goto(f"{url}/experiments/{experiment.pk}/")
                page.wait_for_function(f"document.querySelectorAll('.uplot canvas').length >= {SERIES}", timeout=60_000)
                seconds.append(time.perf_counter() - started)
                context.close()
            browser.close()
    finally:
        procs.stop_all()
    return seconds[1:]


def main() -> None:
    env = setup_django("aichor_bench_metrics")
    from django.contrib.auth import get_user_model
    from django.test import Client

    from datasets.services import ensure_buckets
    from experiments import services as experiment_services
    from metrics import services
    from metrics.models import Series
    from projects.models import Engine, Project
    from projects.services import create_project

    user, _ = get_user_model().objects.get_or_create(
        username="bench@example.com", defaults={"email": "bench@example.com"}
    )
    engine, _ = Engine.objects.get_or_create(name="bench-local", defaults={"kind": Engine.Kind.LOCAL})
    project = Project.objects.filter(slug="bench-metrics").first() or create_project(
        name="Bench metrics", slug="bench-metrics", engines=[engine], default_engine=engine, members=[user]
    )
    ensure_buckets(project)

    def new_experiment(message: str):
        return experiment_services.create_experiment(
            project=project, engine=engine, author=user, message=message, manifest_path="m.yaml"
        )

    client = Client()
    client.force_login(user)

    # --- charts -------------------------------------------------------------------------------
    experiment = new_experiment("50 series")
    started = time.perf_counter()
    for first in range(0, STEPS, BATCH):
        points = [
            (f"series_{s:02d}/loss", step, math.exp(-step / 20_000) + 0.01 * math.sin(step + s))
            for s in range(SERIES)
            for step in range(first, first + BATCH)
        ]
        services.record_points(experiment.pk, Series.Source.STDOUT, points)
    record_s = time.perf_counter() - started
    figure(f"record {SERIES * STEPS:,} points (log writer's service)", f"{record_s:.1f} s")

    url = f"/api/v1/experiments/{experiment.pk}/metrics"
    for _ in range(3):
        assert client.get(url).status_code == 200
    times = []
    for _ in range(REQUESTS):
        t = time.perf_counter()
        response = client.get(url)
        times.append((time.perf_counter() - t) * 1000)
    body = response.json()
    most = max(len(s["steps"]) for s in body["series"])
    assert len(body["series"]) == SERIES and all(s["count"] == STEPS for s in body["series"])
    p50 = statistics.median(times)
    figure("metrics API p50 (50 series × 100 000 steps, downsampled)", f"{p50:.1f} ms", "≤ 200 ms", p50 <= 200)
    figure("metrics API p95", f"{percentile(times, 95):.1f} ms")
    figure("points per series in the answer, at most", f"{most}", "≤ 1 000", most <= 1000)
    figure("metrics API answer size", f"{len(response.content) / MiB:.2f} MiB")
    loads = page_render(env, client, experiment)
    render = statistics.median(loads)
    figure(
        f"experiment page: all {SERIES} charts drawn in Chromium (median of {PAGE_LOADS})",
        f"{render:.2f} s",
        "≤ 1 s",
        render <= 1,
    )

    # --- TensorBoard: as a user meets it (requests served, so the spare is warm: metrics.apps
    # starts it with the first request; a user opens the tab after the experiment page), and
    # cold, for information. Each view with no mirror of the event files yet.
    from django.conf import settings

    from metrics import tensorboard

    # TensorBoard answers 404 for a run it has not read yet: expected while polling.
    logging.getLogger("django.request").setLevel(logging.ERROR)
    run, small = new_experiment("tensorboard"), new_experiment("tensorboard, small")
    write_event_file(run, STEPS)
    write_event_file(small, SMALL_STEPS)
    results = {}
    for spare in (True, False):
        settings.AICHOR_TENSORBOARD_SPARE = spare
        for experiment_, steps in ((run, STEPS), (small, SMALL_STEPS)):
            tensorboard.stop_all()
            shutil.rmtree(tensorboard.mirror_of(experiment_), ignore_errors=True)
            if spare:
                tensorboard.prewarm()
                wait_spare_idle(tensorboard)
            seconds = results[spare, steps] = first_view(client, experiment_, steps)
            name = f"TensorBoard first view ready, {'spare warm' if spare else 'cold (no spare)'}, 50 tags × {steps:,}"
            target = spare and steps == STEPS  # the figure: its run, as a user meets it
            figure(name, f"{seconds:.2f} s", "≤ 5 s", seconds <= 5 if target else None)
    tensorboard.stop_all()
    warm = results[True, STEPS]

    print(json.dumps({"bench": "metrics", "p50_ms": p50, "record_s": record_s, "points": most, "tb_warm_s": warm}))
    for e in (experiment, run, small):
        e.delete()


def write_event_file(experiment, steps: int) -> None:
    """The run's event file (`train/`, 50 tags), written by TensorBoard's own writer where the
    workload's AICHOR_TENSORBOARD_PATH points."""
    import google_crc32c
    from tensorboard.compat.proto import event_pb2, summary_pb2
    from tensorboard.compat.tensorflow_stub import pywrap_tensorflow
    from tensorboard.summary.writer.event_file_writer import EventFileWriter

    from datasets.storage import bucket_root
    from metrics.services import tensorboard_location

    # Setting up only: the writer's pure-Python checksums, in C (as aichor's TensorBoards read them).
    pywrap_tensorflow.crc32c = google_crc32c.value
    bucket, folder = tensorboard_location(experiment)
    started = time.perf_counter()
    writer = EventFileWriter(str(bucket_root(bucket) / folder / "train"), max_queue_size=100_000)
    for step in range(steps):
        values = [
            summary_pb2.Summary.Value(tag=f"series_{s:02d}/loss", simple_value=math.exp(-step / 500) + s)
            for s in range(SERIES)
        ]
        writer.add_event(event_pb2.Event(wall_time=time.time(), step=step, summary=summary_pb2.Summary(value=values)))
    writer.close()
    figure(f"write the event file (50 tags × {steps:,})", f"{time.perf_counter() - started:.1f} s")


def first_view(client, experiment, steps: int) -> float:
    """Seconds from the tab's page request to the last series answering with all its points."""
    base = f"/experiments/{experiment.pk}/tensorboard/"
    started = time.perf_counter()
    page = client.get(base)
    assert page.status_code == 200 and b"<title>TensorBoard</title>" in b"".join(page.streaming_content)
    last = f"series_{SERIES - 1:02d}/loss"
    while time.perf_counter() - started < TB_DEADLINE:
        response = client.get(base + "data/plugin/scalars/scalars", {"run": "train", "tag": last})
        body = b"".join(response.streaming_content)
        # TensorBoard keeps 1 000 points of a series, always the last one.
        points = json.loads(body) if response.status_code == 200 else []
        if points and points[-1][1] == steps - 1:
            return time.perf_counter() - started
        time.sleep(0.05)
    raise RuntimeError("TensorBoard did not serve the run's data in time")


def wait_spare_idle(tensorboard) -> None:
    """Until the spare waits for its command line: blocked reading stdin (syscall 0, fd 0)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        spare = tensorboard._spare
        if spare is not None and spare.poll() is None:
            try:
                if Path(f"/proc/{spare.pid}/syscall").read_text().startswith("0 0x0 "):
                    return
            except OSError:
                pass
        time.sleep(0.1)
    raise RuntimeError("no idle spare TensorBoard")


if __name__ == "__main__":
    main()
    sys.exit(exit_status())
