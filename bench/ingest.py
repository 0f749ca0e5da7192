"""Ingest benchmark: the same ultrasound instances over one association with dcmtk's
``storescu`` into breastcad and three peers, and over 20 parallel associations.

    python bench/ingest.py [-n 300] [--repeats 5] [--parallel 20]

Receivers, all on loopback, each a fresh process with its own storage:
- breastcad: ``breastcad serve`` (SQLite state DB, embedded broker and worker,
  ``series_quiet_seconds`` 3600 so no analysis runs during ingest, ``maximum_associations`` 25);
- dcmtk ``storescp`` (writes files, no fsync);
- Orthanc (Debian package, private config, no plugins, SQLite index);
- a bare pynetdicom SCP (bench/bare_scp.py: writes ``event.encoded_dataset()`` and fsyncs).

Every repetition sends a new set (new UIDs: a receiver never sees a duplicate), made from real
BUSI images resized to 800 x 600, 8-bit MONOCHROME2, explicit VR little endian (about 480 KB
each), all in one series. The figure per receiver is the median over the repetitions of the
storescu process's wall time (association, all C-STOREs, release). Parallel: ``--parallel``
storescu processes at once, each with its share of the set, into breastcad and the bare SCP.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom.uid import generate_uid
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    Proc,
    busi_images,
    free_port,
    load_average,
    machine,
    node,
    orthanc,
    table,
    us_dataset,
    wait_for_port,
    write_json,
)


@dataclass
class Receiver:
    name: str
    port: int
    aet: str
    count: Callable[[], int]


def _count_files(folder: Path) -> Callable[[], int]:
    return lambda: sum(1 for p in folder.rglob("*") if p.is_file() and not p.name.endswith(".tmp"))


@contextlib.contextmanager
def receivers(workdir: Path, which: list[str]) -> Iterator[dict[str, Receiver]]:
    found: dict[str, Receiver] = {}
    with contextlib.ExitStack() as stack:
        if "breastcad" in which:
            handle = stack.enter_context(node(
                workdir / "breastcad", series_quiet_seconds=3600, maximum_associations=25,
            ))
            store = Path(handle.config["data_dir"]) / "instances"
            found["breastcad"] = Receiver("breastcad", handle.dicom_port, "BREASTCAD",
                                          _count_files(store))
        if "storescp" in which:
            port = free_port()
            out = workdir / "storescp-out"
            out.mkdir()
            proc = Proc("storescp", ["storescp", "-aet", "STORESCP", "-od", str(out), str(port)],
                        workdir).start()
            stack.callback(proc.stop)
            wait_for_port(port, proc)
            found["storescp"] = Receiver("storescp", port, "STORESCP", _count_files(out))
        if "orthanc" in which:
            pacs = stack.enter_context(orthanc(workdir))
            found["orthanc"] = Receiver("orthanc", pacs.dicom_port, pacs.aet, pacs.count)
        if "bare" in which:
            port = free_port()
            out = workdir / "bare-out"
            proc = Proc("bare", [sys.executable, str(Path(__file__).parent / "bare_scp.py"),
                                 str(port), str(out)], workdir).start()
            stack.callback(proc.stop)
            wait_for_port(port, proc)
            found["bare"] = Receiver("bare", port, "BARESCP", _count_files(out))
        yield found


def write_set(folder: Path, images: list[Any]) -> int:
    """One series of the images as Part 10 files with new UIDs; returns the bytes written."""
    folder.mkdir(parents=True)
    study, series = generate_uid(), generate_uid()
    total = 0
    for i, pixels in enumerate(images):
        ds = us_dataset(pixels, i, study=study, series=series, instance_number=i + 1)
        path = folder / f"{i:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        total += path.stat().st_size
    return total


def storescu(receiver: Receiver, files: list[Path]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        ["storescu", "-aet", "BENCHSCU", "-aec", receiver.aet, "127.0.0.1", str(receiver.port),
         *map(str, files)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )


def send(receiver: Receiver, files: list[Path], parallel: int = 1) -> float:
    """Seconds from starting the storescu process(es) until the last one exited successfully."""
    shares = [files[i::parallel] for i in range(parallel)]
    started = time.perf_counter()
    procs = [storescu(receiver, share) for share in shares if share]
    for proc in procs:
        _out, err = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"storescu into {receiver.name} failed: {err.decode()[-2000:]}")
    return time.perf_counter() - started


def run(n: int, repeats: int, parallel: int, which: list[str], quiet: bool = False
        ) -> dict[str, Any]:
    images = busi_images(n)
    load_before = load_average()
    times: dict[str, list[float]] = {name: [] for name in which}
    par: dict[str, list[float]] = {}
    expected: dict[str, int] = dict.fromkeys(which, 0)
    total_bytes = 0
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        work = Path(tmp)
        with receivers(work, which) as found:
            steps = repeats * (len(which) + (2 if parallel else 0))
            bar = tqdm(total=steps, desc="ingest", unit="run", disable=quiet)
            for rep in range(repeats):
                folder = work / f"set-{rep}"
                total_bytes = write_set(folder, images)
                files = sorted(folder.glob("*.dcm"))
                for name in which:
                    times[name].append(send(found[name], files))
                    expected[name] += len(files)
                    bar.update(1)
                if parallel:
                    for name in ("breastcad", "bare"):
                        if name in found:
                            # a new set: the parallel run must not send duplicates
                            shutil.rmtree(folder)
                            write_set(folder, images)
                            files = sorted(folder.glob("*.dcm"))
                            par.setdefault(name, []).append(send(found[name], files, parallel))
                            expected[name] += len(files)
                        bar.update(1)
                shutil.rmtree(folder)
            bar.close()
            counts = {name: found[name].count() for name in which}
    for name in which:
        if counts[name] != expected[name]:
            raise RuntimeError(f"{name} holds {counts[name]} instances, {expected[name]} were sent")
    mb = total_bytes / 1e6
    rows: dict[str, Any] = {}
    for name in which:
        median = statistics.median(times[name])
        rows[name] = {
            "seconds_median": round(median, 3), "seconds": [round(t, 3) for t in times[name]],
            "instances_per_s": round(n / median, 1), "mb_per_s": round(mb / median, 1),
        }
    for name, values in par.items():
        median = statistics.median(values)
        rows[f"{name} x{parallel}"] = {
            "seconds_median": round(median, 3), "seconds": [round(t, 3) for t in values],
            "instances_per_s": round(n / median, 1), "mb_per_s": round(mb / median, 1),
        }
    return {
        "benchmark": "ingest", "instances": n, "megabytes": round(mb, 1), "repeats": repeats,
        "parallel_associations": parallel, "machine": machine(),
        "load_average_before": load_before, "load_average_after": load_average(),
        "breastcad_config": "breastcad serve: SQLite, embedded broker and worker, "
                            "series_quiet_seconds 3600 (no analysis during ingest), "
                            "maximum_associations 25",
        "receivers": rows,
    }


def print_table(report: dict[str, Any]) -> None:
    rows = report["receivers"]
    bare = rows.get("bare", {}).get("instances_per_s")
    body = [
        [name, r["seconds_median"], r["instances_per_s"], r["mb_per_s"],
         round(r["instances_per_s"] / bare, 2) if bare else None]
        for name, r in rows.items()
    ]
    print(table(body, ["receiver", "s (median)", "inst/s", "MB/s", "vs bare SCP"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--parallel", type=int, default=20)
    parser.add_argument("--receivers", nargs="+", default=["breastcad", "storescp", "orthanc",
                                                            "bare"])
    args = parser.parse_args()
    report = run(args.n, args.repeats, args.parallel, args.receivers)
    print_table(report)
    print(f"written {write_json('ingest', report)}")


if __name__ == "__main__":
    main()
