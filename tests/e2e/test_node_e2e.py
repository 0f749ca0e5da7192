"""The node end to end: storescu -> breastcad serve (subprocess) -> SR + SC in a real Orthanc.

Embedded layout (in-memory broker, worker thread, SQLite) and distributed layout (the Redis on
127.0.0.1:6379, PostgreSQL on 127.0.0.1:5432, separate ``breastcad worker`` processes).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from node_process import Node, run_predict
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from support.dcmtk import dciodvfy, require_tool, store_responses, storescu
from support.dicom_factory import make_us_series
from support.orthanc import OrthancServer
from support.shared_data import busi_png_paths

pytestmark = pytest.mark.e2e

SR_FINDING = "121071"  # DCM "Finding"
FINDING_CODES = {"malignant": "254837009", "benign": "92115009", "normal": "111287"}
SC_STORAGE = "1.2.840.10008.5.1.4.1.1.7"
# Several checkouts may run this suite at once against the one Redis: each picks its own db.
REDIS_URL = f"redis://127.0.0.1:6379/{os.environ.get('BREASTCAD_TEST_REDIS_DB', '9')}"


@dataclass
class Sources:
    files: list[Path]
    # SeriesInstanceUID -> (StudyInstanceUID, [SOPInstanceUID])
    series: dict[str, tuple[str, list[str]]] = field(default_factory=dict)
    file_of: dict[str, Path] = field(default_factory=dict)


def _sources(shared_data: Path, tmp_path: Path, busi_count: int = 3) -> Sources:
    samples = sorted((shared_data / "dicom-samples" / "US").glob("*.dcm"))
    assert samples, "no US samples in shared data"
    # examples_palette.dcm and OBXXXX1A_rle_2frame.dcm share one SOPInstanceUID (under different
    # SOP classes); the node, like Orthanc, would keep the first. Give the RLE one its own UIDs,
    # keeping its encapsulated pixels as they are.
    for index, path in enumerate(samples):
        if path.name == "OBXXXX1A_rle_2frame.dcm":
            ds = dcmread(path)
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            ds.SeriesInstanceUID = generate_uid()
            samples[index] = tmp_path / path.name
            ds.save_as(samples[index], enforce_file_format=True)
    wrapped: list[Path] = []
    malignant = busi_png_paths(shared_data, "malignant")[:2]
    benign = busi_png_paths(shared_data, "benign")[:1]
    normal = busi_png_paths(shared_data, "normal")[:1]
    # one series of two images, then single-image series
    wrapped += make_us_series(malignant[:2], tmp_path / "busi-a", patient_id="BUSI-A")
    if busi_count > 2:
        wrapped += make_us_series(benign, tmp_path / "busi-b", patient_id="BUSI-B")
        wrapped += make_us_series(normal, tmp_path / "busi-c", patient_id="BUSI-C")
    out = Sources(files=samples + wrapped)
    for path in out.files:
        ds = dcmread(path, stop_before_pixels=True)
        study, sops = out.series.setdefault(
            str(ds.SeriesInstanceUID), (str(ds.StudyInstanceUID), [])
        )
        sops.append(str(ds.SOPInstanceUID))
        out.file_of[str(ds.SOPInstanceUID)] = path
    return out


def _findings(ds: Dataset) -> list[str]:
    found: list[str] = []

    def walk(items: Any) -> None:
        for item in items:
            if (
                item.get("ValueType") == "CODE"
                and item.ConceptNameCodeSequence[0].CodeValue == SR_FINDING
            ):
                found.append(str(item.ConceptCodeSequence[0].CodeValue))
            if "ContentSequence" in item:
                walk(item.ContentSequence)

    walk(ds.ContentSequence)
    return found


def _series_result(node: Node, study_uid: str, series_uid: str) -> dict[str, Any]:
    study = node.client.get(f"/studies/{study_uid}").json()
    [entry] = [s for s in study["series"] if s["series_instance_uid"] == series_uid]
    assert entry["job_state"] == "done", entry["jobs"]
    assert entry["results"], entry
    return dict(entry["results"][-1])


def _send_and_check(node: Node, orthanc: OrthancServer, sources: Sources, tmp_path: Path) -> None:
    sent = storescu(sources.files, "127.0.0.1", node.dicom_port, called_aet="BREASTCAD")
    assert sent.returncode == 0, sent.stderr
    responses = store_responses(sent)
    assert responses and all(r == "Success" for r in responses), responses

    jobs = node.wait_for_jobs(len(sources.series), timeout=240)
    assert all(j["state"] == "done" for j in jobs), jobs

    predicted = {
        Path(line["file"]): line for line in run_predict(sources.files, tmp_path / "predict")
    }
    expected_sr: dict[str, tuple[str, dict[str, Any]]] = {}
    for series_uid, (study_uid, sops) in sources.series.items():
        result = _series_result(node, study_uid, series_uid)
        # every image's label in the node equals what `breastcad predict` says for its file
        per_image = {p["sop_instance_uid"]: p for p in result["per_image"]}
        assert set(per_image) == set(sops)
        for sop in sops:
            line = predicted[sources.file_of[sop]]
            assert per_image[sop]["label"] == line["label"], (sop, per_image[sop], line)
            for label, p in line["probabilities"].items():
                assert abs(per_image[sop]["probabilities"][label] - p) < 1e-4
        if len(sops) == 1:
            assert result["label"] == predicted[sources.file_of[sops[0]]]["label"]
        expected_sr[result["sr_sop_instance_uid"]] = (study_uid, result)
        heatmap = node.client.get(result["heatmaps"][0])
        assert heatmap.status_code == 200 and heatmap.content[:8] == b"\x89PNG\r\n\x1a\n"

    source_count = {study: 0 for study, _ in sources.series.values()}
    for study, sops in sources.series.values():
        source_count[study] += len(sops)

    def arrived(tags: list[dict[str, Any]]) -> bool:
        srs = {t.get("SOPInstanceUID") for t in tags if t.get("Modality") == "SR"}
        if not set(expected_sr) <= srs:
            return False
        for study, count in source_count.items():
            scs = [
                t
                for t in tags
                if t.get("StudyInstanceUID") == study and t.get("SOPClassUID") == SC_STORAGE
            ]
            if len(scs) < count:
                return False
        return True

    tags = orthanc.wait_for_instances(arrived, timeout=120)
    outdir = tmp_path / "from-pacs"
    outdir.mkdir()
    for tag in tags:
        if tag.get("Modality") != "SR" and tag.get("SOPClassUID") != SC_STORAGE:
            continue
        path = outdir / f"{tag['SOPInstanceUID']}.dcm"
        path.write_bytes(orthanc.instance_file(tag["OrthancID"]))
        check = dciodvfy(path)
        assert not check.errors, (path.name, check.errors)
        ds = dcmread(path)
        if ds.Modality == "SR":
            _study, result = expected_sr[str(ds.SOPInstanceUID)]
            assert _findings(ds) == [FINDING_CODES[result["label"]]]
        else:
            assert ds.BurnedInAnnotation == "YES"
            assert ds.SamplesPerPixel == 3
    for result in (r for _s, r in expected_sr.values()):
        assert [d["state"] for d in result["deliveries"]] == ["done"], result["deliveries"]


@pytest.fixture
def tools() -> None:
    require_tool("storescu")
    require_tool("dciodvfy")


def test_embedded_node_end_to_end(
    tools: None, shared_data: Path, orthanc: OrthancServer, tmp_path: Path
) -> None:
    sources = _sources(shared_data, tmp_path)
    with Node(tmp_path / "node", pacs_port=orthanc.dicom_port) as node:
        try:
            _send_and_check(node, orthanc, sources, tmp_path)
        except AssertionError:
            print(node.log_tail())
            raise


# -- distributed layout -----------------------------------------------------------------------


def _redis() -> Any:
    redis = pytest.importorskip("redis")
    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2)
    try:
        client.ping()
    except redis.exceptions.RedisError as exc:
        pytest.skip(f"no Redis reachable at {REDIS_URL}: {exc}")
    return client


@pytest.fixture
def redis_db() -> Iterator[str]:
    client = _redis()
    client.flushdb()
    yield REDIS_URL
    client.flushdb()


def test_distributed_node_end_to_end(
    tools: None,
    shared_data: Path,
    orthanc: OrthancServer,
    redis_db: str,
    postgres_db: str,
    tmp_path: Path,
) -> None:
    sources = _sources(shared_data, tmp_path)
    with Node(
        tmp_path / "node",
        pacs_port=orthanc.dicom_port,
        broker_url=redis_db,
        database_url=postgres_db,
        embedded_worker=False,
        workers=1,
    ) as node:
        try:
            _send_and_check(node, orthanc, sources, tmp_path)
            assert node.client.get("/health").json()["broker"] == "redis"
            # the analysis ran in the separate worker process, not in serve
            assert "job 1 done" in node.workers[0].log_tail(10_000) or any(
                "done: result" in w.log_tail(10_000) for w in node.workers
            )
            assert "done: result" not in node.server.log_tail(10_000)  # type: ignore[union-attr]
        except AssertionError:
            print(node.log_tail())
            raise


def test_lost_broker_message_is_resent(
    tools: None, shared_data: Path, orthanc: OrthancServer, redis_db: str, tmp_path: Path
) -> None:
    """A job whose message vanished from the broker is sent again from its row and completes."""
    client = _redis()
    sources = _sources(shared_data, tmp_path, busi_count=2)
    busi = [p for p in sources.files if "busi-" in str(p)]
    with Node(
        tmp_path / "node",
        pacs_port=orthanc.dicom_port,
        broker_url=redis_db,
        embedded_worker=False,
        workers=0,
        extra={"job_resend_seconds": 2},
    ) as node:
        try:
            sent = storescu(busi, "127.0.0.1", node.dicom_port)
            assert sent.returncode == 0, sent.stderr
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                jobs = node.client.get("/jobs").json()["items"]
                if jobs and jobs[0]["state"] == "queued" and client.llen("breastcad") > 0:
                    break
                time.sleep(0.2)
            else:
                raise AssertionError(f"job never queued: {jobs}")
            assert client.delete("breastcad") == 1  # the broker loses the message
            node.start_worker(0)
            [job] = node.wait_for_jobs(1, timeout=120)
            assert job["state"] == "done"
            assert "message was lost, sending it again" in node.server.log_tail(10_000)  # type: ignore[union-attr]
            [series_uid] = {str(dcmread(p).SeriesInstanceUID) for p in busi}
            study_uid = sources.series[series_uid][0]
            result = _series_result(node, study_uid, series_uid)
            orthanc.wait_for_instances(
                lambda tags: any(
                    t.get("SOPInstanceUID") == result["sr_sop_instance_uid"] for t in tags
                ),
                timeout=60,
            )
        except AssertionError:
            print(node.log_tail())
            raise
