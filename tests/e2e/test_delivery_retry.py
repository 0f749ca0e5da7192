"""A destination that is down: bounded retries with back-off, a visible failure, a manual retry.

The destination is dcmtk's ``storescp`` on a fixed free port: absent at first (connection
refused), started later so that the retry asked through the API delivers.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
from node_process import Node
from support.dcmtk import require_tool, storescu
from support.dicom_factory import make_us_series
from support.ports import free_port
from support.shared_data import busi_png_paths

pytestmark = pytest.mark.e2e


def _wait(predicate: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def test_failed_delivery_is_visible_and_retried(shared_data: Path, tmp_path: Path) -> None:
    require_tool("storescu")
    storescp_exe = require_tool("storescp")
    pacs_port = free_port()
    files = make_us_series(busi_png_paths(shared_data, "malignant")[2:3], tmp_path / "src")
    with Node(
        tmp_path / "node",
        pacs_port=pacs_port,
        pacs_aet="STORESCP",
        extra={"delivery_max_attempts": 3, "delivery_backoff_seconds": 0.3},
    ) as node:
        try:
            assert storescu(files, "127.0.0.1", node.dicom_port).returncode == 0
            [job] = node.wait_for_jobs(1)
            assert job["state"] == "done"

            def failed() -> list[dict[str, object]]:
                items: list[dict[str, object]] = node.client.get(
                    "/deliveries", params={"state": "failed"}
                ).json()["items"]
                return items

            _wait(lambda: failed(), 60, "the delivery to fail")
            [delivery] = failed()
            assert delivery["attempts"] == 3  # bounded: delivery_max_attempts
            assert "rejected, aborted or never connected" in str(delivery["last_error"])
            detail = node.client.get(f"/deliveries/{delivery['id']}").json()
            log = detail["attempt_log"]
            assert len(log) == 3 and not any(a["ok"] for a in log)
            # back-off: the gaps between attempts grow (0.3 s, then 0.6 s)
            starts = [
                time.mktime(time.strptime(a["started_at"][:19], "%Y-%m-%dT%H:%M:%S")) for a in log
            ]
            assert starts[2] - starts[0] >= 0.8

            received = tmp_path / "received"
            received.mkdir()
            pacs = subprocess.Popen(
                [storescp_exe, "-aet", "STORESCP", "-od", str(received), str(pacs_port)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            try:
                time.sleep(1.0)
                response = node.client.post(f"/deliveries/{delivery['id']}/retry")
                assert response.status_code == 202, response.text

                def done() -> bool:
                    d = node.client.get(f"/deliveries/{delivery['id']}").json()
                    return bool(d["state"] == "done")

                _wait(done, 60, "the retried delivery")
                arrived = sorted(received.iterdir())
                assert {p.name[:2] for p in arrived} == {"SR", "SC"}, arrived
                # a delivery that is done cannot be retried again
                assert node.client.post(f"/deliveries/{delivery['id']}/retry").status_code == 409
                assert node.client.post("/deliveries/99999/retry").status_code == 404
            finally:
                pacs.terminate()
                pacs.wait(10)
        except AssertionError:
            print(node.log_tail())
            raise


def test_jobs_queued_in_the_embedded_broker_survive_a_node_kill(
    shared_data: Path, tmp_path: Path
) -> None:
    """The in-memory broker dies with the node; the job rows bring the work back at start-up."""
    import signal

    import yaml
    from support.orthanc import OrthancServer, require_orthanc

    require_tool("storescu")
    require_orthanc()
    files = make_us_series(busi_png_paths(shared_data, "benign")[3:4], tmp_path / "src")
    with OrthancServer(workdir=tmp_path / "orthanc") as orthanc:
        node = Node(tmp_path / "node", pacs_port=orthanc.dicom_port, embedded_worker=False)
        node.start()
        try:
            assert storescu(files, "127.0.0.1", node.dicom_port).returncode == 0
            _wait(
                lambda: (
                    [j["state"] for j in node.client.get("/jobs").json()["items"]] == ["queued"]
                ),
                30,
                "the job to be queued",
            )
            assert node.server is not None
            node.server.stop(signal.SIGKILL)
            # the same node comes back, now with its worker
            node.config["embedded_worker"] = True
            node.config_path.write_text(yaml.safe_dump(node.config))
            node.start()
            [job] = node.wait_for_jobs(1, timeout=120)
            assert job["state"] == "done" and job["attempts"] == 1
            orthanc.wait_for_instances(
                lambda tags: {t.get("Modality") for t in tags} >= {"SR", "OT"}, timeout=60
            )
        except AssertionError:
            print(node.log_tail())
            raise
        finally:
            node.stop()
