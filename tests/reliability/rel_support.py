"""Helpers shared by the reliability tests: test data with known PHI, waits, memory, DB counts."""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from node_process import Node
from pydicom.uid import generate_uid
from sqlalchemy import func, select
from support.dcmtk import find_tool
from support.dicom_factory import busi_as_ultrasound, write_dataset
from support.ports import free_port

from dicom_node.db import Instance, StateDB


@dataclass(frozen=True)
class Phi:
    """Patient identifiers written into the test data; none may reach a log line."""

    patient_name: str = "Zyxwvutsrq^Qwertyuiop"
    patient_id: str = "PHI-7Q3Z-98121"
    birth_date: str = "19410317"

    def needles(self) -> list[str]:
        family, given = self.patient_name.split("^")
        return [self.patient_name, family, given, self.patient_id, self.birth_date]


PHI = Phi()


def make_series(
    pngs: Sequence[Path],
    out: Path,
    *,
    phi: Phi = PHI,
    study_instance_uid: str | None = None,
) -> list[Path]:
    """One US series from BUSI PNGs, carrying ``phi``; returns the file paths."""
    study = study_instance_uid or generate_uid()
    series = generate_uid()
    paths: list[Path] = []
    for number, png in enumerate(pngs, start=1):
        ds = busi_as_ultrasound(
            png,
            patient_id=phi.patient_id,
            patient_name=phi.patient_name,
            study_instance_uid=study,
            series_instance_uid=series,
            instance_number=number,
        )
        ds.PatientBirthDate = phi.birth_date
        paths.append(write_dataset(ds, out / f"US_{number:04d}.dcm"))
    return paths


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, step: float = 0.2) -> Any:
    """Poll ``predicate`` until it returns something truthy; that value is returned."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def start_distributed(node: Node, workers: int) -> None:
    """Start ``serve`` first, then the workers once it is ready.

    Started together on a fresh PostgreSQL database, the processes race in
    ``StateDB``'s ``create_all`` and a worker can die at start-up with a UniqueViolation on
    ``pg_type`` (seen in the load test; docs/RELIABILITY.md, open problem 4).
    """
    node.start()
    for index in range(workers):
        node.start_worker(index)


def jobs(node: Node) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = node.client.get("/jobs").json()["items"]
    return items


def peak_rss_mib(pid: int) -> float:
    """The peak resident set size (VmHWM) of a live process, in MiB."""
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"^VmHWM:\s+(\d+) kB", status, re.MULTILINE)
    if match is None:
        raise AssertionError(f"no VmHWM for pid {pid}")
    return int(match.group(1)) / 1024


def instance_count(database_url: str) -> int:
    db = StateDB(database_url)
    try:
        with db.session() as session:
            return int(session.scalar(select(func.count()).select_from(Instance)) or 0)
    finally:
        db.dispose()


def stored_sop_uids(database_url: str) -> set[str]:
    db = StateDB(database_url)
    try:
        with db.session() as session:
            return set(session.scalars(select(Instance.sop_instance_uid)).all())
    finally:
        db.dispose()


def sqlalchemy_url(database_url: str) -> str:
    for prefix in ("postgresql://", "postgres://"):
        if database_url.startswith(prefix):
            return "postgresql+psycopg://" + database_url[len(prefix) :]
    return database_url


def assert_no_phi(texts: dict[str, str], phi: Phi = PHI) -> None:
    """No PHI string (case-insensitive) in any of the named texts (log files)."""
    found: list[str] = []
    for name, text in texts.items():
        lowered = text.lower()
        for needle in phi.needles():
            if needle.lower() in lowered:
                line = next(ln for ln in text.splitlines() if needle.lower() in ln.lower())
                found.append(f"{name}: {needle!r} in {line[:200]!r}")
    assert not found, "PHI in logs:\n" + "\n".join(found)


def node_logs(node: Node) -> dict[str, str]:
    out: dict[str, str] = {}
    for proc in [node.server, *node.workers]:
        if proc is not None and proc.log_path.exists():
            out[proc.name] = proc.log_path.read_text(errors="replace")
    return out


def storescu_popen(
    files: Sequence[Path], port: int, log: Path, *, calling_aet: str = "STORESCU"
) -> subprocess.Popen[bytes]:
    """One ``storescu -v`` association sending ``files`` (uncompressed), in the background."""
    exe = find_tool("storescu")
    assert exe is not None
    with open(log, "wb") as handle:
        return subprocess.Popen(
            [exe, "-v", "-nh", "-aet", calling_aet, "-aec", "BREASTCAD", "127.0.0.1", str(port)]
            + [str(p) for p in files],
            stdout=handle,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )


_SENDING = re.compile(r"Sending file: (\S+)")
_RESPONSE = re.compile(r"Received Store Response(?: \(([^)]*)\))?")


def storescu_outcomes(log_text: str) -> dict[str, str]:
    """File path -> the status text storescu received for it (from its ``-v`` output)."""
    outcomes: dict[str, str] = {}
    current: str | None = None
    for line in log_text.splitlines():
        sending = _SENDING.search(line)
        if sending:
            current = sending.group(1)
            continue
        response = _RESPONSE.search(line)
        if response and current is not None:
            outcomes[current] = response.group(1) or ""
            current = None
    return outcomes


class RedisServer:
    """A private redis-server without persistence on a free port; SIGKILL it at will."""

    def __init__(self, workdir: Path) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            pytest.skip("redis-server is not installed (apt-get install -y redis-server)")
        self.exe = exe
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / "redis.log"

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 15) -> None:
        import redis

        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [
                    self.exe,
                    "--port", str(self.port),
                    "--bind", "127.0.0.1",
                    "--save", "",
                    "--appendonly", "no",
                    "--dir", str(self.workdir),
                    "--daemonize", "no",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )  # fmt: skip
        client = redis.Redis(port=self.port, socket_connect_timeout=1)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if client.ping():
                    client.close()
                    return
            except redis.exceptions.RedisError:
                time.sleep(0.1)
        raise RuntimeError(f"redis-server on port {self.port} did not answer:\n{self.log_tail()}")

    def kill(self) -> None:
        """SIGKILL: every queued message is gone (no persistence)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self.process = None

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self.process = None

    def llen(self, key: str) -> int:
        import redis

        client = redis.Redis(port=self.port, socket_connect_timeout=1)
        try:
            return int(client.llen(key))  # type: ignore[arg-type]
        finally:
            client.close()

    def hlen(self, key: str) -> int:
        import redis

        client = redis.Redis(port=self.port, socket_connect_timeout=1)
        try:
            return int(client.hlen(key))  # type: ignore[arg-type]
        finally:
            client.close()

    def log_tail(self, lines: int = 40) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


