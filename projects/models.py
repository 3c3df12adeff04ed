import hashlib
import os
import secrets

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.validators import MinValueValidator, RegexValidator
from django.db import models
from django.utils import timezone

from aichor.lib.crypto import decrypt
from aichor.lib.git import GitInputError, check_clone_url


class Engine(models.Model):
    class Kind(models.TextChoices):
        DOCKER = "docker", "Docker host"
        KUBERNETES = "kubernetes", "Kubernetes cluster"
        LOCAL = "local", "Local processes"

    name = models.CharField(max_length=64, unique=True)
    kind = models.CharField(max_length=16, choices=Kind.choices)
    # Connection settings: {"docker_host": "unix:///..."} for docker, {"kubeconfig": path,
    # "context": name} for kubernetes; empty means the server's own environment.
    config = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return f"{self.name} ({self.kind})"

    def clean(self) -> None:
        # The admin's form: a typo in a key or a value of the wrong type is named here, where
        # the admin types it, not found later as a default silently used or a failing watcher.
        problems = config_problems(self.config)
        if problems:
            raise ValidationError({"config": problems})


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _absolute_folders(value) -> bool:
    folders = value.split(os.pathsep) if isinstance(value, str) else value
    return isinstance(folders, list) and all(isinstance(f, str) and os.path.isabs(f) for f in folders)


# The keys an engine's `config` may hold (README, Engine settings), and what each must be.
CONFIG_KEYS: dict[str, tuple[str, object]] = {
    "docker_host": ("a string", lambda v: isinstance(v, str)),
    "network": ("a string", lambda v: isinstance(v, str)),
    "build_network": ("a string", lambda v: isinstance(v, str)),
    "max_processes_per_experiment": ("a positive integer", _positive_int),
    "max_running_experiments_per_project": ("a positive integer", _positive_int),
    # Absolute: a relative folder would resolve against each process's working directory.
    "path": ("a list of absolute folders or a string like PATH", lambda v: _absolute_folders(v)),
    "root": ("a string", lambda v: isinstance(v, str)),
    "kubeconfig": ("a string", lambda v: isinstance(v, str)),
    "context": ("a string", lambda v: isinstance(v, str)),
    "in_cluster": ("true or false", lambda v: isinstance(v, bool)),
    "registry": ("a string", lambda v: isinstance(v, str)),
    "image_pull_secret": ("a string", lambda v: isinstance(v, str)),
    "storage_class": ("a string", lambda v: isinstance(v, str)),
    "s3_secret": ("a string", lambda v: isinstance(v, str)),
    "buckets_host_root": ("a string", lambda v: isinstance(v, str)),
    "log_reads_per_second": (
        "a positive number",
        lambda v: isinstance(v, int | float) and not isinstance(v, bool) and v > 0,
    ),
    # 0: every pod's log is polled, none followed.
    "log_streams": ("a whole number, 0 or more", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0),
    "watch_pods": ("true or false", lambda v: isinstance(v, bool)),
}


def config_problems(config) -> list[str]:
    """What is wrong with an engine's `config`, one sentence each; [] when nothing is."""
    if not isinstance(config, dict):
        return ['The settings must be a JSON object, like {"network": "none"}.']
    problems = []
    for key, value in config.items():
        if key not in CONFIG_KEYS:
            problems.append(f"Unknown setting {key!r}; the settings are: {', '.join(sorted(CONFIG_KEYS))}.")
            continue
        expected, valid = CONFIG_KEYS[key]
        if value is not None and not valid(value):
            problems.append(f"{key} must be {expected}, not {value!r}.")
    return problems


def access_of(user, to_project: str = "") -> tuple[models.Q, models.Expression] | None:
    """Who sees what, said once: superusers see every project as its admin, everyone else the
    projects they are members of, with their membership's role; None for the anonymous.
    `to_project` is the path from the queried model to its project ("project__")."""
    if not user.is_authenticated:
        return None
    if user.is_superuser:
        return models.Q(), models.Value(Membership.Role.ADMIN, output_field=models.CharField())
    # The F() after filter() reuses the filter's join: the role is the matching membership's.
    return models.Q(**{f"{to_project}memberships__user": user}), models.F(f"{to_project}memberships__role")


class ProjectQuerySet(models.QuerySet):
    def visible_to(self, user) -> "ProjectQuerySet":
        """The projects `user` may see, each with the user's `role` annotated (one query)."""
        access = access_of(user)
        if access is None:
            return self.none()
        where, role = access
        return self.filter(where).annotate(role=role)


