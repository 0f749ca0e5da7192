"""Redis restarted under a connected, busy worker, with series queued (distributed layout).

Node + one ``breastcad worker`` process + a private redis-server without persistence + a fresh
PostgreSQL database. The worker is connected and analysing the first of four series while the
other three wait in Redis; Redis is SIGKILLed (its data is gone: the queued messages and the
running task's unacknowledged one) and started again on the same port. The same worker process
must reconnect by itself, and every job must end ``done``, each analysed once.
(``test_broker_and_node_loss.py`` covers the other case: no worker connected during the loss.)
"""

from __future__ import annotations

from pathlib import Path

import pytest
from node_process import Node
from rel_support import (
    PHI,
    RedisServer,
    assert_no_phi,
    jobs,
    make_series,
    node_logs,
    start_distributed,
    wait_until,
)
from support.dcmtk import require_tool, storescu
from support.shared_data import busi_png_paths

pytestmark = pytest.mark.e2e

# The first series is long enough (300 images, ~9 s of analysis on a quiet machine) that the
# worker is still busy with it when the three short ones behind it are queued. With four series
# of 6 images a quiet machine (CI, session 4) analysed each faster than the test could see two
# of them waiting in Redis.
SIZES = (300, 6, 6, 6)
SERIES = len(SIZES)


def test_worker_connected_through_redis_restart_completes_every_queued_job(
    shared_data: Path, redis_server: RedisServer, postgres_db: str, tmp_path: Path
) -> None:
    require_tool("storescu")
    pngs = busi_png_paths(shared_data, "benign")
    assert len(pngs) >= sum(SIZES)
    starts = [sum(SIZES[:i]) for i in range(SERIES)]
    series = [
        make_series(pngs[start : start + size], tmp_path / f"src{i}")
        for i, (start, size) in enumerate(zip(starts, SIZES, strict=True))
    ]
    node = Node(
        tmp_path / "node",
        pacs_port=9,  # no PACS: this test is about analysis
        broker_url=redis_server.url,
        database_url=postgres_db,
        embedded_worker=False,
        workers=0,
        extra={"job_resend_seconds": 2, "routes": [], "torch_threads": 1},
    )
    start_distributed(node, 1)
    worker = node.workers[0]
    try:
        wait_until(
            lambda: " ready." in worker.log_path.read_text(errors="replace"),
            120,
            "the worker to connect to Redis",
        )
        for files in series:
            assert storescu(files, "127.0.0.1", node.dicom_port).returncode == 0

        def queued_behind_a_busy_worker() -> bool:
            states = [j["state"] for j in jobs(node)]
            return (
                len(states) == SERIES
                and states.count("queued") >= 2
                and redis_server.llen("breastcad") >= 2
            )

        wait_until(queued_behind_a_busy_worker, 60, "jobs queued in Redis", step=0.1)
        before = {j["id"]: j["state"] for j in jobs(node)}
        redis_server.kill()  # no persistence: every message is gone
        redis_server.start()
        assert redis_server.llen("breastcad") == 0

        finished = node.wait_for_jobs(SERIES, timeout=240)
        assert [j["state"] for j in finished] == ["done"] * SERIES, finished
        # none was analysed twice: a lost message was re-sent, never run beside its original
        assert [j["attempts"] for j in finished] == [1] * SERIES, finished
        assert worker.alive(), "the worker process died instead of reconnecting"
        worker_log = worker.log_path.read_text(errors="replace")
        assert "Connection to broker lost" in worker_log, "the worker never saw Redis go"
        serve_log = node_logs(node)["serve"]
        lost = sum(1 for state in before.values() if state == "queued")
        assert serve_log.count("its message was lost, sending it again") >= lost - 1, before
        assert_no_phi(node_logs(node), PHI)
        print(f"redis restart under a busy worker: states before {before}")
    except AssertionError:
        print(node.log_tail())
        print(redis_server.log_tail())
        raise
    finally:
        node.stop()
