"""Turnaround and scale-out benchmarks: a single-image ultrasound series in, its SR in the PACS.

    python bench/turnaround.py [--series 50] [--quiet 1.0] [--scale-series 40]

Turnaround: ``--series`` lone series, each sent (pynetdicom SCU, one association) after the
previous one's SR was stored in the PACS (a private Orthanc), in two layouts:
- embedded: ``breastcad serve`` alone (SQLite, embedded broker and worker);
- distributed: ``breastcad serve`` with ``embedded_worker: false`` plus one ``breastcad worker``
  process, Redis 127.0.0.1:6379 (DB ``$BREASTCAD_TEST_REDIS_DB``, default 11) and a fresh
  PostgreSQL database (127.0.0.1:5432), as the tests use.
The turnaround of a series runs from the C-STORE response of its instance (client clock) to the
end of the successful C-STORE of its SR to the PACS (``delivery_attempts.finished_at``; same
machine, same clock). The breakdown comes from the state DB's rows and the stage timings the
worker stores with the result (``results.files["timings"]``, inference.stages):
completion wait (quiet period + dispatcher tick), dispatch (job row -> message), queue (message
-> worker), load (dcmread), decode, preprocess, model (trunk + head), Grad-CAM, similar cases,
SR/SC build, save (files), record (result row), C-STORE out.

Scale-out: a burst of ``--scale-series`` series sent at once to the distributed layout with 1
and then 2 worker processes; analysed series per minute from the first C-STORE to the last SR
in the PACS.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from sqlalchemy import select
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    US_IMAGE_STORAGE,
    Node,
    busi_images,
    load_average,
    machine,
    node,
    orthanc,
    percentile,
    table,
    us_dataset,
    write_json,
)

from dicom_node.db import Delivery, DeliveryAttempt, Job, Result, Series, StateDB  # noqa: E402

POSTGRES_ADMIN = "postgresql://postgres@127.0.0.1:5432/test"
STAGES = ["completion wait", "dispatch", "queue", "load", "decode", "preprocess", "model",
          "gradcam", "similar", "build", "save", "record", "C-STORE out", "other"]


def _redis_url() -> str:
    return f"redis://127.0.0.1:6379/{int(os.environ.get('BREASTCAD_TEST_REDIS_DB', '11'))}"


@contextlib.contextmanager
def _postgres() -> Iterator[str]:
    import psycopg

    name = f"bench_{secrets.token_hex(4)}"
    with psycopg.connect(POSTGRES_ADMIN, autocommit=True, connect_timeout=5) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql://postgres@127.0.0.1:5432/{name}"
    finally:
        with psycopg.connect(POSTGRES_ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _flush_redis() -> None:
    import redis

    redis.Redis.from_url(_redis_url()).flushdb()


@contextlib.contextmanager
def layout(workdir: Path, distributed: bool, quiet: float, workers: int = 1,
           torch_threads: int = 2, backend: str = "eager") -> Iterator[Node]:
    """Orthanc plus the node in one layout; yields the node once its workers are warm."""
    with contextlib.ExitStack() as stack:
        pacs = stack.enter_context(orthanc(workdir))
        settings: dict[str, Any] = {
            "series_quiet_seconds": quiet, "torch_threads": torch_threads,
            "inference_backend": backend, "similar_cases_in_sr": 0,
            "destinations": {"pacs": {"host": "127.0.0.1", "port": pacs.dicom_port,
                                      "ae_title": pacs.aet}},
            "routes": [{"send_to": ["pacs"]}],
        }
        if distributed:
            _flush_redis()
            settings.update(broker_url=_redis_url(), embedded_worker=False,
                            database_url=stack.enter_context(_postgres()))
        handle = stack.enter_context(node(workdir / "node", **settings))
        if distributed:
            for index in range(workers):
                handle.add_worker(f"worker-{index}")
            _wait_for_workers(handle, workers)
        yield handle


def _wait_for_workers(handle: Node, count: int, timeout: float = 240) -> None:
    """Until every worker's log says it is ready (Celery's 'ready.' after warm-up)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready = 0
        for worker in handle.workers:
            assert worker.process is not None
            if worker.process.poll() is not None:
                raise RuntimeError(f"{worker.name} exited:\n{worker.log_tail()}")
            log = (handle.workdir / f"{worker.name}.log").read_text(errors="replace")
            ready += "ready." in log
        if ready == count:
            return
        time.sleep(0.5)
    raise RuntimeError("workers not ready:\n" + "\n".join(w.log_tail() for w in handle.workers))