class Project(models.Model):
    name = models.CharField(max_length=100)
    slug = models.SlugField(max_length=50, unique=True)
    repo_clone_url = models.CharField("Git clone URL", max_length=500, blank=True)
    repo_web_url = models.URLField("Git web URL", max_length=500, blank=True)
    # Encrypted: the server needs the plain secret back to verify HMAC signatures.
    webhook_secret_encrypted = models.TextField(editable=False)
    namespace = models.CharField(max_length=29, unique=True, editable=False)
    engines = models.ManyToManyField(Engine, related_name="projects", blank=True)
    default_engine = models.ForeignKey(Engine, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    created_at = models.DateTimeField(default=timezone.now)

    objects = ProjectQuerySet.as_manager()

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    def clean(self) -> None:
        # A validator on the field would need a migration; clean() covers the admin's form.
        problem = clone_url_problem(self.repo_clone_url)
        if problem:
            raise ValidationError({"repo_clone_url": problem})

    @property
    def webhook_secret(self) -> str:
        return decrypt(self.webhook_secret_encrypted)

    @property
    def inputs_bucket(self) -> str:
        return f"{self.namespace}-inputs"

    @property
    def outputs_bucket(self) -> str:
        return f"{self.namespace}-outputs"

    def commit_url(self, sha: str) -> str:
        if not self.repo_web_url or not sha:
            return ""
        base = self.repo_web_url.rstrip("/")
        # GitLab puts commits under /-/commit/, GitHub and most others under /commit/.
        return f"{base}/-/commit/{sha}" if "gitlab" in base else f"{base}/commit/{sha}"


def clone_url_problem(url: str) -> str | None:
    """Why git must not be given `url` (SPEC §2), or None; an empty URL is allowed (no repository yet)."""
    if not url:
        return None
    try:
        check_clone_url(url, allow_local=settings.ALLOW_LOCAL_REPOS)
    except GitInputError as exc:
        return str(exc)
    return None


def new_namespace(slug: str) -> str:
    return f"{slug[:12]}-{secrets.token_hex(8)}"


class Membership(models.Model):
    class Role(models.TextChoices):
        MEMBER = "member", "Member"
        ADMIN = "admin", "Admin"

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="memberships")
    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="memberships")
    role = models.CharField(max_length=8, choices=Role.choices, default=Role.MEMBER)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["user", "project"], name="one_membership_per_user_project")]

    def __str__(self) -> str:
        return f"{self.user} in {self.project} ({self.role})"


class ProjectVariable(models.Model):
    class Kind(models.TextChoices):
        RUNTIME = "runtime", "Runtime"
        BUILD = "build", "Build-time"

    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="variables")
    name = models.CharField(max_length=128, validators=[RegexValidator(r"^[A-Za-z_][A-Za-z0-9_]*$")])
    kind = models.CharField(max_length=8, choices=Kind.choices, default=Kind.RUNTIME)
    sensitive = models.BooleanField(default=False)
    # Sensitive values are stored encrypted and never rendered again; others in plain text.
    value = models.TextField(blank=True)
    value_encrypted = models.TextField(blank=True, editable=False)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["name"]
        constraints = [models.UniqueConstraint(fields=["project", "name", "kind"], name="one_variable_per_name_kind")]

    def plain_value(self) -> str:
        return decrypt(self.value_encrypted) if self.sensitive else self.value


class ApiTokenQuerySet(models.QuerySet):
    def active(self) -> "ApiTokenQuerySet":
        now = timezone.now()
        return self.filter(revoked_at__isnull=True).filter(
            models.Q(expires_at__isnull=True) | models.Q(expires_at__gt=now)
        )


class ApiToken(models.Model):
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="api_tokens")
    # A user holds several (a laptop and CI each their own); the name tells them apart.
    name = models.CharField(max_length=64, default="default")
    # Only a SHA-256 digest is kept: tokens are long random strings, so a fast hash is safe.
    digest = models.CharField(max_length=64, unique=True)
    prefix = models.CharField(max_length=12)
    created_at = models.DateTimeField(default=timezone.now)
    expires_at = models.DateTimeField(null=True, blank=True)
    last_used_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)

    objects = ApiTokenQuerySet.as_manager()

    @staticmethod
    def digest_of(token: str) -> str:
        return hashlib.sha256(token.encode()).hexdigest()

    @property
    def is_expired(self) -> bool:
        return self.expires_at is not None and self.expires_at <= timezone.now()


class PersistentVolumeClaim(models.Model):
    class AccessMode(models.TextChoices):
        RWO = "ReadWriteOnce", "ReadWriteOnce"
        RWX = "ReadWriteMany", "ReadWriteMany"
        ROX = "ReadOnlyMany", "ReadOnlyMany"

    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="pvcs")
    engine = models.ForeignKey(Engine, on_delete=models.CASCADE, related_name="pvcs")
    name = models.CharField(
        max_length=64,
        validators=[RegexValidator(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "lowercase letters, digits and -")],
    )
    size_mib = models.PositiveIntegerField(validators=[MinValueValidator(1)])
    storage_class = models.CharField(max_length=128, blank=True)
    access_mode = models.CharField(max_length=16, choices=AccessMode.choices, default=AccessMode.RWO)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["name"]
        constraints = [models.UniqueConstraint(fields=["project", "name"], name="one_pvc_name_per_project")]
