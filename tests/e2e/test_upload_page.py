"""The upload page and POST /analyse on a real node (``breastcad serve`` subprocess).

The browser test drives Debian's chromium (headless, through Playwright's Python package with
``executable_path``; no browser is downloaded) and skips when chromium is absent. It uploads a
BUSI PNG (analysed, not stored) and a DICOM sample (stored, analysed by the pipeline), waits for
both results, checks the label and the heatmap are shown, and keeps a screenshot.
"""

from __future__ import annotations

import base64
import io
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from node_process import Node
from PIL import Image

pytestmark = pytest.mark.e2e

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]
UPLOAD_LIMIT = 3_000_000
US_SAMPLE = "dicom-samples/US/US1_UNCR.dcm"


@pytest.fixture(scope="module")
def upload_node(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> Iterator[Node]:
    node = Node(
        tmp_path_factory.mktemp("upload-node"),
        pacs_port=1,
        extra={"destinations": {}, "routes": [], "upload_max_bytes": UPLOAD_LIMIT},
    )
    node.start()
    try:
        yield node
    finally:
        node.stop()


def _busi(shared_data: Path, label: str = "malignant") -> Path:
    return sorted((shared_data / "busi" / label).glob("*.png"))[0]


def test_analyse_plain_image_is_not_stored(upload_node: Node, shared_data: Path) -> None:
    png = _busi(shared_data)
    answer = upload_node.client.post(
        "/analyse",
        files={"file": (png.name, png.read_bytes(), "image/png")},
        data={"modality": "US"},
    )
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["kind"] == "image" and body["stored"] is False
    assert "without storing" in body["message"]
    assert body["label"] in body["probabilities"]
    assert abs(sum(body["probabilities"].values()) - 1.0) < 1e-4
    assert body["probability"] == body["probabilities"][body["label"]]
    assert isinstance(body["not_assessable"], bool)
    heatmap = base64.b64decode(body["heatmap"].removeprefix("data:image/png;base64,"))
    with Image.open(io.BytesIO(heatmap)) as image, Image.open(png) as source:
        assert image.format == "PNG" and image.size[0] >= source.size[0]
    # the same bytes give the same finding (no state), and nothing was stored
    again = upload_node.client.post(
        "/analyse",
        files={"file": (png.name, png.read_bytes(), "image/png")},
        data={"modality": "US"},
    ).json()
    assert again["probabilities"] == body["probabilities"]
    assert upload_node.client.get("/studies").json()["items"] == []
    assert not list((upload_node.workdir / "var" / "instances").rglob("*.dcm"))


def test_analyse_refuses_clearly(upload_node: Node, shared_data: Path, tmp_path: Path) -> None:
    png = _busi(shared_data, "benign").read_bytes()

    def post(name: str, data: bytes, modality: str | None = "US") -> tuple[int, str]:
        fields = {"modality": modality} if modality is not None else {}
        response = upload_node.client.post(
            "/analyse", files={"file": (name, data, "application/octet-stream")}, data=fields
        )
        return response.status_code, str(response.json().get("detail", ""))

    status, detail = post("big.png", b"\x89PNG" + b"\0" * (UPLOAD_LIMIT + 1000))
    assert status == 413 and "upload limit" in detail and f"{UPLOAD_LIMIT:,}" in detail
    status, detail = post("notes.txt", b"these are not pixels")
    assert status == 415 and "notes.txt" in detail
    gif = io.BytesIO()
    Image.new("RGB", (8, 8)).save(gif, format="GIF")
    status, detail = post("anim.gif", gif.getvalue())
    assert status == 415 and "GIF" in detail
    status, detail = post("image.png", png, modality=None)
    assert status == 422 and "modality" in detail
    status, detail = post("image.png", png, modality="CT")
    assert status == 422 and "CT" in detail
    # an ultrasound frame sent as a mammogram: the MG model answers (and, unlike a mammogram,
    # most likely "not assessable"); without an MG model it would be a 422 naming MG
    status, detail = post("image.png", png, modality="MG")
    if status != 200:
        assert status == 422 and "MG" in detail
    status, detail = post("empty.png", b"")
    assert status == 422 and "empty" in detail
    broken = bytearray(128) + b"DICM" + b"\x02\x00\x10\x00UI\x04\x00" + b"1.2\0"
    status, detail = post("broken.dcm", bytes(broken))
    assert status == 422 and "not stored" in detail
    no_file = upload_node.client.post("/analyse", data={"modality": "US"})
    assert no_file.status_code in (400, 422)
    assert upload_node.client.get("/studies").json()["items"] == []


def _playwright() -> Any:
    if shutil.which("chromium") is None and not Path(CHROMIUM).exists():
        pytest.skip("Debian's chromium is not installed (apt-get install -y chromium)")
    return pytest.importorskip("playwright.sync_api")


def test_upload_page_in_chromium(upload_node: Node, shared_data: Path, tmp_path: Path) -> None:
    sync_api = _playwright()
    png = _busi(shared_data)
    dicom = shared_data / US_SAMPLE
    if not dicom.exists():
        pytest.skip(f"{dicom} is missing from the shared data")
    screenshot = tmp_path / "upload-page.png"
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1400})
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(f"{upload_node.url}/upload")
            assert page.title().startswith("breastcad")
            page.select_option("#modality", "US")
            page.set_input_files("#file-input", [str(png), str(dicom)])
            cards = page.locator("article.card")
            sync_api.expect(cards).to_have_count(2)
            done = page.locator('article.card[data-state="done"]')
            sync_api.expect(done).to_have_count(2, timeout=240_000)
            by_name = {}
            for index in range(2):
                card = cards.nth(index)
                by_name[card.locator(".file-name").inner_text()] = card
            for name in (png.name, dicom.name):
                card = by_name[name]
                label = card.locator(".label").inner_text().strip().lower()
                assert label in ("benign", "malignant", "normal"), label
                assert card.locator(".probabilities tr").count() == 3
                heatmap = card.locator("img.heatmap")
                sync_api.expect(heatmap).to_be_visible()
                page.wait_for_function(
                    "img => img.complete && img.naturalWidth > 0", arg=heatmap.element_handle()
                )
                assert card.locator(".similar-empty, .similar-list li").first.is_visible()
            # the bundled US model's OOD check flags the sample (a kidney ultrasound with the
            # scanner's screen around it), not the breast image
            sync_api.expect(by_name[dicom.name].locator(".not-assessable")).to_be_visible()
            assert by_name[dicom.name].get_attribute("data-not-assessable") == "true"
            assert by_name[png.name].locator(".not-assessable").is_hidden()
            assert "without storing" in by_name[png.name].locator(".stored-note").inner_text()
            assert "Stored as study" in by_name[dicom.name].locator(".stored-note").inner_text()
            page.screenshot(path=str(screenshot), full_page=True)
            assert not errors, errors
        finally:
            browser.close()
    print(f"upload page screenshot: {screenshot}")
    # the DICOM file went through the pipeline: one study with its result and SR
    studies = upload_node.client.get("/studies").json()["items"]
    assert len(studies) == 1 and studies[0]["label"] is not None


