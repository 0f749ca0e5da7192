"""A private Orthanc PACS for tests: its own config, ports and storage in a temporary folder.

Usage::

    with OrthancServer(workdir=tmp_path / "orthanc") as pacs:
        storescu(files, "127.0.0.1", pacs.dicom_port, called_aet=pacs.aet)
        tags = pacs.wait_for_instances(lambda found: len(found) == len(files), timeout=30)

The config is a single JSON file passed as ``Orthanc CONFIG.json``. Orthanc then reads only
that file (Debian's service reads the directory ``/etc/orthanc/``, whose ``orthanc.json`` loads
every plugin in ``/usr/share/orthanc/plugins``); ``"Plugins": []`` makes "no plugins" explicit.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import httpx
import pytest

from support.ports import free_port

ORTHANC_ENV_VAR = "ORTHANC_BIN"
#: Debian's orthanc-dicomweb plugin (``apt-get install orthanc-dicomweb``)
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
_EXTRA_SEARCH_PATH = "/usr/sbin:/usr/local/sbin:/usr/bin:/usr/local/bin"

SimplifiedTags = dict[str, Any]


def orthanc_executable() -> str | None:
    """Path of the Orthanc binary ($ORTHANC_BIN, else PATH plus the sbin folders), or None."""
    configured = os.environ.get(ORTHANC_ENV_VAR)
    if configured:
        return configured if os.access(configured, os.X_OK) else None
    search = os.environ.get("PATH", "") + os.pathsep + _EXTRA_SEARCH_PATH
    return shutil.which("Orthanc", path=search)


def require_dicomweb_plugin() -> str:
    """The Orthanc DICOMweb plugin; ``pytest.skip`` with the reason when it is not installed."""
    require_orthanc()
    if not os.path.exists(DICOMWEB_PLUGIN):
        pytest.skip(
            f"Orthanc's DICOMweb plugin is not installed ({DICOMWEB_PLUGIN}; "
            "apt-get install -y orthanc-dicomweb)"
        )
    return DICOMWEB_PLUGIN


def require_orthanc() -> str:
    """The Orthanc binary; ``pytest.skip`` with the reason when it is not installed."""
    exe = orthanc_executable()
    if exe is None:
        pytest.skip(
            "Orthanc is not installed (apt-get install -y orthanc, or set $ORTHANC_BIN to the "
            "Orthanc executable)"
        )
    return exe


@dataclass(frozen=True)
class DicomModality:
    """A remote DICOM node Orthanc may send to (an entry of Orthanc's ``DicomModalities``)."""

    aet: str
    host: str
    port: int

    def as_config(self) -> list[str | int]:
        return [self.aet, self.host, self.port]


class OrthancStartError(RuntimeError):
    """Orthanc exited or did not answer REST in time; the message carries its log."""


class OrthancServer:
    """Run a private Orthanc on free loopback ports; a context manager.

    ``workdir`` holds ``orthanc.json``, ``orthanc.log`` and ``storage/``. When it is not given
    a temporary folder is made, removed by :meth:`stop` after a clean exit and kept (its path
    in the log message) when the ``with`` block raised.
    ``extra_config`` is merged over the generated config (e.g. ``{"UnknownSopClassAccepted":
    True}``). ``modalities`` become ``DicomModalities`` so :meth:`store_to` can send to them.
    """

    def __init__(
        self,
        *,
        aet: str = "ORTHANC",
        workdir: Path | None = None,
        modalities: Mapping[str, DicomModality] | None = None,
        extra_config: Mapping[str, Any] | None = None,
        start_timeout: float = 30.0,
        stop_timeout: float = 10.0,
        executable: str | None = None,
        dicomweb: bool = False,
    ) -> None:
        if not aet or len(aet) > 16:
            raise ValueError(f"AE title must be 1-16 characters, got {aet!r}")
        self.aet = aet
        self._given_workdir = workdir
        self._modalities = dict(modalities or {})
        self._extra_config = dict(extra_config or {})
        self._start_timeout = start_timeout
        self._stop_timeout = stop_timeout
        self._executable = executable
        self._dicomweb = dicomweb
        self._workdir: Path | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._client: httpx.Client | None = None
        self._log_handle: Any = None
        self.http_port = 0
        self.dicom_port = 0

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def workdir(self) -> Path:
        if self._workdir is None:
            raise RuntimeError("OrthancServer is not started")
        return self._workdir

    @property
    def log_path(self) -> Path:
        return self.workdir / "orthanc.log"

    @property
    def config_path(self) -> Path:
        return self.workdir / "orthanc.json"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        """The DICOMweb service root (only with ``dicomweb=True``)."""
        return f"{self.url}/dicom-web"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def config(self) -> dict[str, Any]:
        """The configuration written to ``orthanc.json`` for the current ports and folders."""
        storage = str(self.workdir / "storage")
        config: dict[str, Any] = {
            "Name": f"breastcad-test-{self.aet}",
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": self.aet,
            "StorageDirectory": storage,
            "IndexDirectory": storage,
            "Plugins": [],
            "LuaScripts": [],
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowStore": True,
            "DicomCheckModalityHost": False,
            "DicomModalities": {name: m.as_config() for name, m in self._modalities.items()},
            "OrthancExplorerEnabled": False,
            "WebDavEnabled": False,
            "HttpCompressionEnabled": False,
            "SaveJobs": False,
            "StorageCompression": False,
            "DicomScuTimeout": 30,
            "DicomScpTimeout": 30,
        }
        if self._dicomweb:
            config["Plugins"] = [DICOMWEB_PLUGIN]
            config["DicomWeb"] = {"Enable": True, "Root": "/dicom-web/"}
        config.update(self._extra_config)
        return config

    def start(self, attempts: int = 3) -> None:
        """Start Orthanc and wait until ``GET /system`` answers.

        Ports are picked with :func:`free_port`; if Orthanc exits during start-up (for
        example a port taken meanwhile) it is retried with new ports, ``attempts`` times.
        """
        if self._process is not None:
            raise RuntimeError("OrthancServer already started")
        exe = self._executable or orthanc_executable()
        if exe is None:
            raise FileNotFoundError("Orthanc executable not found (set $ORTHANC_BIN)")
        if self._given_workdir is not None:
            self._given_workdir.mkdir(parents=True, exist_ok=True)
            self._workdir = self._given_workdir
        else:
            self._workdir = Path(tempfile.mkdtemp(prefix="orthanc-"))
        last_error: OrthancStartError | None = None
        for _ in range(attempts):
            try:
                self._start_once(exe)
                return
            except OrthancStartError as exc:
                last_error = exc
                self._terminate()
                if "exited" not in str(exc):
                    break
        assert last_error is not None
        raise last_error

    def _start_once(self, exe: str) -> None:
        self.http_port = free_port()
        self.dicom_port = free_port()
        while self.dicom_port == self.http_port:
            self.dicom_port = free_port()
        self.config_path.write_text(json.dumps(self.config(), indent=2))
        self._log_handle = self.log_path.open("ab")
        self._log_handle.write(
            f"---- starting {exe} {self.config_path} (http {self.http_port}, "
            f"dicom {self.dicom_port})\n".encode()
        )
        self._log_handle.flush()
        self._process = subprocess.Popen(
            [exe, str(self.config_path)],
            cwd=self.workdir,
            stdin=subprocess.DEVNULL,
            stdout=self._log_handle,
            stderr=subprocess.STDOUT,
        )
        # trust_env=False: never route loopback requests through an HTTP(S)_PROXY.
        self._client = httpx.Client(base_url=self.url, timeout=10.0, trust_env=False)
        deadline = time.monotonic() + self._start_timeout
        while True:
            code = self._process.poll()
            if code is not None:
                raise OrthancStartError(
                    f"Orthanc exited with code {code} during start-up; log "
                    f"{self.log_path}:\n{self.log_tail()}"
                )
            try:
                if self._client.get("/system").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise OrthancStartError(
                    f"Orthanc did not answer GET /system within {self._start_timeout} s; "
                    f"log {self.log_path}:\n{self.log_tail()}"
                )
            time.sleep(0.1)

    def _terminate(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
        if self._process is not None:
            if self._process.poll() is None:
                self._process.terminate()
                try:
                    self._process.wait(timeout=self._stop_timeout)
                except subprocess.TimeoutExpired:
                    self._process.kill()
                    self._process.wait(timeout=self._stop_timeout)
            self._process = None
        if self._log_handle is not None:
            self._log_handle.close()
            self._log_handle = None

    def stop(self, *, remove_workdir: bool | None = None) -> None:
        """Terminate Orthanc (SIGTERM, then SIGKILL after ``stop_timeout``). Idempotent.

        ``remove_workdir`` defaults to True only for a temporary folder this object made.
        """
        self._terminate()
        if remove_workdir is None:
            remove_workdir = self._given_workdir is None
        if remove_workdir and self._workdir is not None and self._workdir.exists():
            shutil.rmtree(self._workdir)
            self._workdir = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # Keep the folder (and its log) for inspection when the block failed.
        self.stop(remove_workdir=None if exc_type is None else False)

    def log_text(self) -> str:
        """The whole Orthanc log so far ("" before start)."""
        if self._workdir is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    # -- REST ------------------------------------------------------------------------------

    @property
    def client(self) -> httpx.Client:
        if self._client is None:
            raise RuntimeError("OrthancServer is not started")
        return self._client

    def get_json(self, path: str) -> Any:
        response = self.client.get(path)
        response.raise_for_status()
        return response.json()

    def post_json(self, path: str, body: Any, *, timeout: float | None = None) -> Any:
        response = self.client.post(
            path, json=body, timeout=timeout if timeout is not None else self.client.timeout
        )
        response.raise_for_status()
        return response.json()

    def system(self) -> dict[str, Any]:
        result: dict[str, Any] = self.get_json("/system")
        return result

    def statistics(self) -> dict[str, Any]:
        result: dict[str, Any] = self.get_json("/statistics")
        return result

    def instances(self) -> list[str]:
        """Orthanc identifiers of every stored instance."""
        result: list[str] = self.get_json("/instances")
        return result

    def instance_tags(self, instance_id: str) -> SimplifiedTags:
        """``/instances/{id}/simplified-tags``: keyword -> value (sequences are lists of dicts)."""
        result: SimplifiedTags = self.get_json(f"/instances/{instance_id}/simplified-tags")
        return result

    def instance_file(self, instance_id: str) -> bytes:
        """The stored DICOM Part 10 file, byte for byte as received."""
        response = self.client.get(f"/instances/{instance_id}/file")
        response.raise_for_status()
        return response.content

    def all_instance_tags(self) -> list[SimplifiedTags]:
        """Simplified tags of every instance; each dict also carries ``"OrthancID"``."""
        found: list[SimplifiedTags] = []
        for instance_id in self.instances():
            try:
                tags = self.instance_tags(instance_id)
            except httpx.HTTPStatusError as exc:
                if exc.response.status_code == 404:  # deleted meanwhile
                    continue
                raise
            tags["OrthancID"] = instance_id
            found.append(tags)
        return found

    def wait_for_instances(
        self,
        predicate: Callable[[list[SimplifiedTags]], bool],
        timeout: float = 30.0,
        interval: float = 0.2,
    ) -> list[SimplifiedTags]:
        """Poll until ``predicate(all_instance_tags())`` is true; return that list.

        Raises TimeoutError naming the SOPInstanceUIDs/Modalities present at the deadline.
        """
        deadline = time.monotonic() + timeout
        while True:
            found = self.all_instance_tags()
            if predicate(found):
                return found
            if time.monotonic() > deadline:
                summary = [
                    (t.get("Modality"), t.get("SOPClassUID"), t.get("SOPInstanceUID"))
                    for t in found
                ]
                raise TimeoutError(
                    f"Orthanc {self.aet}: condition not met within {timeout} s; "
                    f"{len(found)} instance(s) present (Modality, SOPClassUID, "
                    f"SOPInstanceUID): {summary}"
                )
            time.sleep(interval)

    def find(
        self,
        modality: str | None = None,
        series_instance_uid: str | None = None,
        study_instance_uid: str | None = None,
        sop_instance_uid: str | None = None,
    ) -> list[str]:
        """Orthanc IDs of the instances matching all given attributes (``POST /tools/find``)."""
        query: dict[str, str] = {}
        if modality is not None:
            query["Modality"] = modality
        if series_instance_uid is not None:
            query["SeriesInstanceUID"] = series_instance_uid
        if study_instance_uid is not None:
            query["StudyInstanceUID"] = study_instance_uid
        if sop_instance_uid is not None:
            query["SOPInstanceUID"] = sop_instance_uid
        if not query:
            return self.instances()
        result: list[str] = self.post_json(
            "/tools/find", {"Level": "Instance", "Query": query, "Expand": False}
        )
        return result

    def upload(self, data: bytes) -> dict[str, Any]:
        """Store a DICOM file through REST (``POST /instances``), bypassing DICOM networking."""
        response = self.client.post(
            "/instances", content=data, headers={"Content-Type": "application/dicom"}
        )
        response.raise_for_status()
        result: dict[str, Any] = response.json()
        return result

    def store_to(
        self, modality: str, resources: Sequence[str], *, timeout: float = 120.0
    ) -> dict[str, Any]:
        """C-STORE the given Orthanc resources to a configured modality (synchronous job)."""
        result: dict[str, Any] = self.post_json(
            f"/modalities/{modality}/store",
            {"Resources": list(resources), "Synchronous": True},
            timeout=timeout,
        )
        return result

    def clear(self) -> None:
        """Delete every stored patient (and so every instance)."""
        for patient_id in self.get_json("/patients"):
            response = self.client.delete(f"/patients/{patient_id}")
            if response.status_code != 404:
                response.raise_for_status()
