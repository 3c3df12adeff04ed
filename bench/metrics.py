"""Metric charts: a run with 50 scalar series × 100 000 steps. Measures the API answer the
page's charts draw from (GET /api/v1/experiments/<id>/metrics: every series, downsampled to
≤ 1 000 points) through Django's full request stack, and the time to record the points through
the service the log writer and the event file reader use.
Target (issue 17): server time for the downsampled series ≤ 200 ms (p50), ≤ 1 000 points each."""

import json
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench._common import percentile, setup_django  # noqa: E402

SERIES = 50
STEPS = 100_000
BATCH = 10_000  # points per series per record call: a log flush of a fast loop is far smaller
REQUESTS = 20


def main() -> None:
    setup_django("aichor_bench_metrics")
    from django.contrib.auth import get_user_model
    from django.test import Client

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
    experiment = experiment_services.create_experiment(
        project=project, engine=engine, author=user, message="50 series", manifest_path="m.yaml"
    )
    started = time.perf_counter()
    for first in range(0, STEPS, BATCH):
        points = [
            (f"series_{s:02d}/loss", step, math.exp(-step / 20_000) + 0.01 * math.sin(step + s))
            for s in range(SERIES)
            for step in range(first, first + BATCH)
        ]
        services.record_points(experiment.pk, Series.Source.STDOUT, points)
    record_s = time.perf_counter() - started
    print(f"  recorded {SERIES * STEPS:,} points in {record_s:.1f} s", flush=True)

    client = Client()
    client.force_login(user)
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
    size_kb = len(response.content) / 1024
    p50 = statistics.median(times)
    ok = p50 <= 200 and most <= 1000
    print(
        f"  metrics API p50 {p50:.1f} ms, p95 {percentile(times, 95):.1f} ms; {most} points per series at most; "
        f"{size_kb:.0f} KiB -> {'PASS' if ok else 'FAIL'} (target p50 ≤ 200 ms, ≤ 1 000 points)"
    )
    print(json.dumps({"bench": "metrics", "p50_ms": p50, "record_s": record_s, "points": most, "pass": ok}))
    experiment.delete()


if __name__ == "__main__":
    main()
