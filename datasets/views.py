"""The Datasets tab: browse, preview, download, delete, create folders and upload in parts.

Every route fetches the project through projects.access (outsiders get 404) and every key goes
through services.validate_key (inside the services), so no route can reach outside a bucket."""

import csv
import io
import json
import mimetypes
from urllib.parse import urlencode

from asgiref.sync import sync_to_async
from django.conf import settings
from django.contrib.auth.decorators import login_required
from django.core.handlers.asgi import ASGIRequest
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse, StreamingHttpResponse
from django.shortcuts import redirect, render
from django.urls import reverse
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from datasets import services
from datasets.services import InvalidKey, StorageError
from datasets.storage import bucket_root, is_s3
from projects.access import get_project
from projects.models import Project

PREVIEW_BYTES = 64 * 1024
PREVIEW_ROWS = 100
TEXT_EXTENSIONS = {".txt", ".log", ".md", ".yaml", ".yml", ".py", ".sh", ".cfg", ".ini", ".toml", ".jsonl"}
# Only raster formats are served inline: an SVG or HTML file shown from our origin could run
# script with the user's session.
INLINE_IMAGES = {"image/png", "image/jpeg", "image/gif", "image/webp", "image/bmp"}


def _browse_url(project: Project, kind: str, prefix: str = "") -> str:
    query = {"bucket": kind}
    if prefix:
        query["prefix"] = prefix
    return reverse("datasets:browse", args=[project.slug]) + "?" + urlencode(query)


def _breadcrumbs(prefix: str) -> list[tuple[str, str]]:
    crumbs, acc = [], ""
    for segment in prefix.rstrip("/").split("/") if prefix else []:
        acc += segment + "/"
        crumbs.append((segment, acc))
    return crumbs


def _parent(key: str) -> str:
    trimmed = key.rstrip("/")
    return trimmed.rsplit("/", 1)[0] + "/" if "/" in trimmed else ""


def _connection(project: Project) -> dict:
    if not is_s3():
        return {
            "s3": False,
            "inputs_path": bucket_root(project.inputs_bucket),
            "outputs_path": bucket_root(project.outputs_bucket),
        }
    return {
        "s3": True,
        "endpoint": settings.AICHOR_S3_ENDPOINT or f"https://s3.{settings.AICHOR_S3_REGION}.amazonaws.com",
        "region": settings.AICHOR_S3_REGION,
        "access_key": settings.AICHOR_S3_ACCESS_KEY,
        "secret_key": settings.AICHOR_S3_SECRET_KEY,
    }


def _render_browser(request: HttpRequest, project: Project, kind: str, prefix: str, *, error: str = "", status=200):
    page, bucket = None, ""
    try:
        bucket = services.bucket_name(project, kind)
        page = services.list_objects(bucket, prefix, cursor=request.GET.get("cursor") or None)
    except (InvalidKey, StorageError) as exc:
        error, status = error or str(exc), 400 if isinstance(exc, InvalidKey) else 502
        kind, prefix = (kind if kind in services.BUCKET_KINDS else "inputs"), ""
    context = {
        "project": project,
        "section": "datasets",
        "kind": kind,
        "bucket": bucket,
        "prefix": prefix,
        "crumbs": _breadcrumbs(prefix),
        "parent": _parent(prefix),
        "page": page,
        "cursor": request.GET.get("cursor", ""),
        "error": error,
        "buckets": [(k, services.bucket_name(project, k)) for k in services.BUCKET_KINDS],
        "connection": _connection(project),
        "part_mb": settings.AICHOR_UPLOAD_PART_MB,
    }
    template = "datasets/_browser.html" if request.htmx else "datasets/browse.html"
    return render(request, template, context, status=status)


@login_required
@require_GET
def browse(request: HttpRequest, slug: str) -> HttpResponse:
    project, _ = get_project(request.user, slug)
    return _render_browser(request, project, request.GET.get("bucket", "inputs"), request.GET.get("prefix", ""))


def _after_change(request: HttpRequest, project: Project, kind: str, prefix: str, error: str = "") -> HttpResponse:
    if error or request.htmx:
        # htmx swaps the updated browser in place; a refused form shows its reason.
        return _render_browser(request, project, kind, prefix, error=error, status=400 if error else 200)
    return redirect(_browse_url(project, kind, prefix))


