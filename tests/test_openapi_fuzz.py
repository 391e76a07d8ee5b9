"""Schemathesis against the service's own OpenAPI document, every endpoint with its auth.

A real server (one worker, admin token and feedback key set, rate limits off so the fuzzer is not
throttled) answers cases generated from ``/openapi.json``: valid and invalid bodies, parameters
and query strings. Every answer must be a non-5xx (bar the documented 503s), with the status,
content type, headers and body the document declares for it.
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.specs.openapi.checks import ignored_auth, positive_data_acceptance

from tests.servers import ServiceProcess

pytestmark = pytest.mark.server

TOKEN = "fuzz-admin-token-0123456789"


@pytest.fixture(scope="module")
def fuzz_server(trained_registry, tmp_path_factory):
    service = ServiceProcess(
        registry=trained_registry.root, data_dir=tmp_path_factory.mktemp("schemathesis"),
        workers=1,
        env={"REFIT_ADMIN_TOKEN": TOKEN, "REFIT_FEEDBACK_KEY": TOKEN + "-feedback",
             "REFIT_FEEDBACK_RATE_PER_MINUTE": "0", "REFIT_RETRAIN_RATE_PER_HOUR": "0",
             # The fuzzer may start retrains; keep them from piling up into a queue of 409s.
             "REFIT_RETRAIN_MIN_FEEDBACK": "1000000"},
    ).start()
    yield service
    service.stop()


def operations(url: str) -> list:
    loaded = schemathesis.openapi.from_url(url + "/openapi.json")
    return [result.ok() for result in loaded.get_all_operations()]


def test_every_endpoint_conforms_to_its_document(fuzz_server):
    """One hypothesis run per operation (schemathesis' pytest plugin does not load on this
    pytest, so the operations are iterated here).

    ``ignored_auth`` is left out: it re-sends a case without the auth it believes was used, but
    the token here goes in as a plain header, so it re-sends it and reports the 200 as auth
    ignored. Auth is tested directly: tests/test_access.py, tests/test_api.py (403 for other
    machines) and tests/test_feedback_api.py (401 without the token).

    ``positive_data_acceptance`` is left out for the Open Inference Protocol's infer endpoints
    only: the protocol ties the number of texts in ``data`` (or in the binary body) to ``shape``,
    and a binary body to its ``Inference-Header-Content-Length``, rules JSON Schema cannot
    state, so schema-valid bodies include ones the protocol rejects (with 400). Every other check
    holds for them; tests/test_inference_protocol.py tests those rules directly.
    """
    failures: list[str] = []
    for operation in operations(fuzz_server.url):

        excluded = [ignored_auth]
        if operation.path.startswith("/v2/") and operation.path.endswith("/infer"):
            excluded.append(positive_data_acceptance)

        @given(case=operation.as_strategy())
        @settings(max_examples=40, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        def run(case) -> None:
            case.call_and_validate(base_url=fuzz_server.url,
                                   headers={"authorization": f"Bearer {TOKEN}"},
                                   excluded_checks=excluded)  # noqa: B023 - run now, below

        try:
            run()
        except Exception as exc:  # noqa: BLE001 - collect every operation's failure
            failures.append(f"{operation.method.upper()} {operation.path}: {exc}"[:3000])
    assert not failures, "\n\n".join(failures)
