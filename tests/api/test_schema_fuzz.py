"""Schemathesis against the served OpenAPI schema, through the real ASGI application (so the
archive upload served ahead of Django is fuzzed too), authenticated with a member's token:
whatever it generates, no operation answers 5xx."""

import pytest
import schemathesis
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error

from aichor.asgi import application
from experiments import services
from experiments.models import Experiment, Status
from projects.services import create_api_token

pytestmark = pytest.mark.django_db(transaction=True)

# Examples per operation: about 15 operations stay well under a minute.
EXAMPLES = 25

# The archive body is opaque bytes to the schema: send whatever was generated as it is.
schemathesis.serializer.alias(["application/x-tar", "application/gzip"], "application/octet-stream")


def test_no_operation_answers_5xx(project, member_user):
    finished = services.create_experiment(project=project, manifest_path="m.yaml", author=member_user)
    services.finish_experiment(finished.pk, Status.FAILED, reason="boom", exit_code=1)
    schema = schemathesis.openapi.from_asgi("/api/v1/openapi.json", application)
    # Real objects for the paths; the experiment is finished, so a generated follow=true ends.
    headers = {"Authorization": f"Bearer {create_api_token(member_user)}"}
    known = {"slug": "vision", "experiment_id": str(finished.pk)}
    operations = [result.ok() for result in schema.get_all_operations()]
    assert any(op.path.endswith("/experiments/archive") for op in operations)
    failures: list[str] = []

    for operation in operations:

        @given(case=operation.as_strategy(), use_known=st.booleans())
        @hypothesis_settings(
            max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck)
        )
        def check(case, use_known: bool) -> None:
            if use_known:
                # Half the cases reach the code behind the access check, half probe unknown ids.
                case.path_parameters = {k: known.get(k, v) for k, v in (case.path_parameters or {}).items()}
            case.call_and_validate(headers=headers, checks=[not_a_server_error])

        try:
            check()
        except Exception as exc:  # collect every operation's failure, not just the first
            failures.append(f"{operation.method.upper()} {operation.path}: {exc}")
    assert not failures, "\n\n".join(failures)
    # The fuzzing got past authentication and access: it submitted and resubmitted.
    assert Experiment.objects.count() > 1
