"""A destination PACS that refuses associations or aborts mid-transfer, then comes back.

The destination is dcmtk's ``storescp`` on one fixed free port: with ``--refuse`` (refuses every
association), with ``--abort-during`` (accepts, then aborts while receiving the C-STORE), and
plain (stores). The node runs embedded (one process): the delivery path, the back-off and the
retry are the same code in both layouts, and this keeps the suite within CI time.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
from node_process import Node
from rel_support import PHI, assert_no_phi, make_series, node_logs, wait_until
from support.dcmtk import require_tool, storescu
from support.ports import free_port
from support.shared_data import busi_png_paths

pytestmark = pytest.mark.e2e


@contextmanager
def _storescp(port: int, out: Path, *options: str) -> Iterator[subprocess.Popen[bytes]]:
    exe = require_tool("storescp")
    out.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [exe, "-aet", "STORESCP", "-od", str(out), *options, str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
    )
    try:
        wait_until(lambda: _listening(port), 10, f"storescp {options} on {port}", step=0.05)
        yield proc
    finally:
        proc.terminate()
        proc.wait(10)


def _listening(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        sock.settimeout(0.3)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _deliveries(node: Node, state: str | None = None) -> list[dict[str, Any]]:
    params = {"state": state} if state else {}
    items: list[dict[str, Any]] = node.client.get("/deliveries", params=params).json()["items"]
    return items


def _detail(node: Node, delivery_id: int) -> dict[str, Any]:
    detail: dict[str, Any] = node.client.get(f"/deliveries/{delivery_id}").json()
    return detail


def _start(attempt: dict[str, Any]) -> datetime:
    return datetime.fromisoformat(str(attempt["started_at"]).replace("Z", ""))


def test_refusing_destination_retries_with_backoff_then_delivers_or_fails_visibly(
    shared_data: Path, tmp_path: Path
) -> None:
    require_tool("storescu")
    port = free_port()
    received = tmp_path / "received"
    pngs = busi_png_paths(shared_data, "malignant")
    first = make_series(pngs[5:6], tmp_path / "src1")
    second = make_series(pngs[6:7], tmp_path / "src2")
    node = Node(
        tmp_path / "node",
        pacs_port=port,
        pacs_aet="STORESCP",
        extra={"delivery_max_attempts": 5, "delivery_backoff_seconds": 0.4},
    )
    node.start()
    try:
        # 1. the destination refuses every association; it comes back during the retries
        with _storescp(port, tmp_path / "refused", "--refuse"):
            assert storescu(first, "127.0.0.1", node.dicom_port).returncode == 0
            wait_until(
                lambda: [d for d in _deliveries(node) if d["attempts"] >= 2], 90, "two attempts"
            )
        with _storescp(port, received):
            [delivery] = _deliveries(node)
            wait_until(lambda: _detail(node, delivery["id"])["state"] == "done", 60, "the delivery")
        detail = _detail(node, delivery["id"])
        log = detail["attempt_log"]
        assert 3 <= detail["attempts"] <= 5 and len(log) == detail["attempts"]
        assert [a["ok"] for a in log] == [False] * (len(log) - 1) + [True]
        starts = [_start(a) for a in log]
        gaps = [(later - earlier).total_seconds() for earlier, later in pairwise(starts)]
        # back-off: attempt n+1 waits at least 0.4 s * 2^(n-1) after attempt n failed
        assert all(gap >= 0.4 * 2**n - 0.05 for n, gap in enumerate(gaps)), gaps
        assert {p.name[:2] for p in received.iterdir()} == {"SR", "SC"}

        # 2. a destination that stays away: bounded attempts, then failed and listed
        with _storescp(port, tmp_path / "refused-again", "--refuse"):
            assert storescu(second, "127.0.0.1", node.dicom_port).returncode == 0
            failed = wait_until(lambda: _deliveries(node, "failed"), 90, "a failed delivery")
        [bad] = failed
        assert bad["attempts"] == 5 and bad["last_error"], bad
        bad_log = _detail(node, bad["id"])["attempt_log"]
        assert len(bad_log) == 5 and not any(a["ok"] for a in bad_log)
        # ... and retried through the API once the destination is back
        with _storescp(port, received):
            assert node.client.post(f"/deliveries/{bad['id']}/retry").status_code == 202
            wait_until(lambda: _detail(node, bad["id"])["state"] == "done", 60, "the retry")
        assert _deliveries(node, "failed") == []
        assert len([p for p in received.iterdir() if p.name.startswith("SR")]) == 2
        assert_no_phi(node_logs(node), PHI)
    except AssertionError:
        print(node.log_tail())
        raise
    finally:
        node.stop()


def test_destination_aborting_mid_transfer_fails_the_attempt_at_once(
    shared_data: Path, tmp_path: Path
) -> None:
    """``storescp --abort-during`` accepts, then aborts while the first object arrives."""
    require_tool("storescu")
    port = free_port()
    files = make_series(busi_png_paths(shared_data, "malignant")[7:8], tmp_path / "src")
    node = Node(
        tmp_path / "node",
        pacs_port=port,
        pacs_aet="STORESCP",
        extra={"delivery_max_attempts": 1},
    )
    node.start()
    try:
        with _storescp(port, tmp_path / "aborted", "--abort-during"):
            assert storescu(files, "127.0.0.1", node.dicom_port).returncode == 0
            [failed] = wait_until(lambda: _deliveries(node, "failed"), 90, "a failed delivery")
        # after the abort nothing more is sent on the dead association: one failure reported
        assert str(failed["last_error"]).count("no response") == 1, failed["last_error"]
    finally:
        node.stop()
