"""Experiments list page: server time and query count at 1 000, 100 000 and 1 000 000
experiments in one project (PostgreSQL, bulk-created), and the ratio 1 M ÷ 1 k.
Targets (issue 3): ratio ≤ 1.2, ≤ 10 queries, p50 ≤ 40 ms.

Measured in-process through Django's full request stack (session, auth, middleware, template),
so the figure is server time without network. Rows are inserted with generate_series, topped up
to each size, in a database of the run's own (dropped afterwards)."""

import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench._common import exit_status, figure, percentile, setup_django  # noqa: E402

SIZES = [1_000, 100_000, 1_000_000]
REQUESTS = 60
# What Cloning stores for a 4-worker PyTorch run with a GPU each (the table shows its totals).
MANIFEST_TEXT = """\
kind: AIchorManifest
apiVersion: 0.2.3
builder:
  image: bench
spec:
  operator: pytorch
  image: bench
  command: python train.py
  types:
    worker:
      count: 4
      resources:
        cpus: 8
        ramRatio: 4
        accelerators:
          gpu:
            count: 1
"""


def top_up(project, engine, user, size: int) -> None:
    from django.db import connection

    from experiments.manifest import parse_manifest
    from experiments.models import Experiment

    have = Experiment.objects.filter(project=project).count()
    if have >= size:
        return
    missing = size - have
    started = time.perf_counter()
    with connection.cursor() as cursor:
        # Older rows go further back in time, so the newest page stays the same few active ones.
        cursor.execute(
            """
            INSERT INTO experiments_experiment (
                id, project_id, engine_id, source, clone_url, commit_sha, branch, archive, message,
                author_id, author_name, manifest_path, manifest, manifest_text, status, current_step,
                exit_code, failure_reason, image, created_at, started_at, finished_at, heartbeat_at, waiting_reason,
                watch_state)
            SELECT gen_random_uuid(), %s, %s, 'git', 'https://github.com/acme/bench.git',
                md5(g::text) || 'abcdefgh', 'main', '', 'aichor[train.yaml]: sweep lr ' || g, %s,
                'researcher' || (g %% 7) || '@example.com', 'aichor_manifests/train.yaml', %s::jsonb, '',
                CASE WHEN g %% 5 = 0 THEN 'Failed' ELSE 'Succeeded' END, 'Completed',
                CASE WHEN g %% 5 = 0 THEN 1 ELSE 0 END, '', '',
                now() - interval '1 day' - (g || ' seconds')::interval,
                now() - interval '1 day' - (g || ' seconds')::interval,
                now() - interval '1 day' - (g || ' seconds')::interval + interval '20 minutes',
                now(), '', '{}'::jsonb
            FROM generate_series(%s, %s) AS g
            """,
            [project.pk, engine.pk, user.pk, json.dumps(parse_manifest(MANIFEST_TEXT).to_dict()), have + 1, size],
        )
        cursor.execute("ANALYZE experiments_experiment")
    print(f"  inserted {missing:,} experiments in {time.perf_counter() - started:.1f} s", flush=True)


def measure(client, url: str) -> tuple[list[float], int]:
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    for _ in range(5):  # warm caches, connections and the template loader
        assert client.get(url).status_code == 200
    times = []
    for _ in range(REQUESTS):
        started = time.perf_counter()
        response = client.get(url)
        times.append((time.perf_counter() - started) * 1000)
        assert response.status_code == 200
    with CaptureQueriesContext(connection) as queries:
        client.get(url)
    return times, len(queries)


def main() -> None:
    setup_django("aichor_bench_list")
    from django.contrib.auth import get_user_model
    from django.db import connection
    from django.test import Client

    from experiments import services
    from experiments.models import Experiment
    from projects.models import Engine, Project
    from projects.services import create_project

    user, _ = get_user_model().objects.get_or_create(
        username="bench@example.com", defaults={"email": "bench@example.com"}
    )
    engine, _ = Engine.objects.get_or_create(name="bench-local", defaults={"kind": Engine.Kind.LOCAL})
    project = Project.objects.filter(slug="bench-list").first() or create_project(
        name="Bench list", slug="bench-list", engines=[engine], default_engine=engine, members=[user]
    )
    if Experiment.objects.filter(project=project).count() > SIZES[0]:
        Experiment.objects.filter(project=project).delete()  # start from the smallest size
        with connection.cursor() as cursor:
            # A million dead rows would otherwise be scanned by the 1 000-row measurement.
            cursor.execute("VACUUM ANALYZE experiments_experiment")
    # A few active experiments on top, as on a busy day: the page polls and its any-active
    # check runs too.
    for _ in range(3):
        services.create_experiment(
            project=project, engine=engine, author=user, message="running", manifest_path="m.yaml"
        )

    client = Client()
    client.force_login(user)
    url = f"/p/{project.slug}/?engine={engine.name}"
    deep_url = None
    results = {}
    for size in SIZES:
        print(f"{size:,} experiments:", flush=True)
        top_up(project, engine, user, size)
        times, queries = measure(client, url)
        # A page deep in the list: the keyset cursor of a row near the end.
        oldest = Experiment.objects.filter(project=project).order_by("created_at", "id").values("created_at", "id")[100]
        deep_url = f"{url}&before={oldest['created_at'].isoformat()}_{oldest['id']}".replace("+", "%2B")
        deep_times, _ = measure(client, deep_url)
        filtered_times, _ = measure(client, url + "&status=Failed&author=researcher3%40example.com")
        # Free text is a substring scan (no trigram index): informational, no target.
        text_times, _ = measure(client, url + "&q=sweep%20lr%2077")
        results[size] = {
            "p50_ms": statistics.median(times),
            "p95_ms": percentile(times, 95),
            "queries": queries,
            "deep_page_p50_ms": statistics.median(deep_times),
            "filtered_p50_ms": statistics.median(filtered_times),
            "text_search_p50_ms": statistics.median(text_times),
        }
        r = results[size]
        print(
            f"  list p50 {r['p50_ms']:.1f} ms, p95 {r['p95_ms']:.1f} ms, {queries} queries; "
            f"last page p50 {r['deep_page_p50_ms']:.1f} ms; status+author p50 {r['filtered_p50_ms']:.1f} ms; "
            f"text search p50 {r['text_search_p50_ms']:.1f} ms",
            flush=True,
        )
    ratio = results[SIZES[-1]]["p50_ms"] / results[SIZES[0]]["p50_ms"]
    for size, r in results.items():
        figure(f"list page p50, {size:,} experiments", f"{r['p50_ms']:.1f} ms", "<= 40 ms", r["p50_ms"] <= 40)
        figure(f"list page queries, {size:,} experiments", str(r["queries"]), "<= 10", r["queries"] <= 10)
    figure("list page p50 ratio 1M / 1k", f"{ratio:.2f}", "<= 1.2", ratio <= 1.2)
    print(json.dumps({"bench": "list_page", "sizes": results, "ratio": ratio}))
    sys.exit(exit_status())


if __name__ == "__main__":
    main()
