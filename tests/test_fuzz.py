"""Property-based fuzzing of the whole API from its own OpenAPI document
(schemathesis), against a real server, on SQLite and PostgreSQL: no
answer is a server error or breaks the document (status codes, content
types, response schemas), and enough requests reach the handlers (the
share of answers other than 400 is printed and bounded below)."""

import collections
import os

import hypothesis
import schemathesis

from conftest import AUTH

# tus chunks are raw bytes, as application/octet-stream bodies are.
schemathesis.serializer.alias("application/offset+octet-stream", "application/octet-stream")

EXAMPLES = int(os.environ.get("LIBRARIAN_FUZZ_EXAMPLES", "12"))  # per operation and method


def test_the_api_answers_fuzzed_requests_as_its_document_says(server):
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (content_type_conformance,
                                                   response_schema_conformance,
                                                   status_code_conformance)

    schema = schemathesis.openapi.from_url(server.url + "api/openapi.json")
    checks = [not_a_server_error, status_code_conformance, content_type_conformance,
              response_schema_conformance]
    statuses = collections.Counter()
    failures = []
    headers = {"Authorization": "Bearer " + AUTH["admin"]}
    for result in schema.get_all_operations():
        operation = result.ok()

        @hypothesis.settings(max_examples=EXAMPLES, deadline=None, database=None,
                             suppress_health_check=list(hypothesis.HealthCheck),
                             phases=[hypothesis.Phase.generate])
        @hypothesis.given(case=operation.as_strategy())
        def run(case):
            # The form variant's one field is the same object as JSON text, which the
            # document can only call a string: fuzzing it yields text that is not JSON.
            hypothesis.assume(case.media_type != "application/x-www-form-urlencoded")
            response = case.call(base_url=server.url.rstrip("/"), headers=headers, timeout=30)
            statuses[response.status_code] += 1
            try:
                case.validate_response(response, checks=checks)
            except Exception as e:  # collected, so that one run reports every kind
                failures.append("%s %s -> %d: %s" % (case.method, case.path,
                                                     response.status_code, str(e)[:300]))

        run()
    total = sum(statuses.values())
    reached = 1 - statuses[400] / total
    print("\nfuzzed %d requests; statuses %s; %.0f%% answered other than 400"
          % (total, dict(sorted(statuses.items())), 100 * reached))
    assert not failures, "\n".join(failures[:20])
    assert not any(status >= 500 for status in statuses)
    assert reached >= 0.2
