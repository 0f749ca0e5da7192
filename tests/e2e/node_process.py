"""Run ``breastcad serve`` / ``breastcad worker`` as real subprocesses on a private config."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Self

import httpx
import yaml
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from support.ports import free_port

REPO = Path(__file__).resolve().parents[2]


def _breastcad(*args: str) -> list[str]:
    return [sys.executable, "-m", "dicom_node.cli", *args]


class BreastcadProcess:
    """One breastcad subprocess with its log in the work dir."""

    def __init__(self, name: str, args: list[str], workdir: Path, env: dict[str, str]) -> None:
        self.name = name
        self.log_path = workdir / f"{name}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            _breastcad(*args),
            cwd=REPO,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> None:
        if self.alive():
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self._log.close()

    def log_tail(self, lines: int = 80) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


class Node:
    """A breastcad node (``serve``) and optional separate workers, on free ports."""

    def __init__(
        self,
        workdir: Path,
        *,
        pacs_port: int,
        pacs_aet: str = "ORTHANC",
        broker_url: str | None = None,
        database_url: str | None = None,
        embedded_worker: bool = True,
        workers: int = 0,
        extra: dict[str, Any] | None = None,
    ) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.dicom_port = free_port()
        self.api_port = free_port()
        self.config: dict[str, Any] = {
            "ae_title": "BREASTCAD",
            "dicom_host": "127.0.0.1",
            "dicom_port": self.dicom_port,
            "api_port": self.api_port,
            "data_dir": str(workdir / "var"),
            "broker_url": broker_url,
            "embedded_worker": embedded_worker,
            "database_url": database_url,
            "series_quiet_seconds": 1,
            "destinations": {
                "pacs": {"host": "127.0.0.1", "port": pacs_port, "ae_title": pacs_aet}
            },
            "routes": [{"send_to": ["pacs"]}],
            "delivery_backoff_seconds": 0.5,
            "log_level": "INFO",
        }
        self.config.update(extra or {})
        self.config_path = workdir / "config.yaml"
        self.config_path.write_text(yaml.safe_dump(self.config))
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("BREASTCAD_")}
        shared = os.environ.get("BREASTCAD_SHARED_DATA")
        if shared:
            self.env["BREASTCAD_SHARED_DATA"] = shared
        self.worker_count = workers
        self.server: BreastcadProcess | None = None
        self.workers: list[BreastcadProcess] = []
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{self.api_port}", timeout=30)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def start(self, timeout: float = 90) -> None:
        self.server = BreastcadProcess(
            "serve", ["serve", "--config", str(self.config_path)], self.workdir, self.env
        )
        for index in range(self.worker_count):
            self.start_worker(index)
        self.wait_ready(timeout)

    def start_worker(self, index: int) -> BreastcadProcess:
        worker = BreastcadProcess(
            f"worker-{index}", ["worker", "--config", str(self.config_path)], self.workdir, self.env
        )
        self.workers.append(worker)
        return worker

    def wait_ready(self, timeout: float) -> None:
        assert self.server is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.server.alive():
                raise RuntimeError(f"breastcad serve exited:\n{self.server.log_tail()}")
            try:
                healthy = self.client.get("/health").status_code == 200
                if healthy and _dicom_answers(self.dicom_port, str(self.config["ae_title"])):
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise TimeoutError(f"breastcad serve not ready in {timeout} s:\n{self.server.log_tail()}")

    def wait_for_jobs(self, count: int, timeout: float = 180) -> list[dict[str, Any]]:
        """Wait until ``count`` jobs exist and none is pending, queued or running."""
        deadline = time.monotonic() + timeout
        jobs: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            try:
                jobs = self.client.get("/jobs").json()["items"]
            except httpx.TransportError:
                # a kept-alive connection the server closed as we reused it (seen on a machine
                # with a load average of 48): poll again
                time.sleep(0.5)
                continue
            if len(jobs) >= count and all(j["state"] in ("done", "failed") for j in jobs):
                return jobs
            time.sleep(0.5)
        raise TimeoutError(f"jobs not finished in {timeout} s: {jobs}\n{self.log_tail()}")

    def stop(self) -> None:
        for worker in self.workers:
            worker.stop()
        if self.server is not None:
            self.server.stop()
        self.client.close()

    def log_tail(self, lines: int = 120) -> str:
        parts = []
        for proc in [self.server, *self.workers]:
            if proc is not None:
                parts.append(f"--- {proc.name} ---\n{proc.log_tail(lines)}")
        return "\n".join(parts)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _dicom_answers(port: int, called_aet: str) -> bool:
    """The listener answers an association (C-ECHO; a rejection is an answer too).

    Not a bare TCP connect: that would hold one of the node's ``maximum_associations`` slots
    until the node's ACSE timeout ends it.
    """
    ae = AE(ae_title="READYPROBE")
    ae.add_requested_context(Verification)
    ae.acse_timeout = 5
    ae.network_timeout = 5
    assoc = ae.associate("127.0.0.1", port, ae_title=called_aet)
    if assoc.is_established:
        try:
            assoc.send_c_echo()
        finally:
            assoc.release()
        return True
    return bool(assoc.is_rejected)


def run_predict(files: list[Path], out: Path) -> list[dict[str, Any]]:
    """``breastcad predict --json`` as a user runs it."""
    import json

    done = subprocess.run(
        _breastcad("predict", "--json", "--out", str(out), *map(str, files)),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    if len(lines) != len(files):
        raise AssertionError(
            f"predict printed {len(lines)} lines for {len(files)} files:\n"
            f"{done.stdout}\n{done.stderr}"
        )
    return lines
