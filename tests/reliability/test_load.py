"""Load: 20 concurrent ``storescu`` associations, about 1,000 instances (distributed layout).

Node + two ``breastcad worker`` processes + a private redis-server + PostgreSQL. Results are not
delivered here (``routes: []``): delivery under faults is test_destination_faults.py, and 1,000
SC objects into Orthanc would double the run time. ``BREASTCAD_SOAK=1`` sends five times more.

Figures (instances, timings, peak RSS of node and workers) are printed; the last ones are in
docs/RELIABILITY.md. No timing is asserted.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from node_process import Node
from pydicom.uid import generate_uid
from pynetdicom import AE
from rel_support import (
    PHI,
    InProcessNode,
    RedisServer,
    assert_no_phi,
    make_series,
    node_logs,
    peak_rss_mib,
    sqlalchemy_url,
    start_distributed,
    storescu_outcomes,
    storescu_popen,
)
from sqlalchemy import func, select
from support.dcmtk import require_tool
from support.dicom_factory import US_IMAGE_STORAGE
from support.shared_data import busi_png_paths

from dicom_node.db import Instance, Job, Result, StateDB

pytestmark = pytest.mark.e2e

SENDERS = 20


def test_twenty_concurrent_associations_every_instance_stored_and_analysed_once(
    shared_data: Path, redis_server: RedisServer, postgres_db: str, tmp_path: Path, soak: bool
) -> None:
    require_tool("storescu")
    series_per_sender = 5
    per_series = 50 if soak else 10
    pngs = busi_png_paths(shared_data)
    batches: list[list[Path]] = []
    index = 0
    for sender in range(SENDERS):
        batch: list[Path] = []
        for number in range(series_per_sender):
            chosen = [pngs[(index + k) % len(pngs)] for k in range(per_series)]
            index += per_series
            batch += make_series(
                chosen,
                tmp_path / "src" / f"{sender}-{number}",
                study_instance_uid=generate_uid(),
            )
        batches.append(batch)
    total = sum(len(b) for b in batches)
    series_total = SENDERS * series_per_sender

    node = Node(
        tmp_path / "node",
        pacs_port=9,
        broker_url=redis_server.url,
        database_url=postgres_db,
        embedded_worker=False,
        workers=0,
        extra={
            "routes": [],
            # + 4: the harness's readiness probe (a TCP connect + close on the DICOM port, like
            # a load balancer's health check) holds an association slot for acse_timeout (30 s)
            # in pynetdicom 3.0.4; measured, see docs/RELIABILITY.md
            "maximum_associations": SENDERS + 4,
            # the default: with 2 s, at load 12 on 2 cores a starved storescu once paused longer
            # than that inside a series, which then completed early and was analysed twice (the
            # second result superseding the first); the node's own slow writes are covered by
            # SeriesWrites (tests/node/test_series_writes.py)
            "series_quiet_seconds": 5,
            "torch_threads": 1,
        },
    )
    start_distributed(node, 2)
    try:
        started = time.monotonic()
        procs = [
            storescu_popen(batch, node.dicom_port, tmp_path / f"storescu-{i}.log")
            for i, batch in enumerate(batches)
        ]
        codes = [proc.wait(600) for proc in procs]
        sent_s = time.monotonic() - started
        outcomes: dict[str, str] = {}
        for i in range(SENDERS):
            log = (tmp_path / f"storescu-{i}.log").read_text()
            assert "Association Accepted" in log and "Releasing Association" in log, log[-2000:]
            outcomes.update(storescu_outcomes(log))
        assert codes == [0] * SENDERS, codes  # no association dropped or refused
        assert len(outcomes) == total and set(outcomes.values()) == {"Success"}

        finished = node.wait_for_jobs(series_total, timeout=900 if soak else 300)
        done_s = time.monotonic() - started
        assert len(finished) == series_total
        assert all(j["state"] == "done" and j["attempts"] == 1 for j in finished)

        db = StateDB(sqlalchemy_url(postgres_db))
        try:
            with db.session() as session:
                stored = session.scalar(select(func.count()).select_from(Instance))
                job_series = session.scalars(select(Job.series_instance_uid)).all()
                result_series = session.scalars(select(Result.series_instance_uid)).all()
                analysed = sum(
                    len(files["per_image"]) for files in session.scalars(select(Result.files))
                )
        finally:
            db.dispose()
        assert stored == total  # every instance once
        assert len(set(job_series)) == len(job_series) == series_total  # every series once
        assert sorted(result_series) == sorted(job_series)
        assert analysed == total

        assert node.server is not None
        assert all(w.alive() for w in node.workers), node.log_tail()
        rss = {"serve": peak_rss_mib(node.server.process.pid)}
        for worker in node.workers:
            rss[worker.name] = peak_rss_mib(worker.process.pid)
        print(
            f"\nload: {SENDERS} associations, {total} instances, {series_total} series; "
            f"all sent in {sent_s:.1f} s, all analysed in {done_s:.1f} s; peak RSS MiB "
            + ", ".join(f"{name} {mib:.0f}" for name, mib in rss.items())
        )
        assert_no_phi(node_logs(node), PHI)
    except AssertionError:
        print(node.log_tail())
        raise
    finally:
        node.stop()


def test_associations_beyond_maximum_are_rejected_not_hung(tmp_path: Path) -> None:
    node = InProcessNode(tmp_path / "var", maximum_associations=2)
    node.start()
    held = []
    try:
        for _ in range(2):
            ae = AE(ae_title="HOLDER")
            ae.add_requested_context(US_IMAGE_STORAGE)
            assoc = ae.associate("127.0.0.1", node.port, ae_title="BREASTCAD")
            assert assoc.is_established
            held.append(assoc)
        extra = AE(ae_title="ONEMORE")
        extra.add_requested_context(US_IMAGE_STORAGE)
        extra.acse_timeout = 30
        refused = extra.associate("127.0.0.1", node.port, ae_title="BREASTCAD")
        assert refused.is_rejected, "the association beyond the limit must be rejected"
        assert refused.acceptor.primitive is not None
        assert refused.acceptor.primitive.result == 0x02  # rejected-transient
        # a slot frees up: the next one is accepted again
        held.pop().release()
        time.sleep(0.5)
        again = AE(ae_title="ONEMORE").associate(
            "127.0.0.1", node.port, ae_title="BREASTCAD", contexts=[_us_context()]
        )
        assert again.is_established
        again.release()
    finally:
        for assoc in held:
            assoc.release()
        node.stop()


def _us_context() -> object:
    from pynetdicom import build_context

    return build_context(US_IMAGE_STORAGE)
