"""Benchmark: `aichor experiments submit local` of a 1 GiB tree.

Object storage (the target): a live server (uvicorn subprocess on this run's PostgreSQL) whose
archives live in a SeaweedFS bucket; submit local sends the archive in parts straight to
SeaweedFS by URLs the server signs. Compared in the same run, rounds alternated, with boto3's
`upload_file` of the same tar (byte for byte) to the same SeaweedFS, with boto3's defaults (8 MiB
parts, 10 threads, its default checksum). Targets: boto3's time / submit local's time >= 0.8;
peak RSS of the CLI and of the server <= 150 MiB.

Filesystem (information only): submit local to a server that stores archives on its own
filesystem (the streaming path), against a raw copy of the same files into the same storage.
The former target on this figure is retired: the raw copy measured a page-cache copy.

Each round starts with the page cache written back (sync): how fast the kernel takes 1 GiB of
writes depends on how much it still has to write back, so single rounds vary; medians compared.

    .venv/bin/python bench/upload.py [--size-mb 1024] [--files 16] [--rounds 3]
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench._common import BIN, MiB, Processes, exit_status, figure, scratch_dir, setup_django  # noqa: E402

RSS_TARGET_MIB = 150
RATIO_TARGET = 0.8


def make_tree(root: Path, size_mib: int, files: int) -> None:
    per_file = size_mib * MiB // files
    block = os.urandom(4 * MiB)  # incompressible, like checkpoints and datasets
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
        "  types:\n    worker:\n      count: 1\n      resources:\n        cpus: 1\n        ramRatio: 1\n"
    )
    (root / "Dockerfile").write_text("FROM scratch\n")


def write_planned_tar(tree: Path, out: Path) -> int:
    """The archive the CLI sends for `tree`, byte for byte, as a file (boto3's input)."""
    from aichor.cli.pack import Layout, iter_files, plan_tar

    members, total = plan_tar(tree, list(iter_files(tree)))
    with open(out, "wb") as fh:
        for piece in Layout(members, total).pieces(0, total):
            if isinstance(piece, bytes):
                fh.write(piece)
                continue
            member, offset, count = piece
            with open(member.path, "rb") as src:
                src.seek(offset)
                while count:
                    data = src.read(min(count, 8 * MiB))
                    fh.write(data)
                    count -= len(data)
    return total


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_cli(args: list[str], env: dict, log: Path) -> tuple[float, str, float, float]:
    """Seconds, stdout, CPU seconds and peak RSS (MiB) of one CLI run. The peak is read from
    /proc while it runs (VmHWM only grows): its rusage's ru_maxrss would include this
    benchmark's own size, which a child inherits across fork and exec."""
    start = time.perf_counter()
    peak = [0.0]
    with open(log, "w") as err:
        child = subprocess.Popen([str(BIN / "aichor"), *args], env=env, stdout=subprocess.PIPE, stderr=err)
        done = threading.Event()

        def watch() -> None:
            while not done.is_set():
                try:
                    peak[0] = max(peak[0], peak_rss_mib(child.pid))
                except (OSError, ValueError):
                    return  # exited
                done.wait(0.02)

        watcher = threading.Thread(target=watch)
        watcher.start()
        out = child.stdout.read().decode()
        _, status, usage = os.wait4(child.pid, 0)
        done.set()
        watcher.join()
    seconds = time.perf_counter() - start
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        lines = log.read_text().strip().splitlines()
        raise SystemExit(f"aichor {' '.join(args[:3])} failed: {lines[-1] if lines else child.returncode}")
    return seconds, out, usage.ru_utime + usage.ru_stime, peak[0]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-mb", type=int, default=1024, help="MiB")
    parser.add_argument("--files", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    env = setup_django("bench_upload")
    scratch = scratch_dir("aichor-bench-upload-")
    from django.contrib.auth import get_user_model
    from django.core.files import File
    from django.core.files.storage import default_storage

    from projects.models import Engine
    from projects.services import create_api_token, create_project
    from tests.datasets.seaweed import start_s3_server

    user = get_user_model().objects.create_user("bench@example.com", "bench@example.com", "bench-pw-123")
    engine = Engine.objects.create(name="local", kind=Engine.Kind.LOCAL)
    create_project(name="Bench", slug="bench", engines=[engine], default_engine=engine, admins=[user])
    token = create_api_token(user)

    tree = scratch / "tree"
    make_tree(tree, args.size_mb, args.files)
    tar_path = scratch / "same.tar"
    total = write_planned_tar(tree, tar_path)
    mib = total / MiB
    print(f"tree: {mib:.0f} MiB in {args.files} files; {os.cpu_count()} cores; load {os.getloadavg()[0]:.1f}")

    s3 = start_s3_server(scratch / "weed")
    bucket = "bench-archives"
    env = {**env, "AICHOR_MAX_ARCHIVE_BYTES": str(4 * 1024**3)}
    env_s3 = {
        **env,
        "AICHOR_STORAGE": "s3",
        "AICHOR_S3_ENDPOINT": s3.endpoint,
        "AICHOR_S3_ACCESS_KEY": s3.access_key,
        "AICHOR_S3_SECRET_KEY": s3.secret_key,
        "AICHOR_S3_REGION": "us-east-1",
        "AICHOR_ARCHIVE_BUCKET": bucket,
        "XDG_CONFIG_HOME": str(scratch / "config-s3"),
    }
    env_fs = {**env, "AICHOR_STORAGE": "filesystem", "XDG_CONFIG_HOME": str(scratch / "config-fs")}
    procs = Processes(env)
    try:
        servers = {}
        for name, server_env in (("s3", env_s3), ("fs", env_fs)):
            procs.env = server_env
            url = procs.server()
            servers[name] = procs.web
            for command in (["auth", "key", "--apikey", token, "--url", url], ["context", "set", "project", "bench"]):
                subprocess.run([str(BIN / "aichor"), *command], env=server_env, check=True, capture_output=True)
        idle_rss = {name: peak_rss_mib(server.pid) for name, server in servers.items()}
        boto = s3.client()  # as a user would make one: boto3's defaults
        boto.create_bucket(Bucket="bench-baseline")
        submit = ["experiments", "submit", "local", "--repo-dir", str(tree), "--json"]

        def baseline() -> float:
            start = time.perf_counter()
            boto.upload_file(str(tar_path), "bench-baseline", "same.tar")
            seconds = time.perf_counter() - start
            boto.delete_object(Bucket="bench-baseline", Key="same.tar")
            return seconds

        def submit_s3() -> tuple[float, float, float, float, float]:
            server, weed = cpu_seconds(servers["s3"].pid), cpu_seconds(s3.process.pid)
            seconds, out, cli_cpu, cli_rss = run_cli(submit, env_s3, scratch / "cli-s3.log")
            server, weed = cpu_seconds(servers["s3"].pid) - server, cpu_seconds(s3.process.pid) - weed
            key = json.loads(out)["archive"].removeprefix(f"s3://{bucket}/")
            stored = boto.head_object(Bucket=bucket, Key=key)["ContentLength"]
            if stored != total:
                raise SystemExit(f"stored archive is {stored} bytes, not {total}")
            boto.delete_object(Bucket=bucket, Key=key)
            return seconds, cli_cpu, cli_rss, server, weed

        def raw_copy() -> float:
            # The same bytes into the same storage, file by file: no HTTP, no tar.
            prefix = f"rawcopy-{uuid.uuid4().hex}"
            start = time.perf_counter()
            for path in sorted(tree.rglob("*")):
                if path.is_file():
                    with open(path, "rb") as fh:
                        default_storage.save(f"{prefix}/{path.relative_to(tree)}", File(fh))
            seconds = time.perf_counter() - start
            shutil.rmtree(Path(default_storage.location) / prefix)
            return seconds

        def submit_fs() -> tuple[float, float, float]:
            seconds, out, _, cli_rss = run_cli(submit, env_fs, scratch / "cli-fs.log")
            archive = json.loads(out)["archive"]
            if default_storage.size(archive) != total:
                raise SystemExit(f"stored archive is {default_storage.size(archive)} bytes, not {total}")
            default_storage.delete(archive)
            return seconds, cli_rss, 0.0

        boto_rounds, s3_rounds, raw_rounds, fs_rounds = [], [], [], []
        for _ in range(args.rounds):
            os.sync()
            boto_rounds.append(baseline())
            os.sync()
            s3_rounds.append(submit_s3())
            os.sync()
            raw_rounds.append(raw_copy())
            os.sync()
            fs_rounds.append(submit_fs())

        print(f"boto3 upload_file rounds: {', '.join(f'{mib / s:.0f}' for s in boto_rounds)} MiB/s")
        print(f"submit local (S3) rounds: {', '.join(f'{mib / r[0]:.0f}' for r in s3_rounds)} MiB/s")
        boto_s = statistics.median(boto_rounds)
        s3_s = statistics.median(r[0] for r in s3_rounds)
        ratio = boto_s / s3_s
        per_gib = 1024 / mib
        figure("S3: boto3 upload_file, median", f"{mib / boto_s:.0f} MiB/s")
        figure("S3: submit local straight to the bucket, median", f"{mib / s3_s:.0f} MiB/s")
        figure(
            "S3: submit local vs boto3 upload_file (time ratio)",
            f"{ratio:.2f}x",
            f">= {RATIO_TARGET}x",
            ratio >= RATIO_TARGET,
        )
        figure("S3: CPU per GiB, CLI", f"{statistics.median(r[1] for r in s3_rounds) * per_gib:.2f} s")
        figure("S3: CPU per GiB, aichor server", f"{statistics.median(r[3] for r in s3_rounds) * per_gib:.2f} s")
        figure("S3: CPU per GiB, SeaweedFS", f"{statistics.median(r[4] for r in s3_rounds) * per_gib:.2f} s")
        cli_rss = max(r[2] for r in s3_rounds)
        server_rss = peak_rss_mib(servers["s3"].pid)
        figure("S3: peak RSS, CLI", f"{cli_rss:.0f} MiB", f"<= {RSS_TARGET_MIB} MiB", cli_rss <= RSS_TARGET_MIB)
        figure(
            "S3: peak RSS, server", f"{server_rss:.0f} MiB", f"<= {RSS_TARGET_MIB} MiB", server_rss <= RSS_TARGET_MIB
        )
        figure("S3: server RSS before any upload (its imports)", f"{idle_rss['s3']:.0f} MiB")

        raw_s = statistics.median(raw_rounds)
        fs_s = statistics.median(r[0] for r in fs_rounds)
        figure("filesystem: raw copy to storage, median", f"{mib / raw_s:.0f} MiB/s")
        figure("filesystem: submit local streamed to the server, median", f"{mib / fs_s:.0f} MiB/s")
        figure("filesystem: submit local vs raw copy (time ratio)", f"{raw_s / fs_s:.2f}x")
        figure("filesystem: peak RSS, CLI", f"{max(r[1] for r in fs_rounds):.0f} MiB")
        figure("filesystem: peak RSS, server", f"{peak_rss_mib(servers['fs'].pid):.0f} MiB")
    finally:
        procs.stop_all()
        s3.process.kill()
        s3.process.wait()


if __name__ == "__main__":
    main()
    sys.exit(exit_status())
