"""Bearer-token access to the REST API, the dashboard and everything else the app serves.

When ``api_token`` is set, :func:`install_api_auth` puts an ASGI middleware in front of the whole
application: every request (any route, any router included later, any mounted sub-application
such as ``/static``, websockets too) needs ``Authorization: Bearer <token>`` or the
``breastcad_token`` cookie; otherwise it is answered 401 with ``WWW-Authenticate: Bearer``.
``/health`` stays open (load balancers, container health checks). A browser gets in with
``GET /login?token=...``, which sets the cookie (HttpOnly, SameSite=Strict) and redirects to
``/``. Tokens are compared in constant time (``hmac.compare_digest``).
"""

from __future__ import annotations

import hmac
import html
import logging
import re
from typing import Any

from fastapi import FastAPI, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Receive, Scope, Send

from dicom_node.settings import Settings

COOKIE = "breastcad_token"
OPEN_PATHS = frozenset({"/health", "/login"})
CHALLENGE = 'Bearer realm="breastcad"'

_TOKEN_IN_QUERY = re.compile(r"(?<=[?&]token=)[^&\s]*")


def token_matches(given: str | None, expected: str) -> bool:
    """Constant-time comparison of a presented token with the configured one."""
    if not given:
        return False
    return hmac.compare_digest(given.encode("utf-8"), expected.encode("utf-8"))


def presented_token(connection: HTTPConnection) -> str | None:
    """The bearer token of the ``Authorization`` header, else the cookie's; ``None`` if neither."""
    header = connection.headers.get("authorization")
    if header is not None:
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
        return None
    return connection.cookies.get(COOKIE) or None


class BearerTokenMiddleware:
    """Refuses (401) every request to a path outside ``OPEN_PATHS`` without the token."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        if not token:
            raise ValueError("BearerTokenMiddleware needs a non-empty token")
        self.app = app
        self.token = token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        connection = HTTPConnection(scope)
        path = connection.url.path
        root = str(scope.get("root_path") or "")
        if root and path.startswith(root):
            path = path[len(root) :] or "/"
        given = presented_token(connection)
        if path in OPEN_PATHS or token_matches(given, self.token):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008, "reason": "token required"})
            return
        response = _unauthorized(connection, presented=given is not None)
        await response(scope, receive, send)


def _unauthorized(connection: HTTPConnection, *, presented: bool) -> Response:
    challenge = CHALLENGE + (', error="invalid_token"' if presented else "")
    headers = {"WWW-Authenticate": challenge}
    detail = "invalid API token" if presented else "API token required"
    if "text/html" in connection.headers.get("accept", ""):
        return HTMLResponse(_login_page(detail), status_code=401, headers=headers)
    return JSONResponse({"detail": detail}, status_code=401, headers=headers)


def _login_page(message: str) -> str:
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>breastcad: sign in</title>"
        "</head><body><h1>breastcad</h1>"
        f"<p>{html.escape(message)}.</p>"
        "<form method='get' action='/login'><label>API token "
        "<input type='password' name='token' autocomplete='current-password' required></label> "
        "<button type='submit'>Sign in</button></form></body></html>"
    )


class RedactTokenFilter(logging.Filter):
    """Masks ``token=...`` in uvicorn's access-log lines (``GET /login?token=...``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and record.args:
            record.args = tuple(
                _TOKEN_IN_QUERY.sub("***", arg) if isinstance(arg, str) else arg
                for arg in record.args
            )
        elif isinstance(record.msg, str):
            record.msg = _TOKEN_IN_QUERY.sub("***", record.msg)
        return True


def install_api_auth(app: FastAPI, settings: Settings) -> None:
    """Require ``settings.api_token`` on the whole app (no-op when it is not set)."""
    if settings.api_token is None:
        return
    expected = settings.api_token.get_secret_value()
    app.add_middleware(BearerTokenMiddleware, token=expected)
    access_log = logging.getLogger("uvicorn.access")
    if not any(isinstance(f, RedactTokenFilter) for f in access_log.filters):
        access_log.addFilter(RedactTokenFilter())

    @app.get("/login", include_in_schema=False, response_model=None)
    def login(request: Request, token: str = Query("", max_length=4096)) -> Any:
        if not token_matches(token, expected):
            return _unauthorized(HTTPConnection(request.scope), presented=bool(token))
        response = RedirectResponse("/", status_code=303)
        response.set_cookie(
            COOKIE,
            token,
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
            path="/",
        )
        return response
