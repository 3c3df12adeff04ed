from django.contrib import admin
from django.urls import include, path

from aichor.api import api

urlpatterns = [
    path("admin/", admin.site.urls),
    path("api/v1/", api.urls),
    path("", include("experiments.urls")),
    path("", include("projects.urls")),
    path("", include("datasets.urls")),
    path("", include("notifications.urls")),
    path("", include("metrics.urls")),
]
