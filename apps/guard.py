"""Secure defaults in front of the server, before any route runs.

- Host must be a loopback name (localhost, 127.0.0.0/8, ::1) or one given with --allow-host: a DNS-rebinding
  page (evil.example resolving to 127.0.0.1) sends its own name and is refused.
- A request carrying an Origin must be same-origin or an --allow-origin origin; only those get CORS headers.
  (JSON POSTs need a preflight, which only allowed origins pass: other pages cannot even start a generation.)
- With --api-key, /v1/* needs `Authorization: Bearer KEY`, compared in constant time.
- A request head over MAX_HEAD_BYTES or with more than MAX_HEADERS fields is refused with 431 (a head that never
  completes is cut off at the same size by apps/connections.py).
- Every response carries nosniff / no-referrer; the page also a strict Content-Security-Policy.
"""

from __future__ import annotations

import hmac
import ipaddress

from starlette.datastructures import Headers
from starlette.responses import JSONResponse, Response

MAX_HEAD_BYTES = 32 << 10  # request line + headers; nginx allows 32 KB, Node 16 KB; loopback cookies add up
MAX_HEADERS = 100  # Apache's LimitRequestFields
PAGE_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
            "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def host_name(host: str) -> str | None:
    """'127.0.0.1:8080' -> '127.0.0.1', '[::1]:80' -> '::1', 'LocalHost.' -> 'localhost'; None if malformed."""
    host = host.strip().lower()
    if host.startswith("["):
        name, sep, rest = host[1:].partition("]")
        if not sep or (rest and not (rest[0] == ":" and rest[1:].isdigit())):
            return None
        return name
    name, _, port = host.partition(":")
    if port and not port.isdigit():
        return None
    return name.rstrip(".") or None


def is_loopback(name: str) -> bool:
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def head_bytes(scope) -> int:
    """The size of the request line and headers as they came on the wire (give or take the separators)."""
    return (len(scope["method"]) + len(scope.get("raw_path") or b"") + len(scope.get("query_string") or b"") + 12
            + sum(len(k) + len(v) + 4 for k, v in scope["headers"]))


def security_headers(path: str) -> list[tuple[bytes, bytes]]:
    h = [(b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer")]
    if path in ("/", "/app.js", "/style.css"):
        h += [(b"content-security-policy", PAGE_CSP.encode()), (b"x-frame-options", b"DENY")]
    else:
        h.append((b"cache-control", b"no-store"))
    return h


def error(status: int, message: str, code: str, type: str = "invalid_request_error", headers=None) -> Response:
    return JSONResponse({"error": {"message": message, "type": type, "param": None, "code": code}},
                        status_code=status, headers=headers)


class Guard:
    def __init__(self, app, api_key: str | None = None, allow_origins=(), allow_hosts=()):
        self.app, self.api_key = app, api_key.encode() if api_key else None
        self.allow_origins = {o.rstrip("/") for o in allow_origins}
        self.allow_hosts = {host_name(h) or h for h in allow_hosts}

    @property
    def state(self):
        return self.app.state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        extra = security_headers(path)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                names = {k.lower() for k, _ in message.get("headers", [])}
                message = {**message, "headers": list(message.get("headers", [])) + [
                    (k, v) for k, v in extra if k not in names]}
            await send(message)

        refusal = self.check(scope, extra)
        if refusal is not None:
            return await refusal(scope, receive, send_with_headers)
        await self.app(scope, receive, send_with_headers)

    def check(self, scope, extra: list) -> Response | None:
        """None if the request may go on (adding CORS headers to `extra`), else the refusal to send."""
        if len(scope["headers"]) > MAX_HEADERS or head_bytes(scope) > MAX_HEAD_BYTES:
            return error(431, f"the request headers exceed {MAX_HEADERS} fields or {MAX_HEAD_BYTES} bytes",
                         "headers_too_large", headers={"connection": "close"})
        headers = Headers(scope=scope)
        host = headers.get("host", "")
        name = host_name(host)
        if name is None or not (is_loopback(name) or name in self.allow_hosts):
            return error(403, "this server answers requests for loopback host names only (see --allow-host)",
                         "host_not_allowed", "permission_error")
        origin = headers.get("origin")
        if origin is not None:
            allowed = origin in self.allow_origins or "*" in self.allow_origins
            if not allowed and origin != f"http://{host}":
                return error(403, "cross-origin requests are not allowed (see --allow-origin)",
                             "origin_not_allowed", "permission_error")
            if allowed:
                extra += [(b"access-control-allow-origin", origin.encode()), (b"vary", b"Origin")]
                if scope["method"] == "OPTIONS":
                    return Response(status_code=204, headers={
                        "access-control-allow-methods": "GET, POST, OPTIONS",
                        "access-control-allow-headers": "authorization, content-type",
                        "access-control-max-age": "600"})
        if self.api_key and scope["path"].startswith("/v1/"):
            scheme, _, token = headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key):
                return error(401, "a valid API key is required: Authorization: Bearer <key>", "invalid_api_key",
                             "authentication_error", headers={"www-authenticate": "Bearer"})
        return None
