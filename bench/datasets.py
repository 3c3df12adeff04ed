"""Datasets benchmark: a 2 GiB file up and down through the dashboard's endpoints (uvicorn, as
`make run` serves them) against raw boto3 to the same SeaweedFS S3 server, in the same run; and
the dashboard server's peak RSS.

    .venv/bin/python bench/datasets.py [--size-mb 2048] [--parallel 3]

Rounds alternate the two sides (median of --rounds). Targets: dashboard throughput >= 0.8x boto3
both ways; server peak RSS <= 150 MiB."""

import argparse
import os
import secrets
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench._common import MiB, Processes, exit_status, figure, scratch_dir  # noqa: E402


def make_file(path: Path, size: int) -> None:
    block = os.urandom(16 * MiB)
    with path.open("wb") as fh:
        written = 0
        while written < size:
            n = min(len(block), size - written)
            fh.write(block[:n])
            written += n


class RssSampler(threading.Thread):
    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.peak, self.running = pid, 0, True

    def rss(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    def run(self) -> None:
        while self.running:
            self.peak = max(self.peak, self.rss())
            time.sleep(0.02)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-mb", type=int, default=2048)
    parser.add_argument("--parallel", type=int, default=3, help="parts in flight, as the browser uploader")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, each side alternated")
    args = parser.parse_args()
    size = args.size_mb * MiB

    from tests.datasets.seaweed import start_s3_server

    work = scratch_dir("aichor-bench-datasets-")
    s3 = start_s3_server(work / "weed")
    env = {
        **os.environ,
        "AICHOR_DATA_DIR": str(work / "data"),
        "DATABASE_URL": f"sqlite:///{work / 'bench.sqlite3'}",
        "AICHOR_STORAGE": "s3",
        "AICHOR_S3_ENDPOINT": s3.endpoint,
        "AICHOR_S3_ACCESS_KEY": s3.access_key,
        "AICHOR_S3_SECRET_KEY": s3.secret_key,
        "AICHOR_S3_REGION": "us-east-1",
        "AICHOR_LOG_LEVEL": "WARNING",
        "DJANGO_SETTINGS_MODULE": "aichor.settings",
    }
    env.pop("REDIS_URL", None)
    os.environ.update(env)
    import django

    django.setup()
    from django.contrib.auth import get_user_model
    from django.core.management import call_command
    from django.test import Client

    from projects.services import create_project

    call_command("migrate", verbosity=0)
    user = get_user_model().objects.create_user("bench@example.com", "bench@example.com", "pw-bench-123")
    project = create_project(name="Bench", slug="bench", admins=[user])
    client = Client()
    client.force_login(user)
    session = client.cookies["sessionid"].value

    procs = Processes(env)
    base = procs.server()
    server = procs.web
    import requests

    csrf = secrets.token_hex(16)
    http = requests.Session()
    http.cookies.set("sessionid", session)
    http.cookies.set("csrftoken", csrf)
    http.headers["X-CSRFToken"] = csrf
    http.mount("http://", requests.adapters.HTTPAdapter(pool_connections=8, pool_maxsize=8))

    source = work / "payload.bin"
    print(f"writing a {args.size_mb} MiB test file ...", flush=True)
    make_file(source, size)
    boto = s3.client()
    bucket = project.inputs_bucket
    sampler = RssSampler(server.pid)
    baseline = sampler.rss()
    sampler.start()

    def boto_upload() -> float:
        # boto3's default transfer settings: 8 MiB parts, 10 threads.
        t = time.monotonic()
        boto.upload_file(str(source), bucket, "raw.bin")
        return time.monotonic() - t

    def boto_download() -> float:
        t = time.monotonic()
        boto.download_file(bucket, "raw.bin", str(work / "raw.out"))
        elapsed = time.monotonic() - t
        (work / "raw.out").unlink()
        return elapsed

    def boto_download_single() -> float:
        # A browser downloads one stream; so does boto3's get_object, for a like-for-like figure.
        t = time.monotonic()
        with (work / "raw.out").open("wb") as out:
            for chunk in boto.get_object(Bucket=bucket, Key="raw.bin")["Body"].iter_chunks(MiB):
                out.write(chunk)
        elapsed = time.monotonic() - t
        (work / "raw.out").unlink()
        return elapsed

    key = "dashboard.bin"
    part_size = 0

    def dashboard_upload() -> float:
        """The dashboard's endpoints, used as the browser's uploader uses them."""
        nonlocal part_size
        t = time.monotonic()
        start = http.post(
            f"{base}/p/bench/datasets/uploads/start/", data={"bucket": "inputs", "key": key, "size": size}
        )
        start.raise_for_status()
        info = start.json()
        part_size = info["part_size"]

        def send(number: int) -> None:
            with source.open("rb") as fh:
                fh.seek((number - 1) * info["part_size"])
                data = fh.read(info["part_size"])
            r = http.put(
                f"{base}/p/bench/datasets/uploads/part/",
                params={"bucket": "inputs", "key": key, "upload_id": info["upload_id"], "part": number},
                data=data,
                headers={"Content-Type": "application/octet-stream"},
            )
            r.raise_for_status()

        with ThreadPoolExecutor(args.parallel) as pool:
            list(pool.map(send, range(1, info["parts"] + 1)))
        done = http.post(
            f"{base}/p/bench/datasets/uploads/complete/",
            data={"bucket": "inputs", "key": key, "upload_id": info["upload_id"], "size": size},
        )
        done.raise_for_status()
        return time.monotonic() - t

    def dashboard_download() -> float:
        """Through the dashboard's own URL as a browser fetches it: requests follows a redirect to
        a presigned URL as the browser would."""
        t = time.monotonic()
        received = 0
        with http.get(f"{base}/p/bench/datasets/download/", params={"bucket": "inputs", "key": key}, stream=True) as r:
            r.raise_for_status()
            with (work / "dash.out").open("wb") as out:
                for chunk in r.iter_content(MiB):
                    out.write(chunk)
                    received += len(chunk)
        elapsed = time.monotonic() - t
        (work / "dash.out").unlink()
        assert received == size, (received, size)
        return elapsed

    # Rounds alternated, so a slow spell of the machine hits both sides alike.
    times: dict[str, list[float]] = {}
    upload_peak = 0
    for round_number in range(args.rounds):
        print(f"round {round_number + 1}/{args.rounds}", flush=True)
        for name, run in (
            ("boto_up", boto_upload),
            ("dash_up", dashboard_upload),
            ("boto_down", boto_download),
            ("dash_down", dashboard_download),
            ("boto_down_single", boto_download_single),
        ):
            times.setdefault(name, []).append(run())
            if name == "dash_up":
                upload_peak = max(upload_peak, sampler.peak)
    sampler.running = False
    sampler.join()
    assert boto.head_object(Bucket=bucket, Key=key)["ContentLength"] == size
    med = {name: statistics.median(values) for name, values in times.items()}

    mib = size / MiB
    print(f"file: {args.size_mb} MiB; dashboard uploader: {part_size // MiB} MiB parts, {args.parallel} in flight")
    for direction in ("up", "down"):
        boto_s, dash_s = med[f"boto_{direction}"], med[f"dash_{direction}"]
        figure(f"{direction}load boto3, median of {args.rounds}", f"{mib / boto_s:.1f} MiB/s")
        figure(f"{direction}load dashboard, median of {args.rounds}", f"{mib / dash_s:.1f} MiB/s")
        ratio = boto_s / dash_s
        figure(f"{direction}load dashboard / boto3", f"{ratio:.2f}x", ">= 0.8x", ratio >= 0.8)
    figure("download dashboard / boto3 get_object (one stream)", f"{med['boto_down_single'] / med['dash_down']:.2f}x")
    figure("dashboard server RSS idle", f"{baseline / MiB:.0f} MiB")
    figure("dashboard server RSS peak during uploads", f"{upload_peak / MiB:.0f} MiB")
    figure(
        "dashboard server RSS peak overall", f"{sampler.peak / MiB:.0f} MiB", "<= 150 MiB", sampler.peak <= 150 * MiB
    )
    procs.stop_all()
    s3.stop()
    sys.exit(exit_status())


if __name__ == "__main__":
    main()
