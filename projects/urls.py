from django.contrib.auth import views as auth_views
from django.urls import path

from projects import pvcs, tokens, variables, views
from projects.forms import LoginForm

urlpatterns = [
    path("", views.home, name="home"),
    path(
        "login/",
        auth_views.LoginView.as_view(authentication_form=LoginForm, redirect_authenticated_user=True),
        name="login",
    ),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("p/<slug:slug>/details/", views.project_detail, name="project-detail"),
    path("projects/new/", views.project_create, name="project-create"),
    path("p/<slug:slug>/members/", views.member_set, name="member-set"),
    path("p/<slug:slug>/members/<int:pk>/remove/", views.member_remove, name="member-remove"),
    path("account/tokens/", tokens.tokens, name="tokens"),
    path("account/tokens/create/", tokens.create_token, name="token-create"),
    path("account/tokens/<int:pk>/revoke/", tokens.revoke_token, name="token-revoke"),
    path("p/<slug:slug>/pvcs/", pvcs.pvcs, name="pvc-list"),
    path("p/<slug:slug>/variables/", variables.variables, name="variables"),
    path("p/<slug:slug>/variables/<int:pk>/delete/", variables.variable_delete, name="variable-delete"),
    path("p/<slug:slug>/pvcs/<int:pk>/delete/", pvcs.pvc_delete, name="pvc-delete"),
]
