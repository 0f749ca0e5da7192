"""bench/wsi.py on a tiny slide, so the benchmark keeps working (its figures are not checked)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from support.wsi_factory import make_patch_model

REPO = Path(__file__).resolve().parents[2]


def test_bench_wsi_runs_on_a_tiny_slide(shared_data: Path, tmp_path: Path) -> None:
    if not (shared_data / "idc-breast-histopathology" / "labels.csv").is_file():
        pytest.skip("IDC patches not available")
    card = make_patch_model(tmp_path / "model")
    out = tmp_path / "results"
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "wsi.py"), "--sizes", "1200", "--tissue", "0.5",
         "--patch-card", str(card), "--out", str(out)],
        capture_output=True, text=True, env=dict(os.environ), timeout=600, check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "tiles/s" in done.stdout and "peak RSS MB" in done.stdout
    (report,) = out.glob("wsi-*.json")
    slide = json.loads(report.read_text())["slides"][0]
    assert slide["size"] == 1200
    # a 24 x 24 tile grid with about half of it tissue
    assert 0.3 * 576 <= slide["tissue_tiles"] <= 0.7 * 576
    assert slide["peak_rss_mb"] > 0 and slide["tiles_per_second"] > 0
    assert slide["aggregator"].startswith("mean of the top 1%")
