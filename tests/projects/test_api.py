"""The projects API: each project with the caller's role, read without a query per project."""

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from projects.services import create_api_token, create_project

pytestmark = pytest.mark.django_db
API = "/api/v1"


def listed(client, token: str) -> tuple[dict, int]:
    with CaptureQueriesContext(connection) as queries:
        response = client.get(f"{API}/projects", headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 200
    return {p["slug"]: p["role"] for p in response.json()}, len(queries)


def test_project_list_costs_the_same_for_one_project_or_five(client, member_user, local_engine, project):
    token = create_api_token(member_user)
    listed(client, token)  # the token's first use also records it
    one, one_cost = listed(client, token)
    for i in range(4):
        create_project(name=f"P{i}", slug=f"p{i}", engines=[local_engine], admins=[member_user])
    five, five_cost = listed(client, token)
    assert one == {"vision": "member"}
    assert five == {"vision": "member", "p0": "admin", "p1": "admin", "p2": "admin", "p3": "admin"}
    assert five_cost == one_cost


def test_superuser_lists_every_project_as_admin(client, django_user_model, outsider_user, local_engine, project):
    create_project(name="Secret", slug="secret", engines=[local_engine], admins=[outsider_user])
    root = django_user_model.objects.create_superuser("root@example.com", "root@example.com", "pw-root-123")
    roles, _ = listed(client, create_api_token(root))
    assert roles == {"vision": "admin", "secret": "admin"}


def test_one_project_says_the_callers_role(client, admin_user, outsider_user, project):
    def role(user) -> tuple[int, str | None]:
        response = client.get(f"{API}/projects/vision", headers={"Authorization": f"Bearer {create_api_token(user)}"})
        return response.status_code, response.json().get("role")

    assert role(admin_user) == (200, "admin")
    assert role(outsider_user) == (404, None)
