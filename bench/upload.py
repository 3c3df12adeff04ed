"""Benchmark: `aichor experiments submit local` of a 1 GB tree against a live server (uvicorn
subprocess, SQLite and filesystem storage in a scratch folder).

Prints the upload throughput, the throughput of a raw copy of the same files to the same
storage in the same run, their ratio, the CPU time each side spent, and the peak RSS of the CLI
and of the server. Targets: ratio >= 0.8, each peak RSS <= 150 MB.

Rounds alternate raw copy and upload, and each starts with the page cache flushed (sync) and
the previous round's output deleted: how fast the kernel takes 1 GB of writes depends on how
much it still has to write back, and on this VM on whether the pages are freshly handed out,
so a single measurement of either side can be off by 4x. The medians are compared.

    .venv/bin/python bench/upload.py [--size-mb 1024] [--files 16] [--rounds 3]
"""

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench._common import BIN, Processes  # noqa: E402


def make_tree(root: Path, size_mb: int, files: int) -> int:
    per_file = size_mb * 1024 * 1024 // files
    block = os.urandom(4 * 1024 * 1024)  # incompressible, like checkpoints and datasets
    for i in range(files):
        path = root / "data" / f"shard-{i:03d}.bin"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as fh:
            left = per_file
            while left:
                fh.write(block[: min(left, len(block))])
                left -= min(left, len(block))
    (root / "aichor_manifests").mkdir()
    (root / "aichor_manifests/manifest.yaml").write_text(
        "kind: AIchorManifest\napiVersion: 0.2.3\nbuilder:\n  image: b\n  dockerfile: ./Dockerfile\n"
        "spec:\n  operator: batch\n  image: b\n  command: 'true'\n"
    )
    (root / "Dockerfile").write_text("FROM scratch\n")
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-mb", type=int, default=1024)
    parser.add_argument("--files", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="aichor-bench-"))
    env = {
        **os.environ,
        "AICHOR_DATA_DIR": str(scratch / "data"),
        "DATABASE_URL": f"sqlite:///{scratch / 'db.sqlite3'}",
        "AICHOR_MAX_ARCHIVE_BYTES": str(4 * 1024**3),
        "DJANGO_SETTINGS_MODULE": "aichor.settings",
        "XDG_CONFIG_HOME": str(scratch / "config"),
    }
    env.pop("REDIS_URL", None)
    procs = None
    try:
        os.environ.update(env)
        import django

        django.setup()
        from django.contrib.auth import get_user_model
        from django.core.files import File
        from django.core.files.storage import default_storage
        from django.core.management import call_command

        from projects.models import Engine
        from projects.services import create_api_token, create_project

        call_command("migrate", verbosity=0)
        user = get_user_model().objects.create_user("bench@example.com", "bench@example.com", "bench-pw-123")
        engine = Engine.objects.create(name="local", kind=Engine.Kind.LOCAL)
        create_project(name="Bench", slug="bench", engines=[engine], default_engine=engine, admins=[user])
        token = create_api_token(user)

        tree = scratch / "tree"
        total = make_tree(tree, args.size_mb, args.files)
        print(f"tree: {total / 1024**2:.0f} MiB in {args.files} files")

        procs = Processes(env)
        url = procs.server()
        server = procs.web
        aichor = str(BIN / "aichor")
        subprocess.run(
            [aichor, "auth", "key", "--apikey", token, "--url", url], env=env, check=True, capture_output=True
        )
        subprocess.run([aichor, "context", "set", "project", "bench"], env=env, check=True, capture_output=True)

        def raw_copy() -> float:
            # The same bytes into the same storage, file by file: no HTTP, no tar.
            start = time.perf_counter()
            for path in sorted(tree.rglob("*")):
                if path.is_file():
                    with open(path, "rb") as fh:
                        default_storage.save(f"rawcopy/{path.relative_to(tree)}", File(fh))
            seconds = time.perf_counter() - start
            shutil.rmtree(Path(default_storage.location) / "rawcopy")
            return seconds

        def upload() -> tuple[float, float, float]:
            server_before = cpu_seconds(server.pid)
            cli_before = resource.getrusage(resource.RUSAGE_CHILDREN)
            start = time.perf_counter()
            result = subprocess.run(
                [aichor, "experiments", "submit", "local", "--repo-dir", str(tree), "--json"],
                env=env,
                capture_output=True,
                text=True,
            )
            seconds = time.perf_counter() - start
            if result.returncode != 0:
                raise SystemExit(f"submit failed: {result.stderr.strip().splitlines()[-1]}")
            cli_after = resource.getrusage(resource.RUSAGE_CHILDREN)
            archive = json.loads(result.stdout)["archive"]
            if default_storage.size(archive) < total:
                raise SystemExit(f"stored archive is short: {default_storage.size(archive)} < {total}")
            default_storage.delete(archive)
            cli_cpu = cli_after.ru_utime + cli_after.ru_stime - cli_before.ru_utime - cli_before.ru_stime
            return seconds, cli_cpu, cpu_seconds(server.pid) - server_before

        raws, uploads = [], []
        for _ in range(args.rounds):
            os.sync()
            raws.append(raw_copy())
            os.sync()
            uploads.append(upload())
        cli_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        server_rss = peak_rss_mb(server.pid)

        mib = total / 1024**2
        raw_seconds = statistics.median(raws)
        upload_seconds = statistics.median(u[0] for u in uploads)
        print(f"raw copy to storage:   rounds {', '.join(f'{mib / r:.0f}' for r in raws)} MiB/s")
        print(f"aichor submit local:   rounds {', '.join(f'{mib / u[0]:.0f}' for u in uploads)} MiB/s")
        print(f"raw copy, median:      {raw_seconds:6.2f} s  {mib / raw_seconds:7.1f} MiB/s")
        print(f"submit local, median:  {upload_seconds:6.2f} s  {mib / upload_seconds:7.1f} MiB/s")
        print(f"ratio:                 {raw_seconds / upload_seconds:.2f}x   (target >= 0.8x)")
        print(
            f"CPU per GiB uploaded:  CLI {statistics.median(u[1] for u in uploads) / mib * 1024:.2f} s,"
            f" server {statistics.median(u[2] for u in uploads) / mib * 1024:.2f} s (2 cores here)"
        )
        print(f"peak RSS CLI:          {cli_rss:6.1f} MB    (target <= 150 MB)")
        print(f"peak RSS server:       {server_rss:6.1f} MB    (target <= 150 MB)")
    finally:
        if procs is not None:
            procs.stop_all()
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
