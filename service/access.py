"""Who may call what: roles with bearer secrets, and per-client rate limits.

Three roles (README, "Threat model"):

- **anyone** may predict and read models, drift and metrics;
- **feedback** (``REFIT_FEEDBACK_KEY``) may post feedback, which becomes training data;
- **admin** (``REFIT_ADMIN_TOKEN``) may retrain, promote, relabel and delete feedback; the admin
  token also carries the feedback role.

A role whose secret is set needs ``Authorization: Bearer <secret>``, compared in constant time.
A role whose secret is *not* set is open to clients on this machine only (loopback addresses),
and refused (403, naming the setting) to everyone else: a service that listens beyond localhost
is closed by default, and one that listens only on localhost works out of the box. Behind a
reverse proxy on the same host every client looks local: set the secrets there.

Rate limits are token buckets per client address, kept in each worker process (so the service as
a whole admits up to ``workers`` times the rate); they bound how fast one client can pour
feedback in or start retrains.
"""

from __future__ import annotations

import hmac
import ipaddress
import threading
import time
from collections import OrderedDict

from pydantic import SecretStr

from refit.errors import ForbiddenError, TooManyRequestsError, UnauthorizedError
from refit.settings import RefitSettings


def is_loopback(host: str | None) -> bool:
    if host is None:
        return False
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return host == "localhost"


class RoleGuard:
    """Checks one role: a bearer secret when configured, else loopback clients only."""

    def __init__(self, role: str, setting: str, *secrets: SecretStr | None) -> None:
        self.role = role
        self.setting = setting
        self._expected = [
            ("Bearer " + s.get_secret_value()).encode() for s in secrets if s is not None
        ]
        self.configured = secrets[0] is not None

    def check(self, authorization: str | None, client_host: str | None) -> None:
        given = (authorization or "").encode()
        # Compare against every accepted secret, always, so timing reveals nothing.
        matched = False
        for expected in self._expected:
            matched |= hmac.compare_digest(given, expected)
        if matched:
            return
        if not self.configured:
            if is_loopback(client_host):
                return
            raise ForbiddenError(
                f"the {self.role} role is open only to clients on the service's own machine "
                f"until {self.setting} is set; ask the operator for the key"
            )
        raise UnauthorizedError(
            f"this endpoint needs the {self.role} {'token' if self.role == 'admin' else 'key'}: "
            f"Authorization: Bearer <{self.setting}>"
        )


class RateLimiter:
    """Token buckets per client: ``rate`` units per ``per_s`` seconds, bursts up to ``rate``."""

    def __init__(self, rate: int, per_s: float, what: str, max_clients: int = 10_000) -> None:
        self.capacity = float(rate)
        self.refill_per_s = rate / per_s
        self.what = what
        self.max_clients = max_clients
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self._lock = threading.Lock()

    def take(self, client: str | None, cost: int = 1) -> None:
        """Spend ``cost`` units of ``client``'s bucket or raise :class:`TooManyRequestsError`."""
        if self.capacity <= 0:
            return
        key = client or "unknown"
        now = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.pop(key, (self.capacity, now))
            tokens = min(self.capacity, tokens + (now - last) * self.refill_per_s)
            if cost > tokens:
                self._buckets[key] = (tokens, now)
                wait = (min(cost, self.capacity) - tokens) / self.refill_per_s
                raise TooManyRequestsError(
                    f"rate limit: at most {self.capacity:g} {self.what} per "
                    f"{self.capacity / self.refill_per_s:g}s from one client; retry in {wait:.0f}s",
                    retry_after_s=max(1, int(wait + 0.999)),
                )
            self._buckets[key] = (tokens - cost, now)
            while len(self._buckets) > self.max_clients:
                self._buckets.popitem(last=False)


def admin_guard(settings: RefitSettings) -> RoleGuard:
    return RoleGuard("admin", "REFIT_ADMIN_TOKEN", settings.admin_token)


def feedback_guard(settings: RefitSettings) -> RoleGuard:
    """The feedback key, or the admin token, which carries every role."""
    return RoleGuard("feedback", "REFIT_FEEDBACK_KEY", settings.feedback_key, settings.admin_token)
