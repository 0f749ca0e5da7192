"""Every benchmark in one run, one table: breastcad's figures, the peers' beside them, the
ratios and the targets of issue #7.

    python bench/run_all.py            # the full run (about 15 minutes on the 2-core VM)
    python bench/run_all.py --quick    # tiny inputs, to keep it working (tests/bench)

Runs, in this order: ingest (bench/ingest.py), inference (bench/inference_speed.py), turnaround
and scale-out (bench/turnaround.py), whole slides (bench/wsi.py, as a subprocess: its own
options and JSON). Writes ``run_all-<UTC time>.json`` (every figure, the machine, the load
average before and after each part) under ``--out`` (default bench/results/, git-ignored).
A part that fails is reported in the table and the JSON, the others still run, and the exit
status is 1.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import inference_speed  # noqa: E402
import ingest  # noqa: E402
import turnaround  # noqa: E402
from common import RESULTS, child_env, load_average, machine, table, write_json  # noqa: E402

FULL: dict[str, dict[str, Any]] = {
    "ingest": {"n": 300, "repeats": 5, "parallel": 20},
    "inference": {"threads": 2, "seconds": 1.5, "batches": (1, 64)},
    "turnaround": {"series": 50, "quiet": 1.0, "scale_series": 40},
    "wsi": {"sizes": [6000]},
}
QUICK: dict[str, dict[str, Any]] = {
    "ingest": {"n": 6, "repeats": 1, "parallel": 2},
    "inference": {"threads": 2, "seconds": 0.05, "batches": (1, 4)},
    "turnaround": {"series": 2, "quiet": 0.5, "scale_series": 2},
    "wsi": {"sizes": [1200]},
}


def run_wsi(sizes: list[int], out: Path) -> dict[str, Any]:
    """bench/wsi.py in a subprocess (it is another helper's; only its CLI is relied on)."""
    command = [sys.executable, str(Path(__file__).parent / "wsi.py"), "--sizes",
               *map(str, sizes), "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, env=child_env(), check=False)
    if done.returncode != 0:
        raise RuntimeError(f"bench/wsi.py failed ({done.returncode}):\n{done.stderr[-3000:]}")
    reports = sorted(out.glob("wsi-*.json"))
    if not reports:
        raise RuntimeError(f"bench/wsi.py wrote no JSON; its output:\n{done.stdout[-2000:]}")
    report: dict[str, Any] = json.loads(reports[-1].read_text())
    return report


def _part(name: str, function: Callable[[], dict[str, Any]], parts: dict[str, Any]) -> None:
    started = time.perf_counter()
    print(f"== {name} (load average {load_average()})", flush=True)
    try:
        parts[name] = function()
    except (RuntimeError, OSError, ValueError, TimeoutError, SystemExit, ImportError) as exc:
        traceback.print_exc()
        parts[name] = {"error": f"{type(exc).__name__}: {exc}"}
    parts[name]["wall_seconds"] = round(time.perf_counter() - started, 1)


def summary_rows(parts: dict[str, Any]) -> list[list[Any]]:
    """[measure, breastcad, peers, ratio, target, met] rows for the one table."""
    rows: list[list[Any]] = []
    ing = parts.get("ingest", {})
    if "receivers" in ing:
        r = ing["receivers"]
        bare = r["bare"]["instances_per_s"]
        peers = ", ".join(f"{n} {r[n]['instances_per_s']}" for n in ("bare", "storescp",
                                                                      "orthanc") if n in r)
        ratio = r["breastcad"]["instances_per_s"] / bare
        rows.append([f"ingest 1 assoc, {ing['instances']} inst (inst/s)",
                     r["breastcad"]["instances_per_s"], peers, f"{ratio:.2f} of bare",
                     ">= 0.80 of bare", ratio >= 0.8])
        rows.append(["ingest 1 assoc (MB/s)", r["breastcad"]["mb_per_s"],
                     ", ".join(f"{n} {r[n]['mb_per_s']}" for n in ("bare", "storescp", "orthanc")
                               if n in r), "", "", None])
        par = ing["parallel_associations"]
        if f"breastcad x{par}" in r:
            mine, theirs = r[f"breastcad x{par}"], r.get(f"bare x{par}", {})
            ratio_p = mine["instances_per_s"] / theirs["instances_per_s"] if theirs else None
            rows.append([f"ingest {par} assocs (inst/s)", mine["instances_per_s"],
                         f"bare {theirs.get('instances_per_s')}",
                         f"{ratio_p:.2f} of bare" if ratio_p else "", "", None])
    elif ing:
        rows.append(["ingest", "FAILED", ing.get("error", "")[:60], "", "", False])
    inf = parts.get("inference", {})
    if "rows" in inf:
        by_model: dict[str, list[dict[str, Any]]] = {}
        for row in inf["rows"]:
            by_model.setdefault(row["model"], []).append(row)
        big = max(inf.get("batches", (1, 64)))
        for model, rs in by_model.items():
            eager = next(r for r in rs if r["backend"] == "eager")
            best = max(rs, key=lambda r: r[f"serving_b{big}"])
            fastest_b1 = min(rs, key=lambda r: r["serving_b1_ms"])
            rows.append([f"{model} b{big} serving (img/s)",
                         f"{best[f'serving_b{big}']} ({best['backend']})",
                         f"eager {eager[f'serving_b{big}']}",
                         f"{best[f'serving_b{big}'] / eager[f'serving_b{big}']:.2f}x eager",
                         ">= 200", best[f"serving_b{big}"] >= 200])
            rows.append([f"{model} b1 latency (ms)",
                         f"{fastest_b1['serving_b1_ms']} ({fastest_b1['backend']})",
                         f"eager {eager['serving_b1_ms']}", "", "< 20",
                         fastest_b1["serving_b1_ms"] < 20])
            rows.append([f"{model} max |dp| vs eager", max(
                r["max_abs_probability_difference"] for r in rs), "", "", "<= 1e-4",
                all(r["max_abs_probability_difference"] <= 1e-4 for r in rs)])
    elif inf:
        rows.append(["inference", "FAILED", inf.get("error", "")[:60], "", "", False])
    tur = parts.get("turnaround", {})
    for res in tur.get("turnaround", []):
        stages = res["stages_median_s"]
        slowest = max((k for k in stages if k not in ("total", "completion wait")),
                      key=lambda k: stages[k])
        rows.append([f"turnaround {res['layout']} p50 beyond quiet (s)",
                     res["p50_beyond_quiet_s"], f"p50 {res['p50_s']}, p95 {res['p95_s']}",
                     f"slowest: {slowest} {stages[slowest]}", "<= 1.0",
                     res["p50_beyond_quiet_s"] <= 1.0])
    if tur.get("scale_out"):
        one, two = tur["scale_out"][0], tur["scale_out"][-1]
        rows.append(["scale-out series/min, 1 -> 2 workers", one["series_per_minute"],
                     f"2 workers {two['series_per_minute']}",
                     f"{tur.get('scale_out_ratio')}x", "", None])
    if "error" in tur:
        rows.append(["turnaround", "FAILED", tur["error"][:60], "", "", False])
    wsi = parts.get("wsi", {})
    for slide in wsi.get("slides", []):
        rows.append([f"whole slide {slide['size']} px (s / tiles/s / MB)",
                     slide.get("analysis_seconds"),
                     f"{slide.get('tiles_per_second')} tiles/s",
                     f"peak RSS {slide.get('peak_rss_mb')} MB", "40k px < 60 s, < 2 GB", None])
    if "error" in wsi:
        rows.append(["whole slides", "FAILED", wsi["error"][:60], "", "", False])
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny inputs (CI)")
    parser.add_argument("--only", nargs="+", choices=["ingest", "inference", "turnaround", "wsi"])
    parser.add_argument("--wsi-sizes", type=int, nargs="+")
    parser.add_argument("--backend", default="eager", help="inference_backend of the node")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    config = QUICK if args.quick else FULL
    wanted = args.only or ["ingest", "inference", "turnaround", "wsi"]
    started = time.perf_counter()
    report: dict[str, Any] = {"benchmark": "run_all", "quick": args.quick, "machine": machine(),
                              "load_average_before": load_average(), "config": config}
    parts: dict[str, Any] = {}
    progress = not args.quick
    if "ingest" in wanted:
        c = config["ingest"]
        _part("ingest", lambda: ingest.run(c["n"], c["repeats"], c["parallel"],
                                           ["breastcad", "storescp", "orthanc", "bare"],
                                           quiet=not progress), parts)
    if "inference" in wanted:
        c = config["inference"]

        def inference_part() -> dict[str, Any]:
            result = inference_speed.run(c["threads"], c["seconds"], tuple(c["batches"]),
                                         quiet=not progress)
            result["batches"] = list(c["batches"])
            return result

        _part("inference", inference_part, parts)
    if "turnaround" in wanted:
        c = config["turnaround"]
        _part("turnaround", lambda: turnaround.run(c["series"], c["quiet"], c["scale_series"],
                                                   args.backend, quiet_bar=not progress), parts)
    if "wsi" in wanted:
        sizes = args.wsi_sizes or config["wsi"]["sizes"]
        with tempfile.TemporaryDirectory(prefix="bench-wsi-out-") as tmp:
            _part("wsi", lambda: run_wsi(sizes, Path(tmp)), parts)
    report["parts"] = parts
    report["load_average_after"] = load_average()
    report["wall_seconds"] = round(time.perf_counter() - started, 1)
    rows = summary_rows(parts)
    report["summary"] = [dict(zip(["measure", "breastcad", "peers", "ratio", "target", "met"],
                                  row, strict=True)) for row in rows]
    print()
    print(table([[*row[:5], {True: "yes", False: "NO", None: ""}[row[5]]] for row in rows],
                ["measure", "breastcad", "peers / others", "ratio", "target", "met"]))
    print(f"\nmachine {report['machine']}; load average before {report['load_average_before']}, "
          f"after {report['load_average_after']}; {report['wall_seconds']} s")
    for name in ("ingest", "inference", "turnaround"):
        if name in parts and "error" not in parts[name]:
            print()
            {"ingest": ingest.print_table, "inference": inference_speed.print_table,
             "turnaround": turnaround.print_tables}[name](parts[name])
    print(f"written {write_json('run_all', report, args.out)}")
    return 1 if any("error" in part for part in parts.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
