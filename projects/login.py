"""Login throttling (django-axes): after AXES_FAILURE_LIMIT wrong passwords for one username
from one address, that pair is locked out for AXES_COOLOFF_TIME. An organisation admin lifts a
lockout in the Django admin (Access attempts: delete) or with `manage.py axes_reset`."""

import math

from axes.backends import AxesStandaloneBackend
from axes.helpers import get_cool_off
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render

from projects.forms import LoginForm


class LoginThrottle(AxesStandaloneBackend):
    def authenticate(
        self, request: HttpRequest | None, username: str | None = None, password: str | None = None, **kwargs
    ):
        # A login without an HTTP request (the test client's login(), a management shell) has
        # no client address to throttle; axes would refuse it outright.
        if request is None:
            return None
        return super().authenticate(request, username, password, **kwargs)


def lockout_message(request: HttpRequest | None = None) -> str:
    # Every attempt during a lockout starts the cool-off again (axes' default), so at the moment
    # this is shown the wait is the whole cool-off.
    minutes = max(1, math.ceil(get_cool_off(request).total_seconds() / 60))
    return f"Too many failed attempts: try again in {minutes} minutes or ask an organisation admin."


def locked_out(request: HttpRequest, *args, **kwargs) -> HttpResponse:
    """The login page again, saying why and for how long (axes' AXES_LOCKOUT_CALLABLE)."""
    form = LoginForm(request, initial={"username": request.POST.get("username", "")})
    context = {"form": form, "lockout": lockout_message(request), "next": request.POST.get("next", "")}
    return render(request, "registration/login.html", context, status=429)
