"""The `aichor` command line: configure a server and token, submit local work or a pushed
commit, follow, cancel and resubmit experiments, and forward a port into a running one."""

import asyncio
import hashlib
import json
import shlex
import sys
import threading
import uuid
from pathlib import Path

import click
import requests
from tqdm import tqdm

from aichor.cli import config
from aichor.cli.client import Client, CliError, server_url
from aichor.cli.pack import Layout, TreeChanged, iter_files, plan_tar, send_tar
from aichor.cli.scaffold import DEFAULT_BASE_IMAGE, init_repo
from aichor.cli.scaffold import OPERATORS as SCAFFOLD_OPERATORS
from aichor.cli.upload import Upload, fingerprint
from experiments.manifest import ManifestError, parse_manifest

DEFAULT_MANIFEST = "aichor_manifests/manifest.yaml"
MANIFESTS_DIR = "aichor_manifests"
# Where `submit local` looks without -f, in order (AIchor's CLI does the same).
MANIFEST_LOOKUP = ("manifest.yaml", DEFAULT_MANIFEST)
# The steps before the workload runs: a failure there leaves no process output to follow.
EARLY_STEPS = ("Waiting", "Cloning", "Building", "Submitting")
TAIL_LINES = 30
json_option = click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")


def emit(data, as_json: bool, text: str) -> None:
    click.echo(json.dumps(data, indent=2) if as_json else text)


def current_project(cfg: dict) -> str:
    if not cfg.get("project"):
        raise CliError("no project selected: run `aichor context set project NAME`")
    return cfg["project"]


def experiment_id(client: Client, value: str) -> str:
    """A full id, or a unique prefix of one in the current project (the short id shown)."""
    try:
        return str(uuid.UUID(value))
    except ValueError:
        pass
    project = config.load().get("project")
    if not project or len(value) < 4:
        raise CliError(f"no experiment {value}")
    items = client.get(f"/projects/{project}/experiments", params={"q": value.lower(), "limit": 2})["items"]
    matches = [i for i in items if i["id"].startswith(value.lower())]
    if len(matches) != 1:
        raise CliError(f"no experiment {value}" if not matches else f"{value} is ambiguous: give more of the id")
    return matches[0]["id"]


def describe(e: dict) -> str:
    code = f" (exit {e['exit_code']})" if e.get("exit_code") is not None else ""
    reason = f"\nreason: {e['failure_reason']}" if e.get("failure_reason") else ""
    origin = f"{e['commit_sha'][:12]} on {e['branch']}" if e["source"] == "git" else "uploaded archive"
    return (
        f"{e['id']}  {e['status']}{code}  step: {e['current_step']}\n"
        f"project: {e['project']}  engine: {e['engine']}  code: {origin}  manifest: {e['manifest_path']}\n"
        f"message: {e['message'] or '-'}{reason}"
    )


def resources_text(resources: dict | None) -> str:
    """CPUs and GPUs in fixed-width columns ("20 CPU 8 × A100 GPU"), as the dashboard's table:
    the GPU type only when a single short one is named; blank before the manifest is read."""
    if not resources:
        return " " * 23
    kinds = list(resources["gpus_by_type"])
    gpus = str(resources["gpus"])
    if len(kinds) == 1 and 0 < len(kinds[0]) <= 10:
        gpus = f"{gpus} × {kinds[0].upper()}"
    return f"{resources['cpus']:>4} CPU {gpus:>10} GPU"


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="aichor", message="aichor %(version)s")
def cli() -> None:
    """aichor: run machine-learning experiments on an aichor server."""


# --- auth and context --------------------------------------------------------------------
@cli.group()
def auth() -> None:
    """Configure the API token."""


