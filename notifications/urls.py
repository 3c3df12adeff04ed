from django.urls import path

from notifications import views

urlpatterns = [
    path("p/<slug:slug>/notifications/", views.notification_settings, name="notification-settings"),
    path("p/<slug:slug>/notifications/git-host/", views.git_host, name="notification-git-host"),
    path(
        "p/<slug:slug>/notifications/git-host/remove-token/",
        views.git_host_token_remove,
        name="notification-git-host-token-remove",
    ),
    path("p/<slug:slug>/notifications/endpoints/", views.endpoint_create, name="notification-endpoint-create"),
    path(
        "p/<slug:slug>/notifications/endpoints/<int:pk>/delete/",
        views.endpoint_delete,
        name="notification-endpoint-delete",
    ),
    path(
        "p/<slug:slug>/notifications/deliveries/<uuid:delivery_id>/redeliver/",
        views.delivery_redeliver,
        name="notification-redeliver",
    ),
    path("account/notifications/", views.email_preferences, name="email-preferences"),
]
