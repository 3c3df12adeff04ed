"""When to try an HTTP call again: retried answers (5xx, 429, a rate-limited 403) and how long
to wait, honouring what the server asked for (Retry-After, X-RateLimit-Reset)."""

import random
import time
from email.utils import parsedate_to_datetime

import requests
from django.conf import settings

# A server may ask for a long pause (GitHub's rate limit resets hourly); beyond this a header
# is taken for a mistake.
LONGEST_ASKED = 3600.0


def retryable(response: requests.Response) -> bool:
    code = response.status_code
    if code >= 500 or code == 429:
        return True
    # GitHub answers a rate limit with 403 too, told apart from a missing permission by these.
    return code == 403 and ("Retry-After" in response.headers or response.headers.get("X-RateLimit-Remaining") == "0")


def _asked(response: requests.Response) -> float | None:
    headers = response.headers
    retry_after = headers.get("Retry-After", "").strip()
    if retry_after:
        if retry_after.isdigit():
            return float(retry_after)
        try:
            return parsedate_to_datetime(retry_after).timestamp() - time.time()
        except (TypeError, ValueError):
            pass
    # Epoch seconds when the window resets (GitHub X-RateLimit-Reset, GitLab RateLimit-Reset),
    # meaningful once nothing remains of it.
    remaining = headers.get("X-RateLimit-Remaining", headers.get("RateLimit-Remaining"))
    reset = headers.get("X-RateLimit-Reset", headers.get("RateLimit-Reset", "")).strip()
    if remaining == "0" and reset.isdigit():
        return float(reset) - time.time()
    return None


def delay(attempt: int, response: requests.Response | None = None) -> float:
    """Seconds before attempt `attempt + 1` (attempt counts from 0)."""
    asked = _asked(response) if response is not None else None
    if asked is not None:
        return min(max(asked, 0.0), LONGEST_ASKED)
    # Full backoff with jitter: many deliveries failing at once do not all come back together.
    ceiling = min(settings.NOTIFY_RETRY_BASE_SECONDS * 2**attempt, settings.NOTIFY_RETRY_MAX_SECONDS)
    return random.uniform(ceiling / 2, ceiling)