class InProcessNode:
    """The listener and the store in this process (real associations on localhost)."""

    def __init__(self, data_dir: Path, **settings: Any) -> None:
        from dicom_node.scp import StorageSCP
        from dicom_node.settings import Settings
        from dicom_node.store import InstanceStore

        self.settings = Settings(
            data_dir=data_dir, dicom_host="127.0.0.1", dicom_port=free_port(), **settings
        )
        self.db = StateDB(self.settings.sqlalchemy_url)
        self.store = InstanceStore(self.settings.store_dir, self.db)
        self.scp = StorageSCP(self.settings, self.store)

    @property
    def port(self) -> int:
        return self.settings.dicom_port

    def start(self) -> None:
        self.scp.start()

    def stop(self) -> None:
        self.scp.stop()
        self.db.dispose()

    def stored_files(self) -> set[str]:
        """Relative paths of the instance files (the incoming folder excluded)."""
        root = self.settings.store_dir
        return {
            p.relative_to(root).as_posix()
            for p in root.rglob("*")
            if p.is_file() and not p.relative_to(root).as_posix().startswith(".incoming/")
        }

    def incoming_files(self) -> list[Path]:
        return sorted((self.settings.store_dir / ".incoming").glob("*"))

    def rows(self) -> dict[str, str]:
        with self.db.session() as session:
            return {i.sop_instance_uid: i.path for i in session.scalars(select(Instance))}


def send_datasets(
    port: int,
    items: Sequence[Any],
    *,
    calling: str = "STORESCU",
    contexts: Sequence[str] = (),
    transfer_syntaxes: Sequence[str] | None = None,
) -> list[int]:
    """C-STORE each dataset or file over one pynetdicom association; the statuses."""
    from pynetdicom import AE

    from dicom_node.scp import STORAGE_SOP_CLASSES

    ae = AE(ae_title=calling)
    for sop_class in contexts or STORAGE_SOP_CLASSES:
        if transfer_syntaxes is None:
            ae.add_requested_context(sop_class)
        else:  # one context per transfer syntax: the acceptor picks one per context
            for syntax in transfer_syntaxes:
                ae.add_requested_context(sop_class, syntax)
    assoc = ae.associate("127.0.0.1", port, ae_title="BREASTCAD")
    assert assoc.is_established, "association not established"
    try:
        statuses = []
        for item in items:
            response = assoc.send_c_store(item)
            statuses.append(int(response.Status) if "Status" in response else -1)
        return statuses
    finally:
        assoc.release()