@auth.command("key")
@click.option("--apikey", required=True, help="An API token from the server's API token page.")
@click.option("--url", help=f"The server's address (default: the configured one, or {config.DEFAULT_URL}).")
@json_option
def auth_key(apikey: str, url: str | None, as_json: bool) -> None:
    """Check a token against the server and store it."""
    cfg = config.load()
    url = server_url(url or cfg.get("url") or config.DEFAULT_URL)
    me = Client(url, apikey.strip()).get("/me")
    cfg.update(url=url, token=apikey.strip())
    path = config.save(cfg)
    emit(
        {"url": url, "username": me["username"], "config": str(path)},
        as_json,
        f"Authenticated as {me['username']} on {url}",
    )


@cli.group()
def context() -> None:
    """Choose the project and engine commands apply to."""


@context.group("set")
def context_set() -> None:
    """Set the current project or engine."""


@context_set.command("project")
@click.argument("name")
def set_project(name: str) -> None:
    """Use project NAME (its slug) from now on."""
    project = Client().get(f"/projects/{name}", not_found=f"no project {name} (or you are not a member)")
    cfg = config.load()
    cfg["project"] = project["slug"]
    engines = [e["name"] for e in project["engines"]]
    if cfg.get("engine") not in engines:
        cfg["engine"] = project["default_engine"]
    config.save(cfg)
    click.echo(f"project: {project['slug']}  engine: {cfg['engine'] or '-'}")


@context_set.command("engine")
@click.argument("name")
def set_engine(name: str) -> None:
    """Run experiments on engine NAME (one of the current project's)."""
    cfg = config.load()
    slug = current_project(cfg)
    engines = [e["name"] for e in Client().get(f"/projects/{slug}/engines", not_found=f"no project {slug}")]
    if name not in engines:
        raise CliError(f"project {slug} has no engine {name} (it has: {', '.join(engines) or 'none'})")
    cfg["engine"] = name
    config.save(cfg)
    click.echo(f"engine: {name}")


@context.command("show")
@json_option
def context_show(as_json: bool) -> None:
    """Print the server, token and current project and engine."""
    cfg = config.load()
    token = cfg.get("token")
    data = {
        "url": cfg.get("url") or config.DEFAULT_URL,
        "token": f"{token[:11]}…" if token else None,
        "project": cfg.get("project"),
        "engine": cfg.get("engine"),
        "config": str(config.config_path()),
    }
    emit(data, as_json, "\n".join(f"{k}: {v if v is not None else '-'}" for k, v in data.items()))


# --- experiments -------------------------------------------------------------------------
@cli.group()
def experiments() -> None:
    """Submit, follow, cancel and resubmit experiments."""


@experiments.group()
def submit() -> None:
    """Start an experiment from local files or from a pushed commit."""


@submit.command("local")
@click.option("--repo-dir", default=".", type=click.Path(file_okay=False, path_type=Path), help="Default: here.")
@click.option("--message", "-m", default="", help="What this run tries.")
@click.option(
    "-f",
    "--manifest",
    "--manifest-path",
    "manifest_path",
    help=f"Relative to the repo dir or to aichor_manifests/ (default: {' or '.join(MANIFEST_LOOKUP)}).",
)
@json_option
def submit_local(repo_dir: Path, message: str, manifest_path: str | None, as_json: bool) -> None:
    """Pack the working tree (honouring .gitignore, without .git), upload it and run it."""
    cfg = config.load()
    slug = current_project(cfg)
    if not repo_dir.is_dir():
        raise CliError(f"{repo_dir} is not a directory")
    manifest_path = find_manifest(repo_dir, manifest_path)
    check_manifest(repo_dir / manifest_path, manifest_path)
    client = Client()
    files = list(iter_files(repo_dir))
    if manifest_path not in files:
        raise CliError(f"manifest {manifest_path} is excluded by a .gitignore")
    headers_digest = hashlib.sha256()
    members, length = plan_tar(repo_dir, files, headers_digest)
    params = {"manifest_path": manifest_path, "message": message}
    if cfg.get("engine"):
        params["engine"] = cfg["engine"]
    started = client.post(
        f"/projects/{slug}/experiments/uploads",
        json={**params, "size": length, "fingerprint": fingerprint(headers_digest, length)},
        not_found=f"no project {slug}",
    )
    if started["method"] == "multipart":
        experiment = send_to_object_storage(client, slug, Layout(members, length), started, params)
    else:
        experiment = stream_to_server(client, slug, members, length, params)
    emit(experiment, as_json, f"Submitted {experiment['id']} ({len(files)} files)")


