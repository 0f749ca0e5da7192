"""Whole-slide benchmark: seconds, tiles/s and peak RSS of the SM pipeline per slide.

    OMP_WAIT_POLICY=PASSIVE python bench/wsi.py [--sizes 20000 40000] [--tissue 0.4] \
        [--patch-card CARD.json] [--keep DIR] [--out bench/results]

For each size a synthetic-from-real slide is written as a TILED_FULL JPEG pyramid (base level at
the analysis spacing, 4 µm/pixel, so the size is the size at the analysis level): real IDC H&E
patches (all of the shared folder, in a fixed random order) tiled as a periodic mosaic inside
ellipses covering about ``--tissue`` of the slide, glass outside. Each slide is then analysed in
a fresh process (``inference.wsi.analyse_slide`` with the bundled SM patch model and aggregator,
or ``--patch-card``), which reports its own wall time and peak RSS (``ru_maxrss``), so writing
the slide is not counted. Prints a table and writes ``wsi-<time>.json`` into ``--out``
(bench/results/ is git-ignored).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from support.wsi_factory import GLASS, IDC_MPP, load_patch, write_pyramid  # noqa: E402

from inference.paths import shared_data_dir  # noqa: E402
from inference.wsi.split import read_idc_patches  # noqa: E402

MOSAIC_PATCHES = 32  # the mosaic is 32 x 32 patches (1600 x 1600 px at 4 µm/pixel)


def mosaic(data_dir: Path, seed: int = 0) -> npt.NDArray[np.uint8]:
    """Real IDC patches in a fixed random order, edge patches completed with glass."""
    patches = read_idc_patches(data_dir)
    order = np.random.default_rng(seed).permutation(len(patches))[: MOSAIC_PATCHES**2]
    side = 50 * MOSAIC_PATCHES
    out = np.full((side, side, 3), GLASS, dtype=np.uint8)
    for n, index in enumerate(order):
        pixels = load_patch(data_dir, patches[int(index)])
        r, c = divmod(n, MOSAIC_PATCHES)
        out[r * 50 : r * 50 + pixels.shape[0], c * 50 : c * 50 + pixels.shape[1]] = pixels
    return out


def ellipses(size: int, tissue: float, seed: int = 1) -> list[tuple[float, float, float, float]]:
    """Non-overlapping-ish ellipses (cx, cy, rx, ry) in base pixels covering ~``tissue``."""
    rng = np.random.default_rng(seed)
    count = 5
    area = tissue * size * size / count
    shapes = []
    for k in range(count):
        aspect = rng.uniform(0.6, 1.6)
        rx = np.sqrt(area / np.pi * aspect)
        ry = area / (np.pi * rx)
        cx = size * (0.2 + 0.6 * ((k * 0.37) % 1.0))
        cy = size * (0.15 + 0.7 * k / max(count - 1, 1))
        shapes.append((float(cx), float(cy), float(rx), float(ry)))
    return shapes


class SyntheticSlide:
    """Renders any region of any pyramid level of the synthetic slide."""

    def __init__(
        self, tile: npt.NDArray[np.uint8], shapes: list[tuple[float, float, float, float]]
    ) -> None:
        self.tile = tile
        self.shapes = shapes
        self._levels: dict[int, npt.NDArray[np.uint8]] = {}

    def _mosaic(self, downsample: int) -> npt.NDArray[np.uint8]:
        if downsample not in self._levels:
            side = max(1, round(self.tile.shape[0] / downsample))
            image = Image.fromarray(self.tile)
            self._levels[downsample] = (
                self.tile
                if downsample == 1
                else np.asarray(image.resize((side, side), Image.Resampling.BOX))
            )
        return self._levels[downsample]

    def __call__(self, downsample: int, x: int, y: int, w: int, h: int) -> npt.NDArray[np.uint8]:
        m = self._mosaic(downsample)
        rows = (y + np.arange(h)) % m.shape[0]
        cols = (x + np.arange(w)) % m.shape[1]
        out = m[rows][:, cols]
        by = ((y + np.arange(h) + 0.5) * downsample)[:, None]
        bx = ((x + np.arange(w) + 0.5) * downsample)[None, :]
        inside = np.zeros((h, w), dtype=bool)
        for cx, cy, rx, ry in self.shapes:
            inside |= ((bx - cx) / rx) ** 2 + ((by - cy) / ry) ** 2 <= 1.0
        out[~inside] = GLASS
        return out


def analyse(paths: list[Path], patch_card: Path | None) -> dict[str, Any]:
    """Run in the measured child process: analyse one slide, report time and peak RSS."""
    import torch

    from inference import Classifier, load_bundled
    from inference.card import ModelCard
    from inference.wsi import WholeSlide, analyse_slide, load_aggregator

    torch.set_num_threads(2)
    started = time.perf_counter()
    classifier = (
        Classifier.from_card(ModelCard.from_file(patch_card)) if patch_card else load_bundled("SM")
    )
    aggregator = load_aggregator(classifier.card)
    with WholeSlide.open(paths) as slide:
        result = analyse_slide(slide, classifier, aggregator)
    seconds = time.perf_counter() - started
    return {
        "seconds": round(seconds, 2),
        "analysis_seconds": round(result.seconds, 2),
        "timings": {k: round(v, 2) for k, v in result.timings.items()},
        "tissue_tiles": result.tissue_tiles,
        "tiles_per_second": round(result.tissue_tiles / result.seconds, 1),
        "positive_fraction": round(result.positive_fraction, 4),
        "slide_probabilities": {k: round(v, 4) for k, v in result.slide_probabilities.items()},
        "aggregator": result.aggregator,
        "patch_model": f"{classifier.card.name} {classifier.card.version}",
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    data_dir = shared_data_dir() / "idc-breast-histopathology"
    if not (data_dir / "labels.csv").is_file():
        raise SystemExit(f"IDC patches not found at {data_dir}")
    tile = mosaic(data_dir)
    rows: list[dict[str, Any]] = []
    for size in args.sizes:
        with tempfile.TemporaryDirectory(prefix="bench-wsi-") as tmp:
            folder = Path(args.keep) / f"slide-{size}" if args.keep else Path(tmp)
            started = time.perf_counter()
            paths = write_pyramid(
                folder, SyntheticSlide(tile, ellipses(size, args.tissue)), size, size, IDC_MPP
            )
            written = time.perf_counter() - started
            command = [sys.executable, __file__, "--analyse", *map(str, paths)]
            if args.patch_card:
                command += ["--patch-card", str(args.patch_card)]
            env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
            done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
            if done.returncode != 0:
                raise SystemExit(f"analysis of the {size} px slide failed:\n{done.stderr[-3000:]}")
            measured = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"{size} px: {measured}", flush=True)
            rows.append({
                "load_average_1min_after": round(os.getloadavg()[0], 2),
                "size": size,
                "levels": len(paths),
                "megabytes": round(sum(p.stat().st_size for p in paths) / 2**20, 1),
                "write_seconds": round(written, 1),
                **measured,
            })
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[20000, 40000])
    parser.add_argument("--tissue", type=float, default=0.4)
    parser.add_argument("--patch-card", type=Path, default=None)
    parser.add_argument("--keep", type=Path, default=None, help="write the slides here")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--analyse", type=Path, nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.analyse:
        print(json.dumps(analyse(args.analyse, args.patch_card)))
        return
    rows = run(args)
    header = (
        f"{'slide (px at 4 µm)':>18} {'tissue tiles':>12} {'seconds':>8} {'tiles/s':>8} "
        f"{'peak RSS MB':>11} {'pyramid MB':>10}"
    )
    print(header)
    for row in rows:
        print(
            f"{row['size']:>8} x {row['size']:<7} {row['tissue_tiles']:>12} "
            f"{row['analysis_seconds']:>8} {row['tiles_per_second']:>8} {row['peak_rss_mb']:>11} "
            f"{row['megabytes']:>10}"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    report = {
        "benchmark": "wsi",
        "when": stamp,
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
        },
        "tissue_fraction": args.tissue,
        "slides": rows,
    }
    path = args.out / f"wsi-{stamp}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"written {path}")


if __name__ == "__main__":
    main()
