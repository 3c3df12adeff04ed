from django.urls import path

from metrics import views

urlpatterns = [
    path("p/<slug:slug>/compare/", views.compare_runs, name="compare-runs"),
    path("experiments/<uuid:experiment_id>/tensorboard/", views.tensorboard_proxy, name="experiment-tensorboard"),
    path("experiments/<uuid:experiment_id>/tensorboard/<path:path>", views.tensorboard_proxy),
]
