"""One settings module. Embedded defaults (SQLite, filesystem broker and storage, in-memory
channel layer) need no server; production values come from environment variables alone."""

from datetime import timedelta
from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured
from kombu import Queue

from aichor.lib.env import env_bool, env_float, env_int, env_list, env_str

BASE_DIR = Path(__file__).resolve().parent.parent
DATA_DIR = Path(env_str("AICHOR_DATA_DIR", str(BASE_DIR / "var"))).resolve()

DEBUG = env_bool("AICHOR_DEBUG", False)
SECRET_KEY = env_str("AICHOR_SECRET_KEY")
if not SECRET_KEY:
    if not DEBUG and env_bool("AICHOR_REQUIRE_SECRET_KEY", False):
        raise ImproperlyConfigured("AICHOR_SECRET_KEY must be set in production")
    # The embedded default keeps a generated key in the data folder so sessions and encrypted
    # variables survive restarts without anyone having to invent a secret.
    _key_file = DATA_DIR / "secret_key"
    if _key_file.exists():
        SECRET_KEY = _key_file.read_text().strip()
    else:
        import secrets

        DATA_DIR.mkdir(parents=True, exist_ok=True)
        SECRET_KEY = secrets.token_urlsafe(50)
        _key_file.write_text(SECRET_KEY)
        _key_file.chmod(0o600)

ALLOWED_HOSTS = env_list("AICHOR_ALLOWED_HOSTS", ["localhost", "127.0.0.1", "[::1]", "testserver"])
CSRF_TRUSTED_ORIGINS = env_list("AICHOR_CSRF_TRUSTED_ORIGINS", [])
# The externally visible address, used to print webhook URLs.
PUBLIC_URL = env_str("AICHOR_PUBLIC_URL", "http://127.0.0.1:8000").rstrip("/")

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django.forms",  # the widgets' templates, for FORM_RENDERER
    "django_htmx",
    "ninja",  # the API docs page served with its own Swagger files, not from a CDN
    "channels",
    "projects",
    "experiments",
    "datasets",
    "notifications",
    "metrics",
    "axes",  # login throttling (projects/login.py)
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    # Static files (our CSS/JS and the npm packages) from the same server: `make run` has no nginx.
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "django_htmx.middleware.HtmxMiddleware",
    # Turns a locked-out login into the login page with the reason (projects/login.py).
    "axes.middleware.AxesMiddleware",
]

ROOT_URLCONF = "aichor.urls"
TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]
# Every form renders through templates/forms/ (one look on every page).
FORM_RENDERER = "aichor.forms.FormRenderer"
WSGI_APPLICATION = None
ASGI_APPLICATION = "aichor.asgi.application"

DATABASE_URL = env_str("DATABASE_URL", f"sqlite:///{DATA_DIR / 'aichor.sqlite3'}")
try:
    DATABASES = {"default": dj_database_url.parse(DATABASE_URL, conn_max_age=60)}
except Exception as exc:  # dj_database_url raises bare ValueErrors on unknown schemes
    raise ImproperlyConfigured(f"DATABASE_URL is not usable: {exc}") from None
# A connection that died with a database restart is replaced instead of failing a request.
DATABASES["default"]["CONN_HEALTH_CHECKS"] = True
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    DATABASES["default"]["CONN_MAX_AGE"] = 0
    # The web server and the worker write to the same file; WAL plus a busy timeout keeps
    # them from failing each other with "database is locked".
    DATABASES["default"]["OPTIONS"] = {
        "timeout": 20,
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
        "transaction_mode": "IMMEDIATE",
    }
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
]
LOGIN_URL = "login"
AUTHENTICATION_BACKENDS = ["projects.login.LoginThrottle", "django.contrib.auth.backends.ModelBackend"]
# Wrong passwords for one username from one address before a lockout, and how long it lasts.
AXES_FAILURE_LIMIT = env_int("AICHOR_LOGIN_FAILURE_LIMIT", 10)
AXES_COOLOFF_TIME = timedelta(minutes=env_float("AICHOR_LOGIN_LOCKOUT_MINUTES", 15.0))
AXES_LOCKOUT_PARAMETERS = [["username", "ip_address"]]
AXES_RESET_ON_SUCCESS = True
AXES_LOCKOUT_CALLABLE = "projects.login.locked_out"
AXES_VERBOSE = False
LOGIN_REDIRECT_URL = "home"
LOGOUT_REDIRECT_URL = "login"

