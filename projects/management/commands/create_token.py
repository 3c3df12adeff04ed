from datetime import timedelta

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError
from django.utils import timezone

from projects.services import create_api_token


class Command(BaseCommand):
    help = "Print a fresh API token for USERNAME (its other tokens stay valid), for automation."

    def add_arguments(self, parser) -> None:
        parser.add_argument("username")
        parser.add_argument("--name", default="default", help="what the token is for (default: default)")
        parser.add_argument("--days", type=int, default=None, help="expire after this many days (default: never)")

    def handle(self, *args, username: str, name: str, days: int | None, **options) -> None:
        User = get_user_model()
        try:
            user = User.objects.get(**{User.USERNAME_FIELD: username})
        except User.DoesNotExist:
            raise CommandError(f"no user named {username!r}") from None
        if days is not None and days <= 0:
            raise CommandError("--days must be positive")
        expires_at = timezone.now() + timedelta(days=days) if days else None
        self.stdout.write(create_api_token(user, expires_at, name=name))