def progress_bar(total: int, initial: int = 0) -> tqdm:
    return tqdm(
        total=total,
        initial=initial,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc="upload",
        file=sys.stderr,
    )


def send_to_object_storage(client: Client, slug: str, layout: Layout, started: dict, params: dict) -> dict:
    """The archive in parts straight to object storage, then completed by the server."""
    upload = Upload(client, slug, layout, started)
    resumed = upload.resumed_bytes()
    if resumed:
        click.echo(
            f"resuming an interrupted upload: {len(upload.held)} of {upload.parts} parts already uploaded",
            err=True,
        )
    bar = progress_bar(layout.total, resumed)
    lock = threading.Lock()

    def progress(n: int) -> None:
        with lock:
            bar.update(n)

    try:
        digests = upload.send(progress)
    except TreeChanged as exc:
        raise CliError(str(exc)) from None
    finally:
        bar.close()
    return client.post(
        f"{upload.path}/complete",
        json={**params, "parts": [{"number": n, "sha256": d} for n, d in sorted(digests.items())]},
        not_found="the upload was refused: run the command again",
    )


def stream_to_server(client: Client, slug: str, members, length: int, params: dict) -> dict:
    """The archive as one request body to the server, which stores it (filesystem backend)."""
    bars: list[tqdm] = []

    def send(sock) -> None:
        # The bar appears once the server has said go on: a refusal up front prints one line.
        bars.append(progress_bar(sum(m.size for m in members)))
        send_tar(sock, members, progress=bars[0].update)

    try:
        return client.upload(
            f"/projects/{slug}/experiments/archive",
            params=params,
            length=length,
            content_type="application/x-tar",
            send_body=send,
            not_found=f"no project {slug}",
        )
    except TreeChanged as exc:
        raise CliError(str(exc)) from None
    finally:
        for bar in bars:
            bar.close()


def find_manifest(repo_dir: Path, given: str | None) -> str:
    """The manifest's path in the repo dir, looked up as AIchor's CLI does: the one given (as
    is, else under aichor_manifests/), else manifest.yaml, else aichor_manifests/manifest.yaml."""
    if given:
        given = Path(given).as_posix().removeprefix("./")
        candidates = [given] if given.startswith(f"{MANIFESTS_DIR}/") else [given, f"{MANIFESTS_DIR}/{given}"]
    else:
        candidates = list(MANIFEST_LOOKUP)
    for candidate in candidates:
        if (repo_dir / candidate).is_file():
            return candidate
    looked = ", ".join(candidates)
    hint = "give its path with -f PATH, or" if not given else "check -f, or"
    raise CliError(f"no manifest in {repo_dir.resolve()} (looked for {looked}): {hint} run aichor local-repo init")