LANGUAGE_CODE = "en-us"
TIME_ZONE = env_str("AICHOR_TIME_ZONE", "UTC")
USE_I18N = False
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = DATA_DIR / "static"
STATICFILES_DIRS = [BASE_DIR / "static"]
# Serve straight from the source folders too, so a checkout works before collectstatic runs.
WHITENOISE_USE_FINDERS = True
if (BASE_DIR / "node_modules").exists():
    STATICFILES_DIRS.append(("vendor", BASE_DIR / "node_modules"))

# --- Redis: Celery broker and Channels layer in production -------------------------------
REDIS_URL = env_str("REDIS_URL")
if REDIS_URL and not REDIS_URL.startswith(("redis://", "rediss://", "unix://")):
    raise ImproperlyConfigured(f"REDIS_URL={REDIS_URL!r} must start with redis://, rediss:// or unix://")

if REDIS_URL:
    CELERY_BROKER_URL = REDIS_URL
    CELERY_BROKER_TRANSPORT_OPTIONS: dict = {}
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            "CONFIG": {"hosts": [REDIS_URL]},
        }
    }
else:
    # kombu's filesystem transport: a broker that is just a folder, shared by the web server
    # and the worker on one host.
    _broker_dir = DATA_DIR / "broker"
    for _sub in ("queue", "processed", "control"):
        (_broker_dir / _sub).mkdir(parents=True, exist_ok=True)
    # The host is only named so that kombu does not warn "No hostname was supplied" on every
    # connection (the folders below are the whole broker).
    CELERY_BROKER_URL = "filesystem://localhost//"
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        "data_folder_in": str(_broker_dir / "queue"),
        "data_folder_out": str(_broker_dir / "queue"),
        "processed_folder": str(_broker_dir / "processed"),
        "control_folder": str(_broker_dir / "control"),
        "store_processed": False,
        # The worker polls the folder; a short interval keeps queue latency low.
        "polling_interval": 0.05,
    }
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}

CELERY_TASK_ALWAYS_EAGER = env_bool("AICHOR_CELERY_EAGER", False)
CELERY_TASK_EAGER_PROPAGATES = True
CELERY_TASK_IGNORE_RESULT = True
CELERY_TASK_ACKS_LATE = False
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
# Celery's Django fixup closes a worker's database connection before and after every task unless
# this many tasks may reuse it: effectively never here, as aichor.celery applies Django's own
# rule instead (CONN_MAX_AGE, health checks), as for a request.
CELERY_DB_REUSE_MAX = 1_000_000_000
CELERY_TASK_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
# Two queues: clone, build and submit never wait behind watching, completion, stop and reconcile.
# A worker started without -Q consumes both (the embedded default, tests); scripts/run.sh starts
# one worker per queue.
PIPELINE_QUEUE = "celery"
WATCH_QUEUE = "watch"
# Commit statuses, outbound notifications and e-mail: a Git host or receiver that is slow or
# down delays only this queue, never the pipeline.
NOTIFY_QUEUE = "notify"
CELERY_TASK_DEFAULT_QUEUE = PIPELINE_QUEUE
# Each queue its own routing key: by default both would be bound with the key "celery", and a
# direct exchange would copy every message into both.
CELERY_TASK_QUEUES = (
    Queue(PIPELINE_QUEUE, routing_key=PIPELINE_QUEUE),
    Queue(WATCH_QUEUE, routing_key=WATCH_QUEUE),
    Queue(NOTIFY_QUEUE, routing_key=NOTIFY_QUEUE),
)
CELERY_TASK_ROUTES = {
    f"experiments.{name}": {"queue": WATCH_QUEUE}
    for name in ("watch_engine", "watch", "complete", "stop", "reconcile", "sweep_archives")
} | {"notifications.*": {"queue": NOTIFY_QUEUE}}
CELERY_BEAT_SCHEDULE = {
    "reconcile": {
        "task": "experiments.reconcile",
        "schedule": env_float("AICHOR_RECONCILE_SECONDS", 30.0),
    },
    "sweep-archives": {
        "task": "experiments.sweep_archives",
        "schedule": 600.0,
    },
}