def test_upload_page_lists_similar_cases(
    upload_node: Node, shared_data: Path, tmp_path: Path
) -> None:
    """Similar cases on the page come from the node's real ``GET /results/{id}/similar``: two
    BUSI images uploaded as DICOM studies one after the other; the second lists the first (a
    past case of another study, same model) with its label and distance."""
    from support.dicom_factory import busi_as_ultrasound, write_dataset

    sync_api = _playwright()
    first = write_dataset(
        busi_as_ultrasound(_busi(shared_data, "benign"), patient_id="SIMILAR-1"),
        tmp_path / "first.dcm",
    )
    second = write_dataset(
        busi_as_ultrasound(_busi(shared_data, "malignant"), patient_id="SIMILAR-2"),
        tmp_path / "second.dcm",
    )
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page()
            page.goto(f"{upload_node.url}/upload")
            page.set_input_files("#file-input", [str(first)])
            done = page.locator('article.card[data-state="done"]')
            sync_api.expect(done).to_have_count(1, timeout=240_000)
            first_label = done.first.locator(".label").inner_text().strip().lower()
            page.set_input_files("#file-input", [str(second)])
            sync_api.expect(done).to_have_count(2, timeout=240_000)
            card = page.locator("article.card").filter(has_text="second.dcm")
            items = card.locator(".similar-list li")
            sync_api.expect(items.first).to_be_visible(timeout=60_000)
            texts = [items.nth(i).inner_text().lower() for i in range(items.count())]
            assert any(t.startswith(first_label) and "distance" in t for t in texts), texts
            assert card.locator(".similar-empty").is_hidden()
            page.screenshot(path=str(tmp_path / "upload-similar.png"), full_page=True)
        finally:
            browser.close()
    print(f"upload page screenshot: {tmp_path / 'upload-similar.png'}")
