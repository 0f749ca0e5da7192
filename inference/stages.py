"""Per-stage timings of one analysis, for the turnaround breakdown (bench/e2e.py).

A worker opens ``recording()`` around a job; code on the path marks its stages with
``stage(name)``; outside a recording ``stage`` costs one ContextVar lookup. Seconds of a stage
entered several times (one per image) add up.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

_current: ContextVar[dict[str, float] | None] = ContextVar("breastcad_stages", default=None)


@contextmanager
def recording() -> Iterator[dict[str, float]]:
    """Collect the stages run inside the block (this thread/context only) into the dict."""
    seconds: dict[str, float] = {}
    token = _current.set(seconds)
    try:
        yield seconds
    finally:
        _current.reset(token)


@contextmanager
def stage(name: str) -> Iterator[None]:
    seconds = _current.get()
    if seconds is None:
        yield
        return
    started = time.perf_counter()
    try:
        yield
    finally:
        seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - started
