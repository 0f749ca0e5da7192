"""No patient name, ID or birth date in any log line of an end-to-end run.

``breastcad serve`` (embedded worker) receives a series with distinctive PHI over dcmtk's
``storescu``, refuses a broken instance of the same patient, analyses, delivers the SR and SC to
a private Orthanc, answers the API; then every line the node logged is searched for the PHI
(case-insensitive; name parts too). The other reliability tests scan their logs the same way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from node_process import Node
from pydicom import dcmread
from rel_support import PHI, assert_no_phi, make_series, node_logs, wait_until
from support.dcmtk import require_tool, store_responses, storescu
from support.orthanc import OrthancServer
from support.shared_data import busi_png_paths

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("log_level", ["INFO", "DEBUG"])
def test_no_phi_in_node_logs(
    shared_data: Path, orthanc: OrthancServer, tmp_path: Path, log_level: str
) -> None:
    require_tool("storescu")
    pngs = busi_png_paths(shared_data, "malignant")
    files = make_series(pngs[10:12], tmp_path / "src")
    broken = make_series(pngs[12:13], tmp_path / "broken")[0]
    ds = dcmread(broken)
    del ds.SeriesInstanceUID  # refused with 0xC001: the refusal is logged
    ds.save_as(broken, enforce_file_format=True)
    node = Node(tmp_path / "node", pacs_port=orthanc.dicom_port, extra={"log_level": log_level})
    node.start()
    try:
        sent = storescu(files, "127.0.0.1", node.dicom_port)
        assert sent.returncode == 0, sent.stderr
        refused = storescu([broken], "127.0.0.1", node.dicom_port)
        assert store_responses(refused) != ["Success"]
        [job] = node.wait_for_jobs(1)
        assert job["state"] == "done"
        studies = node.client.get("/studies").json()["items"]
        study: dict[str, Any] = node.client.get(
            f"/studies/{studies[0]['study_instance_uid']}"
        ).json()

        def delivered() -> bool:
            d: list[dict[str, Any]] = node.client.get("/deliveries").json()["items"]
            return bool(d) and all(x["state"] == "done" for x in d)

        wait_until(delivered, 60, "the delivery")
        assert study["series"]
    finally:
        node.stop()  # flush and close the logs before reading them
    logs = node_logs(node)
    assert sum(len(text) for text in logs.values()) > 1000  # the run did log
    assert_no_phi(logs, PHI)
