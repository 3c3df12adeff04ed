from django.urls import path

from experiments import webhooks

urlpatterns = [
    path("webhooks/github/<slug:slug>/", webhooks.github, name="webhook-github"),
    path("webhooks/gitlab/<slug:slug>/", webhooks.gitlab, name="webhook-gitlab"),
]
