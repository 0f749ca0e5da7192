"""Whole-slide benchmark: seconds, tiles/s and peak RSS of the SM pipeline per slide.

    OMP_WAIT_POLICY=PASSIVE python bench/wsi.py [--sizes 20000 40000] [--tissue 0.4] \
        [--base-mpp 4] [--patch-card CARD.json] [--keep DIR] [--out bench/results]

For each size a synthetic-from-real slide is written as a TILED_FULL JPEG pyramid: real IDC H&E
patches (all of the shared folder, in a fixed random order) tiled as a periodic mosaic inside
ellipses covering about ``--tissue`` of the slide, glass outside, levels halving down to 256 px.
``--sizes`` are the base level's pixels; the base is at ``--base-mpp`` µm/pixel (default 4, the
analysis spacing, so the size is the size at the analysis level; 0.25 is a 40x scan, whose
4 µm/pixel level is the fifth, each mosaic pixel 16 x 16 base pixels). Each slide is then
analysed in a fresh process (``inference.wsi.analyse_slide`` with the bundled SM patch model and
aggregator, or ``--patch-card``), which shows its progress on stderr and reports its own wall
time, peak RSS (``ru_maxrss``) and RSS along the way, so writing the slide is not counted.
Prints a table and writes ``wsi-<time>.json`` into ``--out`` (bench/results/ is git-ignored),
with the load average at the start and end of each analysis.
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
    """Renders any region of any pyramid level of the synthetic slide.

    ``upsample`` is the base pixels per mosaic pixel (4 µm over the base spacing): levels finer
    than 4 µm/pixel repeat mosaic pixels (nearest neighbour), coarser ones average them.
    """

    def __init__(
        self,
        tile: npt.NDArray[np.uint8],
        shapes: list[tuple[float, float, float, float]],
        upsample: int = 1,
    ) -> None:
        self.tile = tile
        self.shapes = shapes
        self.upsample = upsample
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
        ys, xs = y + np.arange(h), x + np.arange(w)
        if downsample >= self.upsample:
            m = self._mosaic(downsample // self.upsample)
            rows, cols = ys % m.shape[0], xs % m.shape[1]
        else:
            m = self.tile
            rows = (ys * downsample // self.upsample) % m.shape[0]
            cols = (xs * downsample // self.upsample) % m.shape[1]
        out = m[rows][:, cols]
        by = ((ys + 0.5) * downsample)[:, None]
        bx = ((xs + 0.5) * downsample)[None, :]
        inside = np.zeros((h, w), dtype=bool)
        for cx, cy, rx, ry in self.shapes:
            # only the rows the ellipse reaches
            band = np.abs(by[:, 0] - cy) <= ry
            if band.any():
                inside[band] |= ((bx - cx) / rx) ** 2 + ((by[band] - cy) / ry) ** 2 <= 1.0
        out[~inside] = GLASS
        return out


def _rss_mb() -> float:
    """Resident set size of this process now (Linux), in MB."""
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def analyse(paths: list[Path], patch_card: Path | None) -> dict[str, Any]:
    """Run in the measured child process: analyse one slide, report time and memory."""
    import torch
    from tqdm import tqdm

    from inference import Classifier, load_bundled
    from inference.card import ModelCard
    from inference.wsi import WholeSlide, analyse_slide, load_aggregator

    torch.set_num_threads(2)
    started = time.perf_counter()
    classifier = (
        Classifier.from_card(ModelCard.from_file(patch_card)) if patch_card else load_bundled("SM")
    )
    aggregator = load_aggregator(classifier.card)
    rss: dict[str, float] = {"model_loaded": round(_rss_mb(), 1)}
    bar = tqdm(desc="tiles", unit="tile", mininterval=10.0, file=sys.stderr)
    marks = iter((0.1, 0.25, 0.5, 0.75, 1.0))
    mark: float | None = next(marks)

    def progress(done: int, total: int) -> None:
        nonlocal mark
        bar.total = total
        bar.update(done - bar.n)
        while mark is not None and done >= mark * total:
            rss[f"after_{int(mark * 100)}%_of_tiles"] = round(_rss_mb(), 1)
            mark = next(marks, None)

    with WholeSlide.open(paths) as slide:
        rss["slide_opened"] = round(_rss_mb(), 1)
        result = analyse_slide(slide, classifier, aggregator, progress=progress)
    bar.close()
    seconds = time.perf_counter() - started
    return {
        "seconds": round(seconds, 2),
        "analysis_seconds": round(result.seconds, 2),
        "timings": {k: round(v, 2) for k, v in result.timings.items()},
        "analysis_level": {
            "level": result.level.level,
            "width": result.level.width,
            "height": result.level.height,
            "mpp": result.level.mpp,
        },
        "tile_positions": int(result.tissue.size),
        "tissue_tiles": result.tissue_tiles,
        "tiles_per_second": round(result.tissue_tiles / result.seconds, 1),
        "positive_fraction": round(result.positive_fraction, 4),
        "slide_probabilities": {k: round(v, 4) for k, v in result.slide_probabilities.items()},
        "aggregator": result.aggregator,
        "patch_model": f"{classifier.card.name} {classifier.card.version}",
        "rss_mb": rss,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    data_dir = shared_data_dir() / "idc-breast-histopathology"
    if not (data_dir / "labels.csv").is_file():
        raise SystemExit(f"IDC patches not found at {data_dir}")
    upsample = round(IDC_MPP / args.base_mpp)
    if upsample < 1 or upsample & (upsample - 1) or abs(upsample * args.base_mpp - IDC_MPP) > 1e-9:
        raise SystemExit(f"--base-mpp must be {IDC_MPP:g} divided by a power of two")
    tile = mosaic(data_dir)
    rows: list[dict[str, Any]] = []
    for size in args.sizes:
        with tempfile.TemporaryDirectory(prefix="bench-wsi-") as tmp:
            folder = Path(args.keep) / f"slide-{size}" if args.keep else Path(tmp)
            started = time.perf_counter()
            render = SyntheticSlide(tile, ellipses(size, args.tissue), upsample)
            paths = write_pyramid(folder, render, size, size, args.base_mpp)
            written = time.perf_counter() - started
            print(f"{size} px at {args.base_mpp:g} µm/pixel: pyramid of {len(paths)} levels "
                  f"written in {written:.0f} s; analysing", file=sys.stderr, flush=True)
            command = [sys.executable, __file__, "--analyse", *map(str, paths)]
            if args.patch_card:
                command += ["--patch-card", str(args.patch_card)]
            env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
            load_start = [round(v, 2) for v in os.getloadavg()]
            # stderr (the child's progress bar and any traceback) goes straight to ours
            done = subprocess.run(
                command, stdout=subprocess.PIPE, text=True, env=env, check=False
            )
            load_end = [round(v, 2) for v in os.getloadavg()]
            if done.returncode != 0:
                raise SystemExit(f"analysis of the {size} px slide failed (its stderr is above)")
            measured = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"{size} px: {measured}", flush=True)
            rows.append({
                "load_average_start": load_start,
                "load_average_end": load_end,
                "load_average_1min_after": load_end[0],
                "size": size,
                "base_mpp": args.base_mpp,
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
    parser.add_argument(
        "--base-mpp", type=float, default=IDC_MPP,
        help="µm/pixel of the base level (4 divided by a power of two; default 4)",
    )
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
        f"{'base level (px)':>17} {'µm/px':>5} {'level at 4 µm':>13} {'tissue tiles':>12} "
        f"{'seconds':>8} {'tiles/s':>8} {'peak RSS MB':>11} {'pyramid MB':>10} {'load avg':>11}"
    )
    print(header)
    for row in rows:
        level = row["analysis_level"]
        load = f"{row['load_average_start'][0]:.1f}-{row['load_average_end'][0]:.1f}"
        print(
            f"{row['size']:>8} x {row['size']:<6} {row['base_mpp']:>5g} "
            f"{level['width']:>6} x {level['height']:<4} {row['tissue_tiles']:>12} "
            f"{row['analysis_seconds']:>8} {row['tiles_per_second']:>8} {row['peak_rss_mb']:>11} "
            f"{row['megabytes']:>10} {load:>11}"
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
        "base_mpp": args.base_mpp,
        "slides": rows,
    }
    path = args.out / f"wsi-{stamp}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"written {path}")


if __name__ == "__main__":
    main()
