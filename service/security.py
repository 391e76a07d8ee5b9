"""Security headers on every response, and a strict Content-Security-Policy for HTML pages.

:class:`SecurityHeadersMiddleware` is plain ASGI (no per-request objects beyond one list), so it
costs next to nothing on the hot path. It adds, unless the response set its own:

- ``X-Content-Type-Options: nosniff``: a JSON body is never sniffed into HTML or script;
- ``X-Frame-Options: DENY`` and CSP ``frame-ancestors 'none'``: no page of ours can be framed;
- ``Content-Security-Policy: default-src 'none'``: a JSON answer opened in a browser runs nothing;
- ``Referrer-Policy: no-referrer`` and ``Cache-Control: no-store``: answers carry predictions and
  feedback, which no shared cache should keep.

HTML pages set their own policy. :func:`inline_script_policy` builds one for a page whose scripts
are inline (Evidently's drift report): it allows exactly those scripts by their sha256 hashes, and
nothing else — no other script, no network access, no forms, no plugins — and sandboxes the page
into an opaque origin, so even an allowed script cannot read this site's cookies or storage or
call its API with them. A label chosen by a client and shown in the report is text, not markup,
because no script beyond the hashed ones can run.
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Awaitable, Callable
from typing import Any

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

API_POLICY = "default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
DEFAULT_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cache-control", b"no-store"),
    (b"content-security-policy", API_POLICY.encode()),
)

_INLINE_SCRIPT = re.compile(
    rb"<script(?![^>]*\bsrc=)[^>]*>(.*?)</script>", re.DOTALL | re.IGNORECASE
)


class SecurityHeadersMiddleware:
    """Adds :data:`DEFAULT_HEADERS` to every HTTP response that does not already carry them."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {name.lower() for name, _ in headers}
                headers.extend(h for h in DEFAULT_HEADERS if h[0] not in present)
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, send_with_headers)


def script_hashes(html: bytes) -> str:
    """CSP sources allowing exactly the inline scripts of ``html``, by their sha256."""
    return " ".join(sorted({
        "'sha256-" + base64.b64encode(hashlib.sha256(body).digest()).decode() + "'"
        for body in _INLINE_SCRIPT.findall(html)
    }))


def inline_script_policy(html: bytes) -> str:
    """A CSP that lets exactly the inline scripts of ``html`` run, sandboxed, and nothing else."""
    scripts = script_hashes(html) or "'none'"
    return (
        "default-src 'none'; "
        f"script-src {scripts}; "
        "style-src 'unsafe-inline'; img-src data:; font-src data:; "
        "connect-src 'none'; form-action 'none'; base-uri 'none'; frame-ancestors 'none'; "
        "sandbox allow-scripts"
    )


def page_policy(html: bytes) -> str:
    """A CSP for a page of ours that loads scripts and styles from this origin and calls its API
    (Swagger UI): exactly its inline scripts by hash, nothing from elsewhere."""
    return (
        f"default-src 'none'; script-src 'self' {script_hashes(html)}; "
        "style-src 'self' 'unsafe-inline'; "
        "img-src 'self' data:; connect-src 'self'; font-src 'self' data:; "
        "form-action 'none'; base-uri 'none'; frame-ancestors 'none'"
    )
