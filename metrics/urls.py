from django.urls import path

from metrics import views

urlpatterns = [
    path("p/<slug:slug>/compare/", views.compare_runs, name="compare-runs"),
    path("p/<slug:slug>/tensorboard/", views.project_tensorboard, name="project-tensorboard"),
    path("p/<slug:slug>/tensorboard/<str:key>/", views.project_tensorboard_proxy, name="project-tensorboard-set"),
    path("p/<slug:slug>/tensorboard/<str:key>/<path:path>", views.project_tensorboard_proxy),
    path("experiments/<uuid:experiment_id>/tensorboard/", views.tensorboard_proxy, name="experiment-tensorboard"),
    path("experiments/<uuid:experiment_id>/tensorboard/<path:path>", views.tensorboard_proxy),
]
