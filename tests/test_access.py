"""Roles and rate limits: who may post feedback and retrain, and how fast."""

from __future__ import annotations

import pytest
from pydantic import SecretStr

from refit.errors import ForbiddenError, TooManyRequestsError, UnauthorizedError
from service.access import RateLimiter, RoleGuard
from tests.servers import ServiceProcess

KEY = "feedback-key-0123456789"
TOKEN = "admin-token-0123456789"


def test_an_unset_role_is_open_to_this_machine_only():
    guard = RoleGuard("feedback", "REFIT_FEEDBACK_KEY", None, None)
    guard.check(None, "127.0.0.1")
    guard.check(None, "::1")
    for remote in ("203.0.113.9", "2001:db8::1", None, "testclient"):
        with pytest.raises(ForbiddenError, match="REFIT_FEEDBACK_KEY"):
            guard.check(None, remote)


def test_a_set_role_needs_its_key_from_everyone():
    guard = RoleGuard("feedback", "REFIT_FEEDBACK_KEY", SecretStr(KEY), SecretStr(TOKEN))
    for host in ("127.0.0.1", "203.0.113.9"):
        with pytest.raises(UnauthorizedError):
            guard.check(None, host)
        with pytest.raises(UnauthorizedError):
            guard.check(f"Bearer {KEY}x", host)
        guard.check(f"Bearer {KEY}", host)
        guard.check(f"Bearer {TOKEN}", host)  # the admin token carries the feedback role


def test_rate_limit_refuses_past_the_budget_and_refills():
    limiter = RateLimiter(10, 60, "items")
    limiter.take("a", 10)
    with pytest.raises(TooManyRequestsError) as refused:
        limiter.take("a", 1)
    assert 1 <= refused.value.retry_after_s <= 7
    limiter.take("b", 10)  # other clients have their own budget
    limiter._buckets["a"] = (0.0, limiter._buckets["a"][1] - 60)  # a minute later
    limiter.take("a", 10)


@pytest.mark.server
def test_feedback_key_and_rate_limit_on_a_real_server(trained_registry, tmp_path):
    service = ServiceProcess(
        registry=trained_registry.root, data_dir=tmp_path / "var", workers=1,
        env={"REFIT_FEEDBACK_KEY": KEY, "REFIT_ADMIN_TOKEN": TOKEN,
             "REFIT_FEEDBACK_RATE_PER_MINUTE": "30"},
    ).start()
    item = {"text": "where is my parcel", "label": "order_status"}
    try:
        with service.client() as client:
            refused = client.post("/feedback", json={"items": [item]})
            assert refused.status_code == 401 and "REFIT_FEEDBACK_KEY" in refused.json()["error"]
            auth = {"authorization": f"Bearer {KEY}"}
            assert (
                client.post("/feedback", json={"items": [item] * 20}, headers=auth).status_code
                == 200
            )
            limited = client.post("/feedback", json={"items": [item] * 20}, headers=auth)
            assert limited.status_code == 429
            assert int(limited.headers["retry-after"]) >= 1
            assert client.post("/retrain", json={}, headers=auth).status_code == 401
    finally:
        service.stop()
