"""The served OpenAPI document is one the API docs page can read: valid OpenAPI and free of
duplicate keys (Python's json would silently keep the last; Swagger UI refuses the page)."""

import json

import pytest
from openapi_spec_validator import validate


def no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    keys = [key for key, _ in pairs]
    duplicates = sorted({key for key in keys if keys.count(key) > 1})
    if duplicates:
        raise ValueError(f"duplicate keys {duplicates} in an object with keys {keys}")
    return dict(pairs)


def test_served_schema_is_valid_openapi_without_duplicate_keys(client):
    response = client.get("/api/v1/openapi.json")
    assert response.status_code == 200
    schema = json.loads(response.content, object_pairs_hook=no_duplicate_keys)
    validate(schema)
    logs = schema["paths"]["/api/v1/experiments/{experiment_id}/logs"]["get"]["responses"]
    assert logs["200"]["content"] == {"text/plain": {}}


def test_the_duplicate_check_refuses_a_repeated_key():
    with pytest.raises(ValueError, match=r"duplicate keys \['200'\]"):
        json.loads('{"responses": {"200": {}, "200": {"description": "x"}}}', object_pairs_hook=no_duplicate_keys)


def test_docs_page_serves_the_schema_url(client):
    response = client.get("/api/v1/docs")
    assert response.status_code == 200
    assert b"/api/v1/openapi.json" in response.content
