"""Results hospitals use, through a real node: routing by probability to a second destination
(dcmtk storescp) with the source images, the worklist, FHIR DiagnosticReports, /metrics.

Which BUSI images look malignant or normal is asked of the bundled model (``breastcad predict
--json``) inside the test, and the thresholds are set between what it says, so the test holds
for any model version that separates at least one malignant image from one normal image.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from node_process import REPO, Node, run_predict
from prometheus_client.parser import text_string_to_metric_families
from pydicom import dcmread
from support.dcmtk import dciodvfy, dsrdump, require_tool, storescu
from support.dicom_factory import make_us_series
from support.orthanc import OrthancServer
from support.ports import free_port
from support.shared_data import busi_png_paths

pytestmark = pytest.mark.e2e

CANDIDATES = 6  # BUSI images per class asked of the model
PRIORITY_CODE = "260870009"
HIGH, NORMAL = "394849002", "394848005"


@dataclass
class Case:
    name: str
    file: Path
    study_uid: str
    patient_id: str
    malignant: float  # p(malignant) per `breastcad predict`
    label: str


@dataclass
class Setup:
    node: Node
    orthanc: OrthancServer
    received: Path  # storescp's folder (the reading station)
    threshold: float
    cases: dict[str, Case]  # "malignant", "benign", "normal"


def _wait(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def _pick_cases(shared_data: Path, work: Path) -> tuple[dict[str, Case], float]:
    files: dict[Path, tuple[str, str]] = {}
    for label in ("malignant", "normal", "benign"):
        count = CANDIDATES if label != "benign" else 1
        for index, png in enumerate(busi_png_paths(shared_data, label)[:count]):
            patient = f"RT-{label[:3].upper()}-{index}"
            [path] = make_us_series([png], work / f"{label}-{index}", patient_id=patient)
            files[path] = (label, patient)
    lines = run_predict(list(files), work / "predict")
    scored = [(Path(line["file"]), line) for line in lines]

    def case(name: str, path: Path, line: dict[str, Any]) -> Case:
        ds = dcmread(path, stop_before_pixels=True)
        return Case(name, path, str(ds.StudyInstanceUID), files[path][1],
                    float(line["probabilities"]["malignant"]), str(line["label"]))

    malignant = max((s for s in scored if files[s[0]][0] == "malignant"),
                    key=lambda s: s[1]["probabilities"]["malignant"])
    normal = min((s for s in scored if files[s[0]][0] == "normal"),
                 key=lambda s: s[1]["probabilities"]["malignant"])
    [benign] = [s for s in scored if files[s[0]][0] == "benign"]
    cases = {
        "malignant": case("malignant", *malignant),
        "normal": case("normal", *normal),
        "benign": case("benign", *benign),
    }
    high, low = cases["malignant"].malignant, cases["normal"].malignant
    assert high - low > 0.05, f"the model does not separate the candidates: {high} vs {low}"
    return cases, (high + low) / 2


@pytest.fixture(scope="module")
def setup(
    shared_data: Path, orthanc_module: OrthancServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Setup]:
    require_tool("storescu")
    storescp = require_tool("storescp")
    require_tool("dciodvfy")
    orthanc_module.clear()
    work = tmp_path_factory.mktemp("results-node")
    cases, threshold = _pick_cases(shared_data, work / "src")
    reading_port = free_port()
    received = work / "reading"
    received.mkdir()
    reading = subprocess.Popen(
        [storescp, "-aet", "READING", "-od", str(received), str(reading_port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    node = Node(
        work / "node",
        pacs_port=orthanc_module.dicom_port,
        extra={
            "destinations": {
                "pacs": {"host": "127.0.0.1", "port": orthanc_module.dicom_port,
                         "ae_title": "ORTHANC"},
                "reading": {"host": "127.0.0.1", "port": reading_port, "ae_title": "READING"},
            },
            "routes": [
                {"send_to": ["pacs"]},
                {
                    "when": {"modality": "US", "probability_at_least": {"malignant": threshold}},
                    "send_to": ["reading"],
                    "forward_source": True,
                },
            ],
            "priority_threshold": threshold,
        },
    )
    try:
        node.start()
        # the normal study arrives first: the worklist must not simply follow arrival
        for name in ("normal", "benign", "malignant"):
            sent = storescu([cases[name].file], "127.0.0.1", node.dicom_port)
            assert sent.returncode == 0, sent.stderr
            time.sleep(0.2)
        jobs = node.wait_for_jobs(3, timeout=240)
        assert all(j["state"] == "done" for j in jobs), jobs
        _wait(
            lambda: all(
                d["state"] in ("done", "failed")
                for d in node.client.get("/deliveries").json()["items"]
            ),
            90,
            "the deliveries",
        )
        yield Setup(node, orthanc_module, received, threshold, cases)
    except AssertionError:
        print(node.log_tail())
        raise
    finally:
        node.stop()
        reading.terminate()
        reading.wait(10)


def _results(setup: Setup, name: str) -> list[dict[str, Any]]:
    study = setup.node.client.get(f"/studies/{setup.cases[name].study_uid}").json()
    return [r for s in study["series"] for r in s["results"]]


def test_routing_sends_the_suspicious_study_with_its_sources_to_the_reading_station(
    setup: Setup,
) -> None:
    [malignant] = _results(setup, "malignant")
    [normal] = _results(setup, "normal")
    assert malignant["probabilities"]["malignant"] >= setup.threshold
    assert normal["probabilities"]["malignant"] < setup.threshold
    by_destination = {d["destination"]: d for d in malignant["deliveries"]}
    assert set(by_destination) == {"pacs", "reading"}
    assert by_destination["reading"]["forward_source"] is True
    assert by_destination["pacs"]["forward_source"] is False
    assert all(d["state"] == "done" for d in by_destination.values()), by_destination
    assert [d["destination"] for d in normal["deliveries"]] == ["pacs"]

    # the reading station got the suspicious study's SR, SC and source image, nothing else
    arrived = [dcmread(p) for p in sorted(setup.received.iterdir())]
    assert {str(ds.StudyInstanceUID) for ds in arrived} == {setup.cases["malignant"].study_uid}
    assert sorted(str(ds.Modality) for ds in arrived) == ["OT", "SR", "US"]
    [source] = [ds for ds in arrived if ds.Modality == "US"]
    original = dcmread(setup.cases["malignant"].file)
    assert source.SOPInstanceUID == original.SOPInstanceUID
    assert source.PixelData == original.PixelData  # forwarded as received
    for path in sorted(setup.received.iterdir()):
        if path.name.startswith(("SR", "SC")):
            assert not dciodvfy(path).errors, path.name

    # the archive (Orthanc) got every result
    srs = {r["sr_sop_instance_uid"] for n in setup.cases for r in _results(setup, n)}
    setup.orthanc.wait_for_instances(
        lambda tags: srs <= {t.get("SOPInstanceUID") for t in tags}, timeout=60
    )

    # `breastcad routes test` says the same for the same results
    config = setup.node.config_path
    for result, expected in ((malignant, ["pacs", "reading"]), (normal, ["pacs"])):
        facts = {"modality": "US", "label": result["label"],
                 "probabilities": result["probabilities"]}
        done = subprocess.run(
            [sys.executable, "-m", "dicom_node.cli", "routes", "test", str(config), "--json",
             "--result", json.dumps(facts)],
            cwd=REPO, capture_output=True, text=True, timeout=60,
        )
        assert done.returncode == 0, done.stderr
        decision = json.loads(done.stdout)
        assert [d["name"] for d in decision["destinations"]] == expected
        assert [d["forward_source"] for d in decision["destinations"]] == [
            name == "reading" for name in expected
        ]
    human = subprocess.run(
        [sys.executable, "-m", "dicom_node.cli", "routes", "test", str(config), "--result",
         json.dumps({"modality": "US", "probabilities": malignant["probabilities"]})],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )
    assert "destinations: pacs, reading (with sources)" in human.stdout, human.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "dicom_node.cli", "routes", "test", str(config), "--result",
         "{not json"],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )
    assert bad.returncode == 2 and "not valid JSON" in bad.stderr


def test_priority_is_flagged_and_written_into_the_sr(setup: Setup, tmp_path: Path) -> None:
    require_tool("dsrdump")
    for name, priority in (("malignant", True), ("normal", False)):
        [result] = _results(setup, name)
        assert result["priority"] is priority
        assert result["suspicion"] == pytest.approx(result["probabilities"]["malignant"])
        response = setup.node.client.get(result["sr"])
        assert response.status_code == 200
        path = tmp_path / f"{name}.dcm"
        path.write_bytes(response.content)
        assert not dciodvfy(path).errors
        rendered = dsrdump(path)
        assert rendered.returncode == 0
        assert ("High priority" if priority else "Normal priority") in rendered.stdout
        found: dict[str, str] = {}

        def walk(items: Any, found: dict[str, str] = found) -> None:
            for item in items:
                if item.get("ValueType") == "CODE":
                    found[item.ConceptNameCodeSequence[0].CodeValue] = (
                        item.ConceptCodeSequence[0].CodeValue
                    )
                walk(item.get("ContentSequence", []))

        walk(dcmread(path).ContentSequence)
        assert found[PRIORITY_CODE] == (HIGH if priority else NORMAL)


def test_worklist_orders_by_suspicion_and_filters(setup: Setup) -> None:
    client = setup.node.client
    items = client.get("/worklist").json()["items"]
    assert len(items) == 3
    suspicions = [item["suspicion"] for item in items]
    assert suspicions == sorted(suspicions, reverse=True)
    assert items[0]["study_instance_uid"] == setup.cases["malignant"].study_uid
    assert items[-1]["study_instance_uid"] == setup.cases["normal"].study_uid
    for item in items:
        case = next(c for c in setup.cases.values() if c.study_uid == item["study_instance_uid"])
        assert item["suspicion"] == pytest.approx(case.malignant, abs=1e-4)
        assert item["label"] == case.label
        assert item["priority"] is (case.malignant >= setup.threshold)
        assert item["modality"] == "US" and item["state"] == "done"
        assert item["accession_number"] and len(item["study_date"]) == 8
        [heatmap] = item["heatmaps"]
        assert client.get(heatmap).content[:4] == b"\x89PNG"
    date = items[0]["study_date"]
    assert len(client.get("/worklist", params={"date_from": date, "date_to": date})
               .json()["items"]) == 3
    assert client.get("/worklist", params={"date_to": "19991231"}).json()["items"] == []
    assert client.get("/worklist", params={"modality": "MG"}).json()["items"] == []
    assert len(client.get("/worklist", params={"modality": "us"}).json()["items"]) == 3
    assert len(client.get("/worklist", params={"state": "done"}).json()["items"]) == 3
    assert client.get("/worklist", params={"state": "failed"}).json()["items"] == []
    flagged = client.get("/worklist", params={"priority": "true"}).json()["items"]
    assert setup.cases["malignant"].study_uid in {i["study_instance_uid"] for i in flagged}
    assert client.get("/worklist", params={"date_from": "2026-13"}).status_code == 422
    assert client.get("/worklist", params={"state": "bogus"}).status_code == 422


def test_fhir_diagnostic_reports_validate_as_r4(setup: Setup) -> None:
    client = setup.node.client
    case = setup.cases["malignant"]
    [result] = _results(setup, "malignant")
    response = client.get(f"/fhir/DiagnosticReport/{result['id']}")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/fhir+json")
    report: dict[str, Any] = response.json()
    DiagnosticReport.model_validate(report)  # raises unless valid R4 (fhir.resources R4B)
    assert report["status"] == "final"
    assert report["imagingStudy"][0]["identifier"]["value"] == f"urn:oid:{case.study_uid}"
    assert report["subject"]["identifier"]["value"] == case.patient_id
    assert report["identifier"][0]["value"] == f"urn:oid:{result['sr_sop_instance_uid']}"
    [sr_form, heatmap_form] = report["presentedForm"]
    assert sr_form["contentType"] == "application/dicom"
    sr = client.get(sr_form["url"])
    assert dcmread(io.BytesIO(sr.content)).SOPInstanceUID == result["sr_sop_instance_uid"]
    assert heatmap_form["contentType"] == "image/png"
    assert client.get(heatmap_form["url"]).content[:4] == b"\x89PNG"
    contained = {r["id"]: r for r in report["contained"]}
    assert contained["algorithm"]["resourceType"] == "Device"
    assert contained["algorithm"]["version"][0]["value"] == result["model"]["version"]
    assert contained["algorithm"]["identifier"][0]["value"] == result["model"]["sha256"]
    finding = contained["finding"]
    assert finding["valueCodeableConcept"]["coding"][0]["code"] == {
        "malignant": "254837009", "benign": "92115009", "normal": "111287"
    }[result["label"]]
    assert finding["device"] == {"reference": "#algorithm"}
    for label, p in result["probabilities"].items():
        assert contained[f"p-{label}"]["valueQuantity"]["value"] == pytest.approx(p, abs=1e-5)
    assert contained["priority"]["valueCodeableConcept"]["coding"][0]["code"] == HIGH
    assert {r["reference"] for r in report["result"]} == {
        f"#{k}" for k in contained if k != "algorithm"
    }

    search = client.get("/fhir/DiagnosticReport",
                        params={"patient": case.patient_id, "study": case.study_uid})
    bundle = search.json()
    Bundle.model_validate(bundle)
    assert bundle["type"] == "searchset" and bundle["total"] == 1
    assert bundle["entry"][0]["resource"]["id"] == str(result["id"])
    everyone = client.get("/fhir/DiagnosticReport").json()
    Bundle.model_validate(everyone)
    assert everyone["total"] == 3
    by_reference = client.get("/fhir/DiagnosticReport",
                              params={"patient": f"Patient/{case.patient_id}"}).json()
    assert by_reference["total"] == 1
    nobody = client.get("/fhir/DiagnosticReport", params={"patient": "nobody"}).json()
    Bundle.model_validate(nobody)
    assert nobody["total"] == 0
    missing = client.get("/fhir/DiagnosticReport/99999")
    assert missing.status_code == 404
    assert missing.json()["resourceType"] == "OperationOutcome"


def test_metrics_count_what_happened(setup: Setup) -> None:
    text = setup.node.client.get("/metrics").text
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    assert samples[("breastcad_instances_received_total", (("modality", "US"),))] == 3
    assert samples[("breastcad_series_completed_total", ())] == 3
    assert samples[("breastcad_jobs", (("state", "done"),))] == 3
    assert samples[("breastcad_jobs", (("state", "failed"),))] == 0
    assert samples[("breastcad_inference_seconds_count", ())] == 3
    assert samples[("breastcad_inference_seconds_sum", ())] > 0
    assert samples[("breastcad_delivery_attempts_total", (("destination", "pacs"),))] == 3
    assert samples[("breastcad_delivery_attempts_total", (("destination", "reading"),))] == 1
    assert samples[("breastcad_delivery_failures_total", (("destination", "pacs"),))] == 0
    assert samples[("breastcad_queue_depth", (("source", "db"),))] == 0
    assert samples[("breastcad_queue_depth", (("source", "broker"),))] == 0
    assert samples[("breastcad_priority_results_total", ())] >= 1
    config = yaml.safe_load(setup.node.config_path.read_text())
    assert config["priority_threshold"] == pytest.approx(setup.threshold)