def check_manifest(path: Path, shown: str) -> None:
    """The server's own validation, before anything is packed or sent: every problem on its
    own line, by its path in the manifest (project PVC names are checked by the server only)."""
    try:
        parse_manifest(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise CliError(f"manifest {shown} is not UTF-8 text: nothing uploaded") from None
    except ManifestError as exc:
        for error in exc.errors:
            click.echo(f"{shown}: {error}", err=True)
        count = f"{len(exc.errors)} error{'s' if len(exc.errors) > 1 else ''}"
        raise CliError(f"manifest {shown} is invalid ({count}): nothing uploaded") from None


@submit.command("commit-sha")
@click.argument("sha")
@click.option("--branch", required=True, help="The branch the commit was pushed to.")
@click.option("--manifest-path", default=DEFAULT_MANIFEST, show_default=True, help="Relative to the repository root.")
@click.option("--message", "-m", default="", help="What this run tries.")
@json_option
def submit_commit(sha: str, branch: str, manifest_path: str, message: str, as_json: bool) -> None:
    """Run a commit already pushed to the project's repository."""
    cfg = config.load()
    slug = current_project(cfg)
    payload = {"sha": sha, "branch": branch, "manifest_path": manifest_path, "message": message}
    if cfg.get("engine"):
        payload["engine"] = cfg["engine"]
    experiment = Client().post(f"/projects/{slug}/experiments", json=payload, not_found=f"no project {slug}")
    emit(experiment, as_json, f"Submitted {experiment['id']}")


@experiments.command("list")
@click.option("--status", type=click.Choice(["Created", "Processing", "Succeeded", "Failed", "Cancelled"]))
@click.option("--limit", default=20, show_default=True, type=click.IntRange(1, 200))
@click.option("--engine", help="Only experiments on engine NAME (default: every engine).")
@json_option
def list_experiments(status: str | None, limit: int, engine: str | None, as_json: bool) -> None:
    """The current project's latest experiments, on every engine unless --engine names one."""
    slug = current_project(config.load())
    params = {"limit": limit} | ({"status": status} if status else {}) | ({"engine": engine} if engine else {})
    items = Client().get(f"/projects/{slug}/experiments", params=params, not_found=f"no project {slug}")["items"]
    lines = [
        f"{e['short_id']}  {e['engine']:<12} {e['status']:<10} {e['current_step']:<10} "
        f"{resources_text(e.get('resources'))}  "
        f"{e['created_at'][:19]}  {e['author']:<20} "
        f"{(e['message'] or '').splitlines()[0][:50] if e['message'] else ''}"
        for e in items
    ]
    emit(items, as_json, "\n".join(lines) if lines else "no experiments")


@experiments.command("status")
@click.argument("experiment")
@json_option
def status(experiment: str, as_json: bool) -> None:
    """An experiment's status and current step."""
    client = Client()
    eid = experiment_id(client, experiment)
    data = client.get(f"/experiments/{eid}", not_found=f"no experiment {experiment}")
    emit(data, as_json, describe(data))


@experiments.command("step")
@click.argument("experiment")
@json_option
def step(experiment: str, as_json: bool) -> None:
    """An experiment's steps with their statuses and times."""
    client = Client()
    eid = experiment_id(client, experiment)
    steps = client.get(f"/experiments/{eid}/steps", not_found=f"no experiment {experiment}")
    lines = [
        f"{s['name']:<11} {s['status']:<10} {(s['started_at'] or '')[:19]:<19}  {(s['ended_at'] or '')[:19]}"
        for s in steps
    ]
    emit(steps, as_json, "\n".join(lines))


@experiments.command("logs")
@click.argument("experiment")
@click.option("--follow", "-f", is_flag=True, help="Keep printing until the experiment ends; exit with its outcome.")
@click.option("--stream", help='"process:<name>" or "step:<Step>" (default: every process).')
def logs(experiment: str, follow: bool, stream: str | None) -> None:
    """Print an experiment's logs. With -f the exit code is the outcome: 0 Succeeded, the
    workload's exit code (else 1) Failed, 130 Cancelled."""
    client = Client()
    eid = experiment_id(client, experiment)
    params = {"follow": "true" if follow else "false"} | ({"stream": stream} if stream else {})
    response = client.request(
        "GET", f"/experiments/{eid}/logs", params=params, stream=True, timeout=(10, None),
        not_found=f"no experiment {experiment}",
    )  # fmt: skip
    out = sys.stdout.buffer
    try:
        for chunk in response.iter_content(chunk_size=None):
            out.write(chunk)
            out.flush()
    except requests.exceptions.RequestException:
        raise CliError(f"the log stream from {client.url} broke off: run the command again") from None
    data = client.get(f"/experiments/{eid}", not_found=f"no experiment {experiment}")
    if not stream:
        report_early_failure(client, data)
    if follow:
        sys.exit(outcome_code(data))


def report_early_failure(client: Client, data: dict) -> None:
    """A run that failed before Running wrote no process output: say which step failed, why,
    and show the end of that step's log, so the reason is not one more command away."""
    if data["status"] != "Failed":
        return
    steps = client.get(f"/experiments/{data['id']}/steps")
    failed = next((s["name"] for s in steps if s["status"] == "Failed"), None)
    if failed not in EARLY_STEPS:
        return
    text = client.request(
        "GET", f"/experiments/{data['id']}/logs", params={"stream": f"step:{failed}", "tail": TAIL_LINES}
    ).text
    click.echo(f"{failed} failed: {data['failure_reason'] or 'no reason recorded'}", err=True)
    if text.strip():
        click.echo(f"--- the last lines of the {failed} log ---", err=True)
        click.echo(text.rstrip("\n"), err=True)


def outcome_code(data: dict) -> int:
    if data["status"] == "Succeeded":
        return 0
    if data["status"] == "Cancelled":
        return 130  # as a shell reports a run stopped with Ctrl-C
    code = data.get("exit_code")
    # A code a shell cannot carry (0 for a failure, over 255 from a cluster) becomes 1.
    return code if data["status"] == "Failed" and code and 0 < code < 256 else 1


@experiments.command("cancel")
@click.argument("experiment")
@json_option
def cancel(experiment: str, as_json: bool) -> None:
    """Stop an experiment (a clone, a build or the running workload)."""
    client = Client()
    eid = experiment_id(client, experiment)
    data = client.post(f"/experiments/{eid}/cancel", not_found=f"no experiment {experiment}")
    emit(data, as_json, f"{data['id']} {data['status']}")


@experiments.command("metrics")
@click.argument("experiment")
@json_option
def metrics(experiment: str, as_json: bool) -> None:
    """The scalar series an experiment recorded (AICHOR_METRIC lines, TensorBoard scalars)."""
    client = Client()
    eid = experiment_id(client, experiment)
    data = client.get(f"/experiments/{eid}/metrics", not_found=f"no experiment {experiment}")
    lines = [
        f"{s['name']:<32} {s['count']:>8} points  last {s['last_value']:<12g} at step {s['last_step']:<8} best {s['best_value']:g}"
        for s in data["series"]
    ]
    emit(data, as_json, "\n".join(lines) if lines else "no metrics")


@experiments.command("resubmit")
@click.argument("experiment")
@json_option
def resubmit(experiment: str, as_json: bool) -> None:
    """Run an ended experiment's code and manifest again, as a new experiment."""
    client = Client()
    eid = experiment_id(client, experiment)
    data = client.post(f"/experiments/{eid}/resubmit", not_found=f"no experiment {experiment}")
    emit(data, as_json, f"Submitted {data['id']} (resubmission of {eid})")


@experiments.command("port-forward")
@click.argument("experiment")
@click.argument("port", type=click.IntRange(1, 65535))
@click.option("--process", help="Which process (default: the first, e.g. worker-0).")
@click.option("--local-port", type=click.IntRange(0, 65535), default=None, help="Default: the same as PORT.")
def port_forward(experiment: str, port: int, process: str | None, local_port: int | None) -> None:
    """Open a local port to PORT inside a running experiment (for an IDE or a debugger)."""
    from aichor.cli.portforward import serve

    client = Client()
    eid = experiment_id(client, experiment)
    data = client.get(f"/experiments/{eid}", not_found=f"no experiment {experiment}")
    if data["status"] != "Processing" or data["current_step"] != "Running":
        raise CliError(f"experiment {data['short_id']} is not running ({data['status']}, {data['current_step']})")
    try:
        asyncio.run(serve(client.url, client.token, eid, port, process, port if local_port is None else local_port))
    except OSError as exc:
        raise CliError(f"cannot listen on the local port: {exc.strerror or exc}") from None


# --- local repository --------------------------------------------------------------------
@cli.group("local-repo")
def local_repo() -> None:
    """Work with a local code folder."""


@local_repo.command("init")
@click.argument("directory", default=".", type=click.Path(file_okay=False, path_type=Path))
@click.option("--base-image", default=DEFAULT_BASE_IMAGE, show_default=True, help="The Dockerfile's FROM image.")
@click.option("--operator", type=click.Choice(SCAFFOLD_OPERATORS), help=f"Default: {SCAFFOLD_OPERATORS[0]}.")
@click.option("--count", type=click.IntRange(1, 1024), help="Processes (kuberay: worker nodes). Default: 1.")
@click.option("--cpus", type=click.IntRange(1, 1024), help="CPUs per process. Default: 1.")
@click.option("--ram-ratio", type=click.FloatRange(0.1, 1024), help="GB of memory per CPU. Default: 2.")
def local_repo_init(
    directory: Path, base_image: str, operator: str | None, count: int | None, cpus: int | None, ram_ratio: float | None
) -> None:
    """Write a Dockerfile, aichor_manifests/manifest.yaml and src/ ready to submit. On a
    terminal it asks for the operator and the resources the flags leave out."""
    # Asked as AIchor's CLI asks; a script or a pipe gets the defaults instead of a hung prompt.
    ask = sys.stdin.isatty()
    if operator is None:
        operator = (
            click.prompt("Operator", type=click.Choice(SCAFFOLD_OPERATORS), default=SCAFFOLD_OPERATORS[0])
            if ask
            else SCAFFOLD_OPERATORS[0]
        )
    what = "worker nodes" if operator == "kuberay" else "processes"
    if count is None:
        count = click.prompt(f"Number of {what}", type=click.IntRange(1, 1024), default=1) if ask else 1
    if cpus is None:
        cpus = click.prompt("CPUs per process", type=click.IntRange(1, 1024), default=1) if ask else 1
    if ram_ratio is None:
        ram_ratio = click.prompt("GB of memory per CPU", type=click.FloatRange(0.1, 1024), default=2.0) if ask else 2.0
    directory.mkdir(parents=True, exist_ok=True)
    try:
        written = init_repo(directory, base_image, operator=operator, count=count, cpus=cpus, ram_ratio=ram_ratio)
    except FileExistsError as exc:
        raise CliError(f"{exc}: nothing written") from None
    click.echo("\n".join(f"created {directory / rel}" for rel in written))
    click.echo("\nNext:")
    for step in next_steps(directory, config.load()):
        click.echo(f"  {step}")


def next_steps(directory: Path, cfg: dict) -> list[str]:
    """What is left before the scaffold runs, given what this machine has configured already."""
    steps = []
    if directory.resolve() != Path.cwd().resolve():
        steps.append(f"cd {shlex.quote(str(directory))}")
    steps.append("edit src/main.py (and list its packages in src/requirements.txt)")
    if not cfg.get("token"):
        steps.append("aichor auth key --apikey TOKEN --url https://…   (a token from the server's API token page)")
    if not cfg.get("project"):
        steps.append("aichor context set project NAME")
    steps.append("aichor experiments submit local")
    return steps


def one_line(message: str) -> str:
    return "; ".join(line.strip() for line in str(message).splitlines() if line.strip())


def main() -> None:
    # Not click's standalone mode: it prints a usage error as usage, hint and error on several
    # lines; every error here is one line.
    try:
        code = cli.main(prog_name="aichor", standalone_mode=False)
    except (KeyboardInterrupt, click.exceptions.Abort):
        sys.exit(130)
    except click.exceptions.NoArgsIsHelpError as exc:  # a bare group: its help, as click shows it
        exc.show()
        sys.exit(exc.exit_code)
    except click.UsageError as exc:
        where = exc.ctx.command_path if exc.ctx else "aichor"
        click.echo(f"Error: {one_line(exc.format_message())} (see `{where} --help`)", err=True)
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        click.echo(f"Error: {one_line(exc.format_message())}", err=True)
        sys.exit(exc.exit_code)
    except (config.ConfigError, OSError) as exc:
        click.echo(f"Error: {one_line(exc)}", err=True)
        sys.exit(1)
    except Exception as exc:  # the last guard: one line, never a traceback
        click.echo(f"Error: {type(exc).__name__}: {one_line(exc)}", err=True)
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
