"""Request values the state DB cannot hold get a 422, not a 500 (found by API fuzzing).

FastAPI accepts any integer for an ``int`` path or query parameter and any string for ``str``;
the databases do not: SQLite binds integers up to 2**63 - 1 (``OverflowError`` beyond), PostgreSQL
``INTEGER`` columns hold up to 2**31 - 1 and text cannot contain NUL (both ``DataError``). A
request carrying such a value cannot name an existing row, so it is answered 422 with a reason.
Installed app-wide by ``create_api`` so routes added by other routers are covered too.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DataError

log = logging.getLogger(__name__)

DETAIL = (
    "a request value cannot be stored in or compared with the state DB "
    "(an integer out of range or a NUL character)"
)


async def _unstorable_value(request: Request, exc: Exception) -> JSONResponse:
    # the value itself is not logged: it may be a patient identifier
    log.info("%s %s: %s (422)", request.method, request.url.path, type(exc).__name__)
    return JSONResponse({"detail": DETAIL}, status_code=422)


def install_api_errors(app: FastAPI) -> None:
    """Answer 422 to values the state DB rejects (see the module docstring)."""
    app.add_exception_handler(OverflowError, _unstorable_value)
    app.add_exception_handler(DataError, _unstorable_value)
