"""What the benchmarks share: test images from real BUSI pictures, free ports, a private Orthanc,
``breastcad serve`` / ``breastcad worker`` subprocesses on a private config, and the JSON/table
output. Nothing here is imported by the node itself.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import yaml
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

US_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.6.1"
REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
#: subprocesses import this tree first (not whatever the venv's entry point points at)
CHILD_ENV = {"PYTHONPATH": str(REPO), "OMP_WAIT_POLICY": "PASSIVE"}


def child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH")
                                     else "")
    env["OMP_WAIT_POLICY"] = "PASSIVE"
    env.update(extra)
    return env


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def shared_data() -> Path:
    return Path(os.environ.get("BREASTCAD_SHARED_DATA", REPO.parent / "shared" / "data"))


def busi_images(n: int, size: tuple[int, int] = (600, 800)) -> list[np.ndarray]:
    """``n`` grey uint8 images of ``size`` (rows, columns): real BUSI pictures, resized, reused
    cyclically. Raises SystemExit when the data set is not there (no synthetic stand-in)."""
    from PIL import Image

    pngs = sorted(p for p in (shared_data() / "busi").glob("*/*.png") if "_mask" not in p.name)
    if not pngs:
        raise SystemExit(f"no BUSI images under {shared_data() / 'busi'}")
    images = []
    for i in range(n):
        with Image.open(pngs[(i * 7) % len(pngs)]) as im:
            images.append(
                np.asarray(im.convert("L").resize((size[1], size[0])), dtype=np.uint8)
            )
    return images


def us_dataset(
    pixels: np.ndarray, index: int, *, study: str | None = None, series: str | None = None,
    instance_number: int = 1,
) -> Dataset:
    """An Ultrasound Image Storage instance (MONOCHROME2, 8 bit, explicit VR LE)."""
    ds = Dataset()
    ds.SOPClassUID = US_IMAGE_STORAGE
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = study or generate_uid()
    ds.SeriesInstanceUID = series or generate_uid()
    ds.PatientID = f"BENCH{index:05d}"
    ds.PatientName = "BENCH^PATIENT"
    ds.Modality = "US"
    ds.StudyDate = ds.SeriesDate = time.strftime("%Y%m%d")
    ds.StudyTime = "120000"
    ds.AccessionNumber = f"B{index:07d}"
    ds.SeriesNumber = 1
    ds.InstanceNumber = instance_number
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = pixels.tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def machine() -> dict[str, Any]:
    import torch

    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def write_json(name: str, report: dict[str, Any], out: Path = RESULTS) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    path = out / f"{name}-{stamp}.json"
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    return path


def table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    cells = [[str(c) for c in header], *[[_fmt(c) for c in row] for row in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return "" if value is None else str(value)


def percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=float), q)) if values else float("nan")


# -- peers and the node as subprocesses -----------------------------------------------------


@dataclass
class Proc:
    """A subprocess with its log file; stopped by :meth:`stop`."""

    name: str
    command: list[str]
    workdir: Path
    env: dict[str, str] = field(default_factory=child_env)
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> Proc:
        log = open(self.workdir / f"{self.name}.log", "wb")  # noqa: SIM115 - child owns it
        self.process = subprocess.Popen(
            self.command, cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        log.close()
        return self

    def log_tail(self, lines: int = 40) -> str:
        path = self.workdir / f"{self.name}.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


def wait_for_port(port: int, proc: Proc, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.process is not None and proc.process.poll() is not None:
            raise RuntimeError(f"{proc.name} exited:\n{proc.log_tail()}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            return
        time.sleep(0.2)
    raise RuntimeError(f"{proc.name} did not listen on {port} in {timeout} s:\n{proc.log_tail()}")


@dataclass
class Orthanc:
    proc: Proc
    dicom_port: int
    http_port: int
    aet: str = "ORTHANC"

    def count(self) -> int:
        return len(httpx.get(f"http://127.0.0.1:{self.http_port}/instances", timeout=30).json())


@contextlib.contextmanager
def orthanc(workdir: Path, name: str = "orthanc") -> Iterator[Orthanc]:
    """A private Orthanc (Debian package) on free ports, no plugins, storage in ``workdir``."""
    exe = shutil.which("Orthanc", path=os.environ.get("PATH", "") + ":/usr/sbin") or "Orthanc"
    http_port, dicom_port = free_port(), free_port()
    store = workdir / name
    store.mkdir(parents=True)
    config = {
        "Name": "bench", "HttpPort": http_port, "DicomPort": dicom_port, "DicomAet": "ORTHANC",
        "StorageDirectory": str(store), "IndexDirectory": str(store),
        "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
        "DicomCheckCalledAet": False, "DicomAlwaysAllowStore": True, "Plugins": [],
        "UnknownSopClassAccepted": True,
    }
    (workdir / f"{name}.json").write_text(json.dumps(config))
    proc = Proc(name, [exe, str(workdir / f"{name}.json")], workdir, env=dict(os.environ)).start()
    try:
        wait_for_port(http_port, proc, 60)
        wait_for_port(dicom_port, proc, 60)
        yield Orthanc(proc, dicom_port, http_port)
    finally:
        proc.stop()


def breastcad_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "dicom_node.cli", *args]


@dataclass
class Node:
    """``breastcad serve`` on a private config (and optionally separate workers)."""

    workdir: Path
    config: dict[str, Any]
    serve: Proc
    workers: list[Proc] = field(default_factory=list)

    @property
    def dicom_port(self) -> int:
        return int(self.config["dicom_port"])

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.config['api_port']}"

    @property
    def database(self) -> Path:
        return Path(self.config["data_dir"]) / "state.db"

    def add_worker(self, name: str, torch_threads: int | None = None) -> Proc:
        """Start a ``breastcad worker`` on the node's config (``torch_threads`` overrides)."""
        # INFO: Celery's "ready." line tells the bench the worker has warmed up
        extra = {"BREASTCAD_LOG_LEVEL": "INFO"}
        if torch_threads is not None:
            extra["BREASTCAD_TORCH_THREADS"] = str(torch_threads)
        worker = Proc(name, breastcad_command("worker", "--config", str(self.config_path)),
                      self.workdir, env=child_env(**extra)).start()
        self.workers.append(worker)
        return worker

    @property
    def config_path(self) -> Path:
        return self.workdir / "node.yaml"


@contextlib.contextmanager
def node(workdir: Path, **settings: Any) -> Iterator[Node]:
    """``breastcad serve`` with ``settings`` over the bench defaults; waits for /health."""
    config: dict[str, Any] = {
        "dicom_host": "127.0.0.1", "dicom_port": free_port(), "api_port": free_port(),
        "data_dir": str(workdir / "var"), "log_level": "WARNING", "torch_threads": 2,
    }
    config.update(settings)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "node.yaml").write_text(yaml.safe_dump(config))
    serve = Proc("serve", breastcad_command("serve", "--config", str(workdir / "node.yaml")),
                 workdir).start()
    handle = Node(workdir, config, serve)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if serve.process is not None and serve.process.poll() is not None:
                raise RuntimeError(f"breastcad serve exited:\n{serve.log_tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{handle.api}/health", timeout=2).status_code == 200:
                    break
            time.sleep(0.3)
        else:
            raise RuntimeError(f"breastcad serve did not start:\n{serve.log_tail()}")
        yield handle
    finally:
        for worker in handle.workers:
            worker.stop()
        serve.stop()