def _send(port: int, datasets: list[Dataset]) -> list[float]:
    """C-STORE over one association; the wall-clock time (epoch s) of each response."""
    ae = AE(ae_title="BENCHSCU")
    ae.add_requested_context(US_IMAGE_STORAGE, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="BREASTCAD")
    if not assoc.is_established:
        raise RuntimeError("association with breastcad failed")
    times = []
    try:
        for ds in datasets:
            status = assoc.send_c_store(ds)
            times.append(time.time())
            if int(status.Status) != 0:
                raise RuntimeError(f"C-STORE failed with 0x{int(status.Status):04X}")
    finally:
        assoc.release()
    return times


def _epoch(value: datetime | None) -> float:
    if value is None:
        return float("nan")
    return value.replace(tzinfo=UTC).timestamp()


def _delivered(db: StateDB, series_uid: str) -> dict[str, Any] | None:
    """The rows of a series whose SR delivery is done, else None."""
    with db.session() as session:
        job = session.scalars(select(Job).where(Job.series_instance_uid == series_uid)).first()
        if job is None:
            return None
        if job.state == "failed":
            raise RuntimeError(f"job of {series_uid} failed: {job.reason}")
        result = session.scalars(select(Result).where(Result.job_id == job.id)).first()
        if result is None:
            return None
        delivery = session.scalars(select(Delivery).where(Delivery.result_id == result.id)
                                   ).first()
        if delivery is None or delivery.state != "done":
            return None
        attempt = session.scalars(
            select(DeliveryAttempt).where(DeliveryAttempt.delivery_id == delivery.id,
                                          DeliveryAttempt.ok.is_(True))
        ).first()
        series = session.get(Series, series_uid)
        return {"job": job, "result": result, "delivery": delivery, "attempt": attempt,
                "series": series}


def _wait_delivered(db: StateDB, uids: list[str], timeout: float) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + timeout
    while len(found) < len(uids):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(uids) - len(found)} series had no SR in the PACS "
                               f"after {timeout} s")
        for uid in uids:
            if uid not in found and (rows := _delivered(db, uid)) is not None:
                found[uid] = rows
        time.sleep(0.02)
    return found


def breakdown(sent: float, rows: dict[str, Any]) -> dict[str, float]:
    """Seconds per stage of one series (see the module doc)."""
    job, result, delivery, attempt = rows["job"], rows["result"], rows["delivery"], rows["attempt"]
    timings = dict(result.files.get("timings", {}))
    started, created = _epoch(job.started_at), _epoch(job.created_at)
    recorded = _epoch(delivery.created_at)
    out = {
        "completion wait": created - sent,
        "dispatch": _epoch(job.sent_at) - created,
        "queue": started - _epoch(job.sent_at),
        **{name: float(timings.get(name, 0.0)) for name in
           ("load", "decode", "preprocess", "model", "gradcam", "similar", "build", "save")},
    }
    analysed = sum(float(v) for v in timings.values())
    out["record"] = recorded - started - analysed
    out["C-STORE out"] = _epoch(attempt.finished_at) - _epoch(attempt.started_at)
    total = _epoch(attempt.finished_at) - sent
    out["other"] = total - sum(out.values())  # e.g. result row -> delivery attempt start
    out["total"] = total
    return out


def turnaround(handle: Node, layout_name: str, count: int, quiet: float, backend: str,
               quiet_bar: bool = False) -> dict[str, Any]:
    """``count`` lone series one after another: the turnaround and its stages."""
    images = busi_images(count)
    db = StateDB(str(handle.config.get("database_url") or f"sqlite:///{handle.database}"))
    per_series: list[dict[str, float]] = []
    try:
        for index, pixels in enumerate(tqdm(images, desc=f"turnaround {layout_name}",
                                            unit="series", disable=quiet_bar)):
            ds = us_dataset(pixels, index)
            (sent,) = _send(handle.dicom_port, [ds])
            rows = _wait_delivered(db, [str(ds.SeriesInstanceUID)], 120)
            per_series.append(breakdown(sent, rows[str(ds.SeriesInstanceUID)]))
    finally:
        db.dispose()
    totals = [s["total"] for s in per_series]
    return {
        "layout": layout_name, "series": count, "series_quiet_seconds": quiet,
        "inference_backend": backend,
        "p50_s": round(statistics.median(totals), 3), "p95_s": round(percentile(totals, 95), 3),
        "p50_beyond_quiet_s": round(statistics.median(totals) - quiet, 3),
        "stages_median_s": {name: round(statistics.median(s[name] for s in per_series), 4)
                            for name in [*STAGES, "total"]},
        "stages_p95_s": {name: round(percentile([s[name] for s in per_series], 95), 4)
                         for name in [*STAGES, "total"]},
    }


