"""bench/wsi.py on a tiny slide, so the benchmark keeps working (its figures are not checked).

The slide's base is at 2 µm/pixel, so the tiles come from its second level, as from a scanner's
pyramid (``--base-mpp``).
"""

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
        [sys.executable, str(REPO / "bench" / "wsi.py"), "--sizes", "2400", "--base-mpp", "2",
         "--tissue", "0.5", "--patch-card", str(card), "--out", str(out)],
        capture_output=True, text=True, env=dict(os.environ), timeout=600, check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "tiles/s" in done.stdout and "peak RSS MB" in done.stdout
    (report,) = out.glob("wsi-*.json")
    slide = json.loads(report.read_text())["slides"][0]
    assert slide["size"] == 2400 and slide["base_mpp"] == 2
    assert slide["analysis_level"] == {"level": 1, "width": 1200, "height": 1200, "mpp": 4.0}
    assert slide["tile_positions"] == 576
    assert len(slide["load_average_start"]) == 3 and len(slide["load_average_end"]) == 3
    assert slide["rss_mb"]["after_100%_of_tiles"] > 0
    # a 24 x 24 tile grid with about half of it tissue
    assert 0.3 * 576 <= slide["tissue_tiles"] <= 0.7 * 576
    assert slide["peak_rss_mb"] > 0 and slide["tiles_per_second"] > 0
    assert slide["aggregator"].startswith("mean of the top 1%")