# --- Pipeline ----------------------------------------------------------------------------
WORK_DIR = Path(env_str("AICHOR_WORK_DIR", str(DATA_DIR / "work")))
LOCAL_ENGINE_DIR = Path(env_str("AICHOR_LOCAL_ENGINE_DIR", str(DATA_DIR / "local-engine")))
# The `local` engine runs workloads as the server's own user on its own host: a laptop's
# zero-dependency default (`make run` turns it on), never a shared server's.
LOCAL_ENGINE = env_bool("AICHOR_LOCAL_ENGINE", False)
# How long one engine watcher task runs before handing over to a fresh task (so a deployment
# or a lost task never pins it), and how often it asks its engine for all its experiments.
WATCH_SLICE_SECONDS = env_float("AICHOR_WATCH_SLICE_SECONDS", 30.0)
WATCH_POLL_SECONDS = env_float("AICHOR_WATCH_POLL_SECONDS", 0.5)
# One INFO line per watcher interval on logger experiments.watcher (counts of experiments,
# changes, Docker calls, queries): what the scale benchmark reads.
WATCH_STATS = env_bool("AICHOR_WATCH_STATS", False)
# An active experiment whose task has not reported for this long is examined by reconcile.
RECONCILE_STALE_SECONDS = env_float("AICHOR_RECONCILE_STALE_SECONDS", 120.0)
CLONE_TIMEOUT_SECONDS = env_int("AICHOR_CLONE_TIMEOUT_SECONDS", 900)
# file:// and plain paths as clone URLs read the server's own disk: only for the embedded
# default (`make run` turns it on for its demo repository), never in production.
ALLOW_LOCAL_REPOS = env_bool("AICHOR_ALLOW_LOCAL_REPOS", False)
# Requests to URLs members give (notification endpoints, Git host API URLs) reach public addresses
# only, plus these networks (comma-separated CIDRs, e.g. "10.0.0.0/8" for a company Git host).
# Never the server's loopback or a cloud metadata address unless listed here (aichor.lib.outbound).
OUTBOUND_ALLOW_NETWORKS = env_str("AICHOR_OUTBOUND_ALLOW_NETWORKS", "")
BUILD_TIMEOUT_SECONDS = env_int("AICHOR_BUILD_TIMEOUT_SECONDS", 3600)
MAX_ARCHIVE_BYTES = env_int("AICHOR_MAX_ARCHIVE_BYTES", 5 * 1024**3)
# What one archive may unpack to (checked member by member while unpacking: a gzip bomb stops
# at the limit) and how many entries it may hold.
MAX_UNPACKED_BYTES = env_int("AICHOR_MAX_UNPACKED_BYTES", 20 * 1024**3)
MAX_ARCHIVE_FILES = env_int("AICHOR_MAX_ARCHIVE_FILES", 200_000)
# Uploaded archives that no experiment references (an upload cut by a server restart) are
# removed once older than this.
ORPHAN_ARCHIVE_SECONDS = env_float("AICHOR_ORPHAN_ARCHIVE_SECONDS", 3600.0)
# Request bodies, refused with 413 from the headers before any byte is read (aichor/limits.py):
# forms and JSON, and webhook deliveries (GitHub's own cap on a payload is 25 MB).
MAX_REQUEST_BYTES = env_int("AICHOR_MAX_REQUEST_BYTES", 2 * 1024**2)
MAX_WEBHOOK_BYTES = env_int("AICHOR_MAX_WEBHOOK_BYTES", 25 * 1024**2)
DOCKER_HOST = env_str("DOCKER_HOST")

# --- Notifications (commit statuses, outbound webhooks, e-mail) ---------------------------
# Attempts per commit status or delivery, and the backoff between them: base * 2**attempt
# seconds (with jitter), at most the cap; a Retry-After or X-RateLimit-Reset answer wins.
NOTIFY_MAX_ATTEMPTS = env_int("AICHOR_NOTIFY_MAX_ATTEMPTS", 8)
NOTIFY_RETRY_BASE_SECONDS = env_float("AICHOR_NOTIFY_RETRY_BASE_SECONDS", 5.0)
NOTIFY_RETRY_MAX_SECONDS = env_float("AICHOR_NOTIFY_RETRY_MAX_SECONDS", 900.0)
NOTIFY_HTTP_TIMEOUT_SECONDS = env_float("AICHOR_NOTIFY_HTTP_TIMEOUT_SECONDS", 10.0)
# E-mail: SMTP when EMAIL_HOST is set, else printed on the console (the embedded default).
EMAIL_HOST = env_str("EMAIL_HOST")
EMAIL_BACKEND = env_str(
    "EMAIL_BACKEND",
    "django.core.mail.backends.smtp.EmailBackend" if EMAIL_HOST else "django.core.mail.backends.console.EmailBackend",
)
EMAIL_PORT = env_int("EMAIL_PORT", 25)
EMAIL_HOST_USER = env_str("EMAIL_HOST_USER")
EMAIL_HOST_PASSWORD = env_str("EMAIL_HOST_PASSWORD")
EMAIL_USE_TLS = env_bool("EMAIL_USE_TLS", False)
EMAIL_USE_SSL = env_bool("EMAIL_USE_SSL", False)
EMAIL_TIMEOUT = env_int("EMAIL_TIMEOUT", 30)
DEFAULT_FROM_EMAIL = env_str("DEFAULT_FROM_EMAIL", "aichor <aichor@localhost>")

