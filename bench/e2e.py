"""End-to-end benchmark: ingest throughput and completion-to-SR-in-PACS latency.

    python bench/e2e.py --spawn -n 100            # starts its own Orthanc and breastcad serve
    python bench/e2e.py --host H --port P --api http://H:8000 -n 100   # against a running node

Two phases in one run. Burst: all instances over one association (ingest instances/s and MB/s),
then the time until each series' SR is in the PACS (queueing included: the series are analysed
one after another). Sequential (``--sequential K``): K more series sent one at a time, each after
the previous one's SR arrived: the turnaround of a lone series, reported beyond
``series_quiet_seconds`` too.

Each instance is its own single-image ultrasound series (BUSI images wrapped as Ultrasound Image
Storage when ../shared/data is there, else synthetic speckle). Ingest: all instances over one
association (pynetdicom SCU), instances/s and MB/s. Latency: for every series, from its C-STORE
response to its result's delivery to the PACS being acknowledged (``done`` in the node's API,
polled every 50 ms), minus nothing: the figure includes ``series_quiet_seconds``, which is printed
beside it. Writes a JSON summary with ``--json-out``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import yaml
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import US_IMAGE_STORAGE, us_dataset  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _images(n: int, size: tuple[int, int]) -> Iterator[np.ndarray]:
    shared = Path(os.environ.get("BREASTCAD_SHARED_DATA", REPO.parent / "shared" / "data"))
    pngs = sorted((shared / "busi").glob("*/*.png"))
    rng = np.random.default_rng(0)
    for i in range(n):
        if pngs:
            from PIL import Image

            with Image.open(pngs[i % len(pngs)]) as im:
                yield np.asarray(im.convert("L").resize((size[1], size[0])), dtype=np.uint8)
        else:
            yield rng.gamma(2.0, 40.0, size).clip(0, 255).astype(np.uint8)


@contextlib.contextmanager
def _spawned(workdir: Path, quiet: float) -> Iterator[tuple[int, str, subprocess.Popen[bytes]]]:
    orthanc_exe = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
    o_http, o_dicom = _free_port(), _free_port()
    (workdir / "orthanc").mkdir()
    cfg = {
        "Name": "bench",
        "HttpPort": o_http,
        "DicomPort": o_dicom,
        "DicomAet": "ORTHANC",
        "StorageDirectory": str(workdir / "orthanc"),
        "IndexDirectory": str(workdir / "orthanc"),
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomCheckCalledAet": False,
        "DicomAlwaysAllowStore": True,
        "Plugins": [],
    }
    (workdir / "orthanc.json").write_text(json.dumps(cfg))
    orthanc = subprocess.Popen(
        [orthanc_exe, str(workdir / "orthanc.json")],
        stdout=open(workdir / "orthanc.log", "wb"),  # noqa: SIM115
        stderr=subprocess.STDOUT,
    )
    dicom_port, api_port = _free_port(), _free_port()
    config = {
        "dicom_host": "127.0.0.1",
        "dicom_port": dicom_port,
        "api_port": api_port,
        "data_dir": str(workdir / "var"),
        "series_quiet_seconds": quiet,
        "destinations": {"pacs": {"host": "127.0.0.1", "port": o_dicom, "ae_title": "ORTHANC"}},
        "routes": [{"send_to": ["pacs"]}],
        "log_level": "WARNING",
    }
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    node = subprocess.Popen(
        [sys.executable, "-m", "dicom_node.cli", "serve", "--config", str(workdir / "config.yaml")],
        cwd=REPO,
        stdout=open(workdir / "node.log", "wb"),  # noqa: SIM115
        stderr=subprocess.STDOUT,
    )
    api = f"http://127.0.0.1:{api_port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{api}/health", timeout=2).status_code == 200:
                    break
            time.sleep(0.3)
        else:
            raise RuntimeError("node did not start; see " + str(workdir / "node.log"))
        yield dicom_port, api, node
    finally:
        node.terminate()
        orthanc.terminate()
        node.wait(30)
        orthanc.wait(30)


def _ingest(
    host: str, port: int, datasets: list[Dataset], progress: bool = True
) -> tuple[float, list[float]]:
    ae = AE(ae_title="BENCHSCU")
    ae.add_requested_context(US_IMAGE_STORAGE, ExplicitVRLittleEndian)
    assoc = ae.associate(host, port, ae_title="BREASTCAD")
    if not assoc.is_established:
        raise RuntimeError(f"association with {host}:{port} failed")
    sent_at: list[float] = []
    start = time.perf_counter()
    for ds in tqdm(datasets, desc="C-STORE", unit="inst", disable=not progress):
        status = assoc.send_c_store(ds)
        if int(status.Status) != 0:
            raise RuntimeError(f"C-STORE failed with 0x{int(status.Status):04X}")
        sent_at.append(time.perf_counter())
    elapsed = time.perf_counter() - start
    assoc.release()
    return elapsed, sent_at


def _latencies(
    api: str,
    datasets: list[Dataset],
    sent_at: list[float],
    timeout: float,
    progress: bool = True,
) -> list[float]:
    pending = {str(ds.StudyInstanceUID): i for i, ds in enumerate(datasets)}
    done: dict[int, float] = {}
    deadline = time.monotonic() + timeout
    with (
        httpx.Client(base_url=api, timeout=10) as client,
        tqdm(total=len(datasets), desc="SR in PACS", unit="series", disable=not progress) as bar,
    ):
        while pending and time.monotonic() < deadline:
            for study, index in list(pending.items()):
                response = client.get(f"/studies/{study}")
                if response.status_code != 200:
                    continue
                series = response.json()["series"]
                results = [r for s in series for r in s["results"]]
                failed = [j for s in series for j in s["jobs"] if j["state"] == "failed"]
                if failed:
                    raise RuntimeError(f"job failed: {failed}")
                if results and all(d["state"] == "done" for d in results[-1]["deliveries"]):
                    done[index] = time.perf_counter() - sent_at[index]
                    del pending[study]
                    bar.update(1)
            time.sleep(0.05)
    if pending:
        raise TimeoutError(f"{len(pending)} series had no SR in the PACS after {timeout} s")
    return [done[i] for i in sorted(done)]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("-n", type=int, default=50, help="instances (= series) to send")
    parser.add_argument("--spawn", action="store_true", help="start Orthanc and breastcad here")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=11112)
    parser.add_argument("--api", default="http://127.0.0.1:8000")
    parser.add_argument("--quiet", type=float, default=1.0, help="series_quiet_seconds (--spawn)")
    parser.add_argument("--rows", type=int, default=600)
    parser.add_argument("--columns", type=int, default=800)
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--sequential", type=int, default=20, help="lone series to time")
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()

    images = _images(args.n, (args.rows, args.columns))
    datasets = [us_dataset(px, i) for i, px in enumerate(images)]
    size_mb = sum(len(ds.PixelData) for ds in datasets) / 1e6
    with contextlib.ExitStack() as stack:
        quiet = args.quiet
        if args.spawn:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-e2e-")))
            port, api, _node = stack.enter_context(_spawned(workdir, args.quiet))
            host = "127.0.0.1"
        else:
            host, port, api = args.host, args.port, args.api
            quiet = float("nan")
        elapsed, sent_at = _ingest(host, port, datasets)
        latencies = _latencies(api, datasets, sent_at, args.timeout)
        lone: list[float] = []
        extra = [
            us_dataset(px, args.n + i)
            for i, px in enumerate(_images(args.sequential, (args.rows, args.columns)))
        ]
        for ds in tqdm(extra, desc="lone series", unit="series"):
            _elapsed, sent = _ingest(host, port, [ds], progress=False)
            lone += _latencies(api, [ds], sent, args.timeout, progress=False)
    summary: dict[str, Any] = {
        "instances": args.n,
        "pixel_mb": round(size_mb, 2),
        "ingest_seconds": round(elapsed, 3),
        "ingest_instances_per_s": round(args.n / elapsed, 1),
        "ingest_mb_per_s": round(size_mb / elapsed, 1),
        "series_quiet_seconds": quiet,
        "burst_latency_p50_s": round(statistics.median(latencies), 3),
        "burst_latency_p95_s": round(float(np.percentile(latencies, 95)), 3),
        "burst_latency_max_s": round(max(latencies), 3),
        "lone_series": len(lone),
        "lone_latency_p50_s": round(statistics.median(lone), 3) if lone else None,
        "lone_latency_p95_s": round(float(np.percentile(lone, 95)), 3) if lone else None,
        "lone_p50_beyond_quiet_s": round(statistics.median(lone) - quiet, 3) if lone else None,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU, {platform.python_version()}",
    }
    print()
    print(f"{'measure':<28} value")
    for key, value in summary.items():
        print(f"{key:<28} {value}")
    if args.json_out:
        args.json_out.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
