"""The benchmarks keep working: each runs once on a tiny input (their figures are not checked
against targets; speed is measured by the benchmarks, not asserted here).

``BREASTCAD_BENCH_ALL=1`` also runs ``bench/run_all.py --quick`` end to end (about 2-6 minutes
on the shared 2-core VM: it starts Orthanc, PostgreSQL databases, Redis-backed workers and
several nodes), which is why it is opt-in.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))

import inference_speed  # noqa: E402
import ingest  # noqa: E402
import run_all  # noqa: E402
import turnaround  # noqa: E402
from common import shared_data  # noqa: E402


@pytest.fixture(autouse=True)
def _needs_busi() -> None:
    if not (shared_data() / "busi" / "labels.csv").is_file():
        pytest.skip("BUSI images not available")


def test_ingest_into_breastcad_and_the_three_peers() -> None:
    report = ingest.run(4, 1, 2, ["breastcad", "storescp", "orthanc", "bare"], quiet=True)
    # ingest.run raises unless every receiver holds every instance sent
    rows = report["receivers"]
    assert set(rows) == {"breastcad", "storescp", "orthanc", "bare", "breastcad x2", "bare x2"}
    assert all(row["instances_per_s"] > 0 and row["mb_per_s"] > 0 for row in rows.values())
    assert 1.5 < report["megabytes"] < 2.5  # 4 x 800 x 600 8-bit
    summary = run_all.summary_rows({"ingest": report})
    assert summary[0][0].startswith("ingest 1 assoc") and summary[0][1] == rows[
        "breastcad"]["instances_per_s"]


def test_inference_backends_agree_with_eager() -> None:
    report = inference_speed.run(2, 0.02, (1, 2), quiet=True)
    backends = {(row["model"], row["backend"]) for row in report["rows"]}
    models = {row["model"] for row in report["rows"]}
    assert {"us_busi", "sm_idc"} <= {model.split()[0] for model in models}
    assert len(backends) == 3 * len(models)
    for row in report["rows"]:
        assert row["max_abs_probability_difference"] <= 1e-4, row
        assert row["serving_b2"] > 0 and row["serving_b1_ms"] > 0


def test_turnaround_breakdown_has_the_workers_stages() -> None:
    report = turnaround.run(1, 0.3, 0, layouts=("embedded",), quiet_bar=True)
    (result,) = report["turnaround"]
    stages: dict[str, Any] = result["stages_median_s"]
    # stages the worker recorded with the result (inference.stages), not derived from rows
    for name in ("load", "decode", "preprocess", "model", "build", "save"):
        assert stages[name] > 0, (name, stages)
    # the quiet period runs from the instance row, written just before the C-STORE response the
    # client times from: a few ms less than series_quiet_seconds can be measured
    assert stages["completion wait"] >= 0.3 - 0.05
    assert stages["C-STORE out"] > 0
    assert result["p50_s"] == pytest.approx(stages["total"], abs=1e-3)


@pytest.mark.skipif(os.environ.get("BREASTCAD_BENCH_ALL") != "1",
                    reason="set BREASTCAD_BENCH_ALL=1 to run bench/run_all.py --quick (minutes)")
def test_run_all_quick(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "run_all.py"), "--quick", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=900, check=False,
        env=dict(os.environ, PYTHONPATH=str(REPO), OMP_WAIT_POLICY="PASSIVE"),
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (path,) = tmp_path.glob("run_all-*.json")
    report = json.loads(path.read_text())
    assert set(report["parts"]) == {"ingest", "inference", "turnaround", "wsi"}
    measures = [row["measure"] for row in report["summary"]]
    assert any(m.startswith("turnaround distributed") for m in measures)
    assert any(m.startswith("scale-out") for m in measures)
    assert "vs bare SCP" in done.stdout and "series/min" in done.stdout