@login_required
@require_POST
def create_folder(request: HttpRequest, slug: str) -> HttpResponse:
    project, _ = get_project(request.user, slug)
    kind, prefix = request.POST.get("bucket", ""), request.POST.get("prefix", "")
    try:
        key = services.create_folder(services.bucket_name(project, kind), prefix, request.POST.get("name", ""))
    except (InvalidKey, StorageError) as exc:
        return _after_change(request, project, kind, prefix, error=f"Folder not created: {exc}")
    return _after_change(request, project, kind, key)


@login_required
@require_POST
def delete(request: HttpRequest, slug: str) -> HttpResponse:
    project, _ = get_project(request.user, slug)
    kind, key = request.POST.get("bucket", ""), request.POST.get("key", "")
    try:
        services.delete(services.bucket_name(project, kind), key)
    except (InvalidKey, StorageError) as exc:
        return _after_change(request, project, kind, "", error=f"Not deleted: {exc}")
    return _after_change(request, project, kind, _parent(key))


def _object_from_query(request: HttpRequest, slug: str) -> tuple[Project, str, str]:
    project, _ = get_project(request.user, slug)
    return project, services.bucket_name(project, request.GET.get("bucket", "")), request.GET.get("key", "")


async def _async_chunks(obj: services.StoredObject):
    # Django's ASGI handler would read a synchronous iterator whole into memory before
    # sending it; each chunk is read in a worker thread instead.
    chunks = obj.chunks()
    read = sync_to_async(next, thread_sensitive=False)
    try:
        while (chunk := await read(chunks, None)) is not None:
            yield chunk
    finally:
        await sync_to_async(chunks.close, thread_sensitive=False)()


@login_required
@require_GET
def download(request: HttpRequest, slug: str) -> HttpResponse:
    try:
        project, bucket, key = _object_from_query(request, slug)
        content_type = mimetypes.guess_type(key)[0] or "application/octet-stream"
        inline = request.GET.get("inline") == "1" and content_type in INLINE_IMAGES
        name = key.rsplit("/", 1)[-1]
        if is_s3():
            services.object_size(bucket, key)  # a missing file is a 404 here, not at the bucket
            return redirect(
                services.download_url(
                    bucket,
                    key,
                    filename=name,
                    content_type=content_type if inline else "application/octet-stream",
                    inline=inline,
                )
            )
        obj = services.open_object(bucket, key)
    except InvalidKey as exc:
        return HttpResponse(f"Refused: {exc}", status=400, content_type="text/plain")
    except FileNotFoundError:
        raise Http404("No such file") from None
    except StorageError as exc:
        return HttpResponse(str(exc), status=502, content_type="text/plain")
    content = _async_chunks(obj) if isinstance(request, ASGIRequest) else obj.chunks()
    response = StreamingHttpResponse(content, content_type=content_type if inline else "application/octet-stream")
    response["Content-Length"] = str(obj.size)
    # Validated keys hold only [A-Za-z0-9._-]: the file name needs no quoting beyond this.
    response["Content-Disposition"] = f'{"inline" if inline else "attachment"}; filename="{name}"'
    return response


@login_required
@require_GET
def preview(request: HttpRequest, slug: str) -> HttpResponse:
    context: dict = {"kind": request.GET.get("bucket", ""), "key": request.GET.get("key", ""), "section": "datasets"}
    status = 200
    try:
        project, bucket, key = _object_from_query(request, slug)
        context["project"] = project
        context.update(_preview(bucket, key))
    except InvalidKey as exc:
        context["error"], status = f"Refused: {exc}", 400
    except FileNotFoundError:
        raise Http404("No such file") from None
    except StorageError as exc:
        context["error"], status = str(exc), 502
    if "project" not in context:
        context["project"], _ = get_project(request.user, slug)
    template = "datasets/_preview.html" if request.htmx else "datasets/preview.html"
    return render(request, template, context, status=status)


