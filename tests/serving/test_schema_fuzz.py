"""Schema-driven fuzzing of a real server on loopback (the committed models): every operation of its
OpenAPI document, with requests schemathesis generates from it, valid and not. No answer may be a 5xx
or break the documented response shapes, and none may hang."""
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import content_type_conformance, response_schema_conformance

from bench.harness import ROOT, running_server


@pytest.fixture(scope="module")
def api():
    with running_server(ROOT / "exports", "--workers", "1") as server:
        yield schemathesis.openapi.from_url(server.url + "/openapi.json")


# schemathesis's pytest plugin does not run on this pytest (9): each operation's cases are drawn here.
def test_no_operation_answers_a_server_error(api):
    # LitServe's own /litserve/* routes answer plain text that FastAPI documents as JSON: theirs, not fuzzed.
    operations = [op for op in (result.ok() for result in api.get_all_operations())
                  if not op.path.startswith("/litserve/")]
    assert {"/predict", "/v2/models/{name}/infer", "/models/{name}/evaluate"} <= {op.path for op in operations}
    for operation in operations:
        @given(case=operation.as_strategy())
        @settings(max_examples=30, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        def check(case):
            case.call_and_validate(checks=[not_a_server_error, response_schema_conformance, content_type_conformance],
                                   timeout=10)
        check()
