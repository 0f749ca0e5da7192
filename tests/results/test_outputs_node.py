"""Outputs of a real node (``breastcad serve`` subprocess, real BUSI study, dcmtk storescu):
objects per destination (two dcmtk ``storescp`` peers), the FHIR push to a real HTTP server
(started here: it is the peer, answering 503 once, then 201), the audit trail, JSON logs and the
/metrics counters.
"""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from node_process import Node
from prometheus_client.parser import text_string_to_metric_families
from pydicom import dcmread
from support.dcmtk import dciodvfy, require_tool, storescu
from support.dicom_factory import make_us_series
from support.shared_data import busi_png_paths

pytestmark = pytest.mark.e2e

TOKEN = "s3cret-token"
PATIENT_ID = "OUT-PATIENT-4711"
SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"


@dataclass
class FhirPeer:
    """A small FHIR-ish server: stores POSTed DiagnosticReports; the first POST gets 503."""

    posts: list[dict[str, Any]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    fail_first: int = 1

    def handler(self) -> type[BaseHTTPRequestHandler]:
        peer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                peer.headers.append(dict(self.headers.items()))
                if self.path != "/fhir/DiagnosticReport":
                    self.send_response(404)
                    self.end_headers()
                    return
                if self.headers.get("Authorization") != f"Bearer {TOKEN}":
                    self.send_response(401)
                    self.end_headers()
                    return
                if peer.fail_first > 0:
                    peer.fail_first -= 1
                    self.send_response(503)
                    self.end_headers()
                    self.wfile.write(b"busy, try later")
                    return
                peer.posts.append(json.loads(body))
                self.send_response(201)
                self.send_header("Location", f"/fhir/DiagnosticReport/{len(peer.posts)}/_history/1")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        return Handler


@dataclass
class Outputs:
    node: Node
    archive: Path
    viewer: Path
    fhir: FhirPeer
    study_uid: str
    source: Path
    metrics_before: dict[str, float]


def _metrics(node: Node) -> dict[str, float]:
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(node.client.get("/metrics").text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            values[f"{sample.name}{{{labels}}}"] = sample.value
    return values


def _held_port() -> socket.socket:
    """A socket bound to a free loopback port (not listening): the port is ours until closed."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    return sock


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _wait(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def outputs(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Outputs]:
    require_tool("storescu")
    storescp = require_tool("storescp")
    work = tmp_path_factory.mktemp("outputs")
    [source] = make_us_series(busi_png_paths(shared_data, "malignant")[:1], work / "src",
                              patient_id=PATIENT_ID, laterality="R")
    study_uid = str(dcmread(source, stop_before_pixels=True).StudyInstanceUID)
    peers: list[subprocess.Popen[bytes]] = []
    folders: dict[str, Path] = {}
    # the peers' ports stay bound until the node has picked its own: no two servers share one
    held = {name: _held_port() for name in ("archive", "viewer")}
    ports = {name: sock.getsockname()[1] for name, sock in held.items()}
    fhir = FhirPeer()
    http = ThreadingHTTPServer(("127.0.0.1", 0), fhir.handler())
    threading.Thread(target=http.serve_forever, daemon=True).start()
    node = Node(
        work / "node",
        pacs_port=ports["archive"],
        extra={
            "log_format": "json",
            "destinations": {
                "archive": {"host": "127.0.0.1", "port": ports["archive"],
                            "ae_title": "ARCHIVE", "objects": ["sr"]},
                "viewer": {"host": "127.0.0.1", "port": ports["viewer"],
                           "ae_title": "VIEWER", "objects": ["sr", "sc", "seg"]},
            },
            "routes": [{"send_to": ["archive", "viewer"]}],
            "fhir_endpoint": {"url": f"http://127.0.0.1:{http.server_port}/fhir",
                              "bearer_token": TOKEN},
            "delivery_backoff_seconds": 0.3,
        },
    )
    for name, sock in held.items():
        folders[name] = work / name
        folders[name].mkdir()
        sock.close()
        peers.append(subprocess.Popen(
            [storescp, "-aet", name.upper(), "-od", str(folders[name]), str(ports[name])],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        ))
        _wait(lambda port=ports[name]: _listening(port), 30, f"storescp on {ports[name]}")
    try:
        node.start()
        before = _metrics(node)
        sent = storescu([source], "127.0.0.1", node.dicom_port, calling_aet="MODALITY1")
        assert sent.returncode == 0, sent.stderr
        jobs = node.wait_for_jobs(1, timeout=240)
        assert [j["state"] for j in jobs] == ["done"], jobs
        _wait(lambda: len(node.client.get("/deliveries").json()["items"]) == 3
              and all(d["state"] in ("done", "failed")
                      for d in node.client.get("/deliveries").json()["items"]),
              90, "the deliveries")
        yield Outputs(node, folders["archive"], folders["viewer"], fhir, study_uid, source,
                      before)
    except AssertionError:
        print(node.log_tail())
        raise
    finally:
        node.stop()
        http.shutdown()
        for peer in peers:
            peer.terminate()
            peer.wait(10)


def _received(folder: Path) -> dict[str, list[Path]]:
    kinds: dict[str, list[Path]] = {}
    for path in sorted(folder.iterdir()):
        kinds.setdefault(str(dcmread(path, stop_before_pixels=True).Modality), []).append(path)
    return kinds


def test_each_destination_gets_the_objects_it_asked_for(outputs: Outputs) -> None:
    require_tool("dciodvfy")
    assert set(_received(outputs.archive)) == {"SR"}
    viewer = _received(outputs.viewer)
    assert {k: len(v) for k, v in viewer.items()} == {"SR": 1, "OT": 1, "SEG": 1}
    [seg_path] = viewer["SEG"]
    seg = dcmread(seg_path)
    assert seg.SOPClassUID == SEG_STORAGE
    assert seg.SegmentationType == "FRACTIONAL"
    assert seg.StudyInstanceUID == outputs.study_uid
    source = dcmread(outputs.source, stop_before_pixels=True)
    assert (seg.Rows, seg.Columns) == (source.Rows, source.Columns)
    referenced = seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0]
    assert referenced.ReferencedSOPInstanceUID == source.SOPInstanceUID
    verdict = dciodvfy(seg_path)
    assert not verdict.errors, verdict.output
    # the same SR went to both
    [archive_sr] = _received(outputs.archive)["SR"]
    assert dcmread(archive_sr).SOPInstanceUID == dcmread(viewer["SR"][0]).SOPInstanceUID


def test_fhir_push_retries_and_delivers_a_valid_report(outputs: Outputs) -> None:
    node = outputs.node
    [fhir_delivery] = [d for d in node.client.get("/deliveries").json()["items"]
                       if d["destination"] == "@fhir"]
    assert fhir_delivery["state"] == "done"
    attempts = node.client.get(f"/deliveries/{fhir_delivery['id']}").json()["attempt_log"]
    assert [a["ok"] for a in attempts] == [False, True]
    assert "HTTP 503" in attempts[0]["error"]
    [posted] = outputs.fhir.posts
    assert "id" not in posted
    report = DiagnosticReport.model_validate(posted)
    assert report.status == "final"
    assert "Observation" in {c["resourceType"] for c in posted["contained"]}
    assert report.contained
    assert posted["imagingStudy"][0]["identifier"]["value"] == f"urn:oid:{outputs.study_uid}"
    served = node.client.get(f"/fhir/DiagnosticReport/{fhir_delivery['result_id']}").json()
    assert posted["conclusion"] == served["conclusion"]
    assert posted["identifier"] == served["identifier"]
    headers = outputs.fhir.headers[-1]
    assert headers["Content-Type"].startswith("application/fhir+json")
    assert headers["If-None-Exist"].endswith(served["identifier"][0]["value"])


def test_audit_records_the_association_its_study_and_an_api_retry(outputs: Outputs) -> None:
    node = outputs.node
    events = node.client.get("/audit").json()["items"]
    [association] = [e for e in events if e["action"] == "association"]
    assert association["actor_kind"] == "dicom"
    assert association["actor"].startswith("MODALITY1@127.0.0.1")
    assert association["ok"] is True
    assert association["detail"]["stored"] == 1
    assert association["detail"]["studies"] == [outputs.study_uid]
    [store] = node.client.get("/audit", params={"study": outputs.study_uid,
                                                "action": "c-store"}).json()["items"]
    assert store["detail"]["instances"] == 1
    assert store["actor"] == association["actor"]

    # an API action: retrying a delivery that is done is refused (409), and still audited
    [done] = [d for d in node.client.get("/deliveries").json()["items"]
              if d["destination"] == "archive"]
    assert node.client.post(f"/deliveries/{done['id']}/retry").status_code == 409
    [api] = node.client.get("/audit", params={"action": "api-post"}).json()["items"]
    assert api["actor_kind"] == "api" and api["actor"] == "127.0.0.1"
    assert api["ok"] is False
    assert api["detail"] == {"path": f"/deliveries/{done['id']}/retry", "status": 409}
    assert node.client.get("/audit", params={"since": "not a time"}).status_code == 422
    # no patient identifier anywhere in the audit trail
    assert PATIENT_ID not in json.dumps(node.client.get("/audit").json())


def test_logs_are_json_lines_with_uids_and_no_patient_id(outputs: Outputs) -> None:
    text = (outputs.node.workdir / "serve.log").read_text()
    assert PATIENT_ID not in text
    lines = [line for line in text.splitlines() if line.strip()]
    records = []
    not_json = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            not_json.append(line)
    assert not_json == [], not_json[:5]
    assert {"time", "level", "logger", "message"} <= set(records[0])
    series_uid = str(dcmread(outputs.source, stop_before_pixels=True).SeriesInstanceUID)
    assert any(series_uid in r.get("uids", []) for r in records), "no record names the series"


def test_metrics_counters_moved(outputs: Outputs) -> None:
    after = _metrics(outputs.node)
    before = outputs.metrics_before

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    assert delta("breastcad_instances_received_total{modality=US}") == 1
    assert delta("breastcad_series_completed_total{}") == 1
    assert delta("breastcad_inference_seconds_count{}") == 1
    assert delta("breastcad_delivery_attempts_total{destination=viewer}") == 1
    assert delta("breastcad_delivery_attempts_total{destination=@fhir}") == 2
    assert delta("breastcad_delivery_failures_total{destination=@fhir}") == 1
    assert after["breastcad_jobs{state=done}"] == 1