def _preview(bucket: str, key: str) -> dict:
    services.validate_key(key)
    content_type = mimetypes.guess_type(key)[0] or ""
    extension = "." + key.rsplit(".", 1)[-1].lower() if "." in key.rsplit("/", 1)[-1] else ""
    if content_type in INLINE_IMAGES:
        services.object_size(bucket, key)  # 404 before rendering an <img> that would fail
        return {"mode": "image"}
    if extension not in TEXT_EXTENSIONS | {".csv", ".tsv", ".json"} and not content_type.startswith("text/"):
        return {"mode": "none", "size": services.object_size(bucket, key)}
    head, size = services.read_head(bucket, key, PREVIEW_BYTES)
    text = head.decode("utf-8", "replace")
    truncated = size > len(head)
    if extension in (".csv", ".tsv"):
        lines = text.splitlines()
        if truncated and lines:
            lines = lines[:-1]  # the last line may be cut in the middle
        rows = list(
            csv.reader(
                io.StringIO("\n".join(lines[: PREVIEW_ROWS + 1])), delimiter="\t" if extension == ".tsv" else ","
            )
        )
        return {"mode": "table", "rows": rows, "size": size, "truncated": truncated or len(lines) > PREVIEW_ROWS + 1}
    if extension == ".json" and not truncated:
        try:
            text = json.dumps(json.loads(text), indent=2, ensure_ascii=False)
        except ValueError:
            pass
    return {"mode": "text", "text": text, "size": size, "truncated": truncated}


# --- Uploads in parts (static/datasets.js) -------------------------------------------------
def _json_error(exc: Exception) -> JsonResponse:
    return JsonResponse({"error": str(exc)}, status=400 if isinstance(exc, InvalidKey) else 502)


def _int(value, what: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise InvalidKey(f"{what} must be a whole number") from None


@login_required
@require_POST
def upload_start(request: HttpRequest, slug: str) -> JsonResponse:
    project, _ = get_project(request.user, slug)
    try:
        bucket = services.bucket_name(project, request.POST.get("bucket", ""))
        upload = services.start_upload(bucket, request.POST.get("key", ""), _int(request.POST.get("size"), "size"))
    except (InvalidKey, StorageError) as exc:
        return _json_error(exc)
    return JsonResponse(upload, status=201)


@login_required
@require_http_methods(["PUT"])
async def upload_part(request: HttpRequest, slug: str) -> JsonResponse:
    # Async so that the uploader's parts in flight are stored in parallel: a sync view would run
    # them one after another on Django's single sync thread.
    project, _ = await sync_to_async(get_project)(await request.auser(), slug)
    try:
        bucket = services.bucket_name(project, request.GET.get("bucket", ""))
        length = _int(request.META.get("CONTENT_LENGTH"), "Content-Length")
        # A part is a few MiB; anything bigger is not from our uploader.
        if length < 0 or length > services.part_size_for(services.MAX_OBJECT_SIZE):
            raise InvalidKey("the part is too large")
        await sync_to_async(services.upload_part, thread_sensitive=False)(
            bucket,
            request.GET.get("key", ""),
            request.GET.get("upload_id", ""),
            _int(request.GET.get("part"), "part"),
            # Under ASGI Django has already spooled the body to a seekable file: hand that on.
            getattr(request, "_stream", request),
            length,
        )
    except (InvalidKey, StorageError) as exc:
        return _json_error(exc)
    return JsonResponse({"ok": True})


@login_required
@require_POST
def upload_complete(request: HttpRequest, slug: str) -> JsonResponse:
    project, _ = get_project(request.user, slug)
    try:
        kind = request.POST.get("bucket", "")
        key = request.POST.get("key", "")
        services.complete_upload(
            services.bucket_name(project, kind),
            key,
            request.POST.get("upload_id", ""),
            _int(request.POST.get("size"), "size"),
        )
    except (InvalidKey, StorageError) as exc:
        return _json_error(exc)
    return JsonResponse({"ok": True, "key": key}, status=201)


@login_required
@require_POST
def upload_abort(request: HttpRequest, slug: str) -> JsonResponse:
    project, _ = get_project(request.user, slug)
    try:
        services.abort_upload(
            services.bucket_name(project, request.POST.get("bucket", "")),
            request.POST.get("key", ""),
            request.POST.get("upload_id", ""),
        )
    except (InvalidKey, StorageError) as exc:
        return _json_error(exc)
    return JsonResponse({"ok": True})