# --- Terminal ----------------------------------------------------------------------------
# Open shells per user across all experiments (counted from the session events, so every
# server process sees the same count), the idle cut-off, and a hard cap on any one session.
TERMINAL_MAX_SESSIONS_PER_USER = env_int("AICHOR_TERMINAL_MAX_SESSIONS_PER_USER", 4)
# TensorBoard processes a web process runs at once (the TensorBoard tab); the longest idle stops first.
AICHOR_TENSORBOARD_MAX = env_int("AICHOR_TENSORBOARD_MAX", 4)
# One TensorBoard kept imported and waiting per web process, so a first view starts in about a second.
AICHOR_TENSORBOARD_SPARE = env_bool("AICHOR_TENSORBOARD_SPARE", True)
TERMINAL_IDLE_SECONDS = env_float("AICHOR_TERMINAL_IDLE_SECONDS", 900.0)
TERMINAL_MAX_SECONDS = env_float("AICHOR_TERMINAL_MAX_SECONDS", 4 * 3600.0)
# How often an open terminal checks that its experiment is still Running (or held).
TERMINAL_STATE_POLL_SECONDS = env_float("AICHOR_TERMINAL_STATE_POLL_SECONDS", 2.0)
# A dropped connection (network blip, laptop lid) may re-attach to the same shell this long.
TERMINAL_REATTACH_SECONDS = env_float("AICHOR_TERMINAL_REATTACH_SECONDS", 30.0)

# --- Storage -----------------------------------------------------------------------------
MEDIA_ROOT = DATA_DIR / "media"
BUCKETS_ROOT = Path(env_str("AICHOR_BUCKETS_ROOT", str(DATA_DIR / "buckets")))
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
}

# --- Storage backend (project buckets, datasets/) -----------------------------------------
# "filesystem": every bucket is a folder under BUCKETS_ROOT (the embedded default; the docker
# engine bind-mounts them). "s3": any S3-compatible server (AWS, GCS interop, MinIO, SeaweedFS).
AICHOR_STORAGE = env_str("AICHOR_STORAGE", "filesystem")
if AICHOR_STORAGE not in ("filesystem", "s3"):
    raise ImproperlyConfigured(f"AICHOR_STORAGE={AICHOR_STORAGE!r}: use filesystem or s3")
AICHOR_S3_ENDPOINT = env_str("AICHOR_S3_ENDPOINT")  # empty: AWS itself
AICHOR_S3_REGION = env_str("AICHOR_S3_REGION", "us-east-1")
AICHOR_S3_ACCESS_KEY = env_str("AICHOR_S3_ACCESS_KEY")
AICHOR_S3_SECRET_KEY = env_str("AICHOR_S3_SECRET_KEY")
AICHOR_S3_ADDRESSING_STYLE = env_str("AICHOR_S3_ADDRESSING_STYLE", "path")  # path | virtual | auto
# Browser uploads arrive as parts of this size: Django spools each part to disk before the view
# streams it on to the bucket, so a part is resumable and memory stays bounded per upload.
AICHOR_UPLOAD_PART_MB = env_int("AICHOR_UPLOAD_PART_MB", 8)
# On the S3 backend `submit local` sends archives straight to this bucket by presigned multipart
# upload (the server authorises and signs, never carries the bytes), in parts of this size (at
# least 5, S3's minimum; larger when an archive would need over 10 000 parts). An upload id
# handed to the CLI is good for ARCHIVE_UPLOAD_MAX_SECONDS; an upload idle for
# ORPHAN_ARCHIVE_SECONDS is aborted by the sweep.
AICHOR_ARCHIVE_BUCKET = env_str("AICHOR_ARCHIVE_BUCKET", "aichor-archives")
AICHOR_ARCHIVE_PART_MB = env_int("AICHOR_ARCHIVE_PART_MB", 8)
ARCHIVE_UPLOAD_MAX_SECONDS = env_float("AICHOR_ARCHIVE_UPLOAD_MAX_SECONDS", 24 * 3600.0)
AICHOR_DATASETS_PAGE_SIZE = env_int("AICHOR_DATASETS_PAGE_SIZE", 100)

SESSION_COOKIE_HTTPONLY = True
CSRF_COOKIE_SAMESITE = "Lax"
SECURE_CONTENT_TYPE_NOSNIFF = True
X_FRAME_OPTIONS = "DENY"

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "root": {"handlers": ["console"], "level": env_str("AICHOR_LOG_LEVEL", "INFO")},
    # axes: failures and lockouts (WARNING) without its per-attempt housekeeping lines.
    "loggers": {"django.db.backends": {"level": "WARNING"}, "axes": {"level": "WARNING"}},
}