def _burst(handle: Node, datasets: list[Dataset], quiet: float) -> tuple[float, list[float]]:
    """Send all at once; seconds until the last SR is in the PACS (the quiet period, passed once
    for the whole burst, not counted) and each job's analysis seconds."""
    db = StateDB(str(handle.config["database_url"]))
    try:
        started = time.time()
        _send(handle.dicom_port, datasets)
        rows = _wait_delivered(db, [str(ds.SeriesInstanceUID) for ds in datasets], 900)
        last = max(_epoch(r["attempt"].finished_at) for r in rows.values())
        analysis = [_epoch(r["job"].finished_at) - _epoch(r["job"].started_at)
                    for r in rows.values()]
    finally:
        db.dispose()
    return last - started - quiet, analysis


def scale_out(handle: Node, count: int, quiet: float) -> list[dict[str, Any]]:
    """Bursts of ``count`` series into the distributed layout: with its one worker (2 torch
    threads), then with two workers of 1 torch thread each (the same 2 cores)."""
    rows = []
    for phase, (workers, threads) in enumerate(((1, 2), (2, 1))):
        if phase:
            for worker in handle.workers:
                worker.stop()
            handle.workers.clear()
            for index in range(workers):
                handle.add_worker(f"scale-worker-{index}", torch_threads=threads)
            _wait_for_workers(handle, workers)
        images = busi_images(count)
        datasets = [us_dataset(px, 1000 * (phase + 1) + i) for i, px in enumerate(images)]
        seconds, analysis = _burst(handle, datasets, quiet)
        rows.append({
            "workers": workers, "torch_threads_per_worker": threads, "series": count,
            "seconds": round(seconds, 2), "series_per_minute": round(60 * count / seconds, 1),
            "analysis_seconds_median": round(statistics.median(analysis), 3),
        })
    return rows


def run(series: int, quiet: float, scale_series: int, backend: str = "eager",
        layouts: tuple[str, ...] = ("embedded", "distributed"), quiet_bar: bool = False
        ) -> dict[str, Any]:
    """Turnaround in each layout; scale-out in the distributed one, after its turnaround."""
    load_before = load_average()
    results: list[dict[str, Any]] = []
    scaling: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-turnaround-") as tmp:
        work = Path(tmp)
        for name in layouts:
            with layout(work / name, name == "distributed", quiet, backend=backend) as handle:
                results.append(turnaround(handle, name, series, quiet, backend, quiet_bar))
                if name == "distributed" and scale_series:
                    scaling = scale_out(handle, scale_series, quiet)
    report: dict[str, Any] = {
        "benchmark": "turnaround", "machine": machine(), "load_average_before": load_before,
        "turnaround": results, "scale_out": scaling, "load_average_after": load_average(),
    }
    if len(scaling) == 2:
        report["scale_out_ratio"] = round(
            scaling[1]["series_per_minute"] / scaling[0]["series_per_minute"], 2)
    return report


def print_tables(report: dict[str, Any]) -> None:
    results = report["turnaround"]
    body = [[name, *[r["stages_median_s"][name] for r in results]] for name in [*STAGES, "total"]]
    body.append(["p95 total", *[r["p95_s"] for r in results]])
    body.append(["p50 beyond quiet", *[r["p50_beyond_quiet_s"] for r in results]])
    print(table(body, ["stage (median s)", *[r["layout"] for r in results]]))
    if report["scale_out"]:
        print(table([[s["workers"], s["torch_threads_per_worker"], s["series"], s["seconds"],
                      s["series_per_minute"], s["analysis_seconds_median"]]
                     for s in report["scale_out"]],
                    ["workers", "threads each", "series", "s", "series/min", "analysis s (p50)"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--series", type=int, default=50)
    parser.add_argument("--quiet", type=float, default=1.0, help="series_quiet_seconds")
    parser.add_argument("--scale-series", type=int, default=40)
    parser.add_argument("--backend", default="eager")
    parser.add_argument("--layouts", nargs="+", default=["embedded", "distributed"])
    args = parser.parse_args()
    report = run(args.series, args.quiet, args.scale_series, args.backend, tuple(args.layouts))
    print_tables(report)
    print(f"written {write_json('turnaround', report)}")


if __name__ == "__main__":
    main()
