from django.templatetags.static import static
from django.urls import path
from django.views.generic import RedirectView

from experiments import connect, terminal, views, webhooks

urlpatterns = [
    path("webhooks/github/<slug:slug>/", webhooks.github, name="webhook-github"),
    path("webhooks/gitlab/<slug:slug>/", webhooks.gitlab, name="webhook-gitlab"),
    path("p/<slug:slug>/", views.experiment_list, name="experiment-list"),
    path("p/<slug:slug>/new/", views.experiment_new, name="experiment-new"),
    path("p/<slug:slug>/connect/", connect.connect, name="project-connect"),
    path("p/<slug:slug>/connect/test/", connect.send_test, name="project-connect-test"),
    path("experiments/<uuid:experiment_id>/", views.experiment_detail, name="experiment-detail"),
    # After the full id's routes: only what is not a UUID reaches it.
    path("experiments/<str:prefix>/", views.experiment_by_prefix, name="experiment-by-prefix"),
    path("experiments/<uuid:experiment_id>/cancel/", views.experiment_cancel, name="experiment-cancel"),
    path("experiments/<uuid:experiment_id>/resubmit/", views.experiment_resubmit, name="experiment-resubmit"),
    path("experiments/<uuid:experiment_id>/release-hold/", terminal.release_hold_view, name="experiment-release-hold"),
    path("experiments/<uuid:experiment_id>/log/", views.log_lines, name="experiment-log-lines"),
    path("experiments/<uuid:experiment_id>/log/search/", views.log_search, name="experiment-log-search"),
    path("experiments/<uuid:experiment_id>/log/download/", views.log_download, name="experiment-log-download"),
    # Browsers ask for /favicon.ico on every page, the Django admin's included.
    path("favicon.ico", RedirectView.as_view(url=static("favicon.svg"), permanent=True)),
]
