"""The dashboard in a real browser (Debian's chromium, driven by Playwright) on a real node that
analysed two real BUSI studies; and the similar-cases API and SR on the same node. Last, a
four-view mini-MIAS mammography study in four series (an untrained MG network unless one is
bundled): its study page shows the one study result once, with the right and left breasts.

The destination is a port nobody listens on, so each delivery fails (one attempt allowed) and
the study page must offer its Retry button. Playwright never downloads a browser here: it is
given ``/usr/bin/chromium``.
"""

from __future__ import annotations

import shutil
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pytest
from node_process import Node
from pydicom import dcmread
from pydicom.uid import generate_uid
from support.dcmtk import require_tool, storescu
from support.dicom_factory import make_us_series, mias_as_mammogram, write_dataset
from support.shared_data import busi_png_paths
from support.untrained_mg import write_untrained_mg_model

from inference import ModelNotAvailableError, load_bundled

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


@dataclass
class Analysed:
    node: Node
    studies: dict[str, str]  # "malignant"/"normal" -> StudyInstanceUID
    results: dict[str, dict[str, Any]]  # the API's result of each study
    third: Path  # a benign study not sent yet (the dashboard test sends it)
    third_study: str
    mammo: list[Path]  # four views, four series, one study, not sent yet (the last test does)


def _result_of(node: Node, study_uid: str) -> dict[str, Any]:
    study = node.client.get(f"/studies/{study_uid}").json()
    [result] = [r for s in study["series"] for r in s["results"]]
    return result


def _wait(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def _mammo_study(mias: Path, folder: Path) -> list[Path]:
    """One woman's four screening views (mini-MIAS), each in its own series of one study; none
    when mini-MIAS is missing (the mammography test skips, the others run)."""
    if not (mias / "benign/mdb001.png").is_file():
        return []
    study = generate_uid()
    views: list[tuple[str, Literal["L", "R"], Literal["CC", "MLO"]]] = [
        ("benign/mdb001.png", "R", "CC"), ("benign/mdb001.png", "R", "MLO"),
        ("benign/mdb002.png", "L", "CC"), ("benign/mdb002.png", "L", "MLO"),
    ]
    files = []
    for number, (png, side, view) in enumerate(views, start=1):
        ds = mias_as_mammogram(mias / png, side=side, view=view, patient_id="DASH-MG",
                               study_instance_uid=study, series_instance_uid=generate_uid())
        ds.SeriesNumber = number
        files.append(write_dataset(ds, folder / f"MG_{number}.dcm"))
    return files


@pytest.fixture(scope="module")
def analysed(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Analysed]:
    require_tool("storescu")
    work = tmp_path_factory.mktemp("dashboard")
    studies: dict[str, str] = {}
    files: dict[str, Path] = {}
    for label in ("normal", "malignant"):
        [path] = make_us_series(
            busi_png_paths(shared_data, label)[:1], work / label, patient_id=f"DASH-{label}"
        )
        files[label] = path
        studies[label] = str(dcmread(path, stop_before_pixels=True).StudyInstanceUID)
    [third] = make_us_series(busi_png_paths(shared_data, "benign")[:1], work / "benign",
                             patient_id="DASH-benign")
    mammo = _mammo_study(shared_data / "mini-mias", work / "mg")
    try:
        load_bundled("MG")
        model_dirs: list[str] = []
    except ModelNotAvailableError:
        model_dirs = [str(write_untrained_mg_model(work / "mg-model"))]
    # a port bound but never listening, for the whole test: every delivery to it is refused
    # (and the node cannot pick it for itself)
    dead = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    dead.bind(("127.0.0.1", 0))
    node = Node(
        work / "node",
        pacs_port=dead.getsockname()[1],
        extra={"delivery_max_attempts": 1, "delivery_backoff_seconds": 0.2,
               "model_dirs": model_dirs},
    )
    try:
        node.start()
        # one after the other: the second study's SR can list the first as a similar case
        for count, label in enumerate(("normal", "malignant"), start=1):
            sent = storescu([files[label]], "127.0.0.1", node.dicom_port)
            assert sent.returncode == 0, sent.stderr
            jobs = node.wait_for_jobs(count, timeout=240)
            assert all(j["state"] == "done" for j in jobs), jobs
        _wait(
            lambda: all(
                d["state"] == "failed" for d in node.client.get("/deliveries").json()["items"]
            ),
            60,
            "the deliveries to fail",
        )
        results = {label: _result_of(node, uid) for label, uid in studies.items()}
        third_study = str(dcmread(third, stop_before_pixels=True).StudyInstanceUID)
        yield Analysed(node, studies, results, third, third_study, mammo)
    except AssertionError:
        print(node.log_tail())
        raise
    finally:
        node.stop()
        dead.close()


def test_similar_cases_api_and_sr(analysed: Analysed) -> None:
    node = analysed.node
    later = analysed.results["malignant"]
    earlier = analysed.results["normal"]
    found = node.client.get(f"/results/{later['id']}/similar", params={"k": 5}).json()["items"]
    # the only other study is the earlier one; the result's own study is never returned
    assert [c["study_instance_uid"] for c in found] == [analysed.studies["normal"]]
    [case] = found
    assert case["label"] == earlier["label"]
    assert 0.0 <= case["distance"] <= 2.0
    assert node.client.get(case["thumbnail"]).headers["content-type"] == "image/png"
    assert node.client.get(case["image"]).headers["content-type"] == "image/png"
    assert node.client.get("/results/999999/similar").status_code == 404

    # the later SR lists the earlier study (made when only that one was indexed)
    sr_bytes = node.client.get(later["sr"]).content
    path = node.workdir / "later-sr.dcm"
    path.write_bytes(sr_bytes)
    text = str(dcmread(path))
    assert "Similar case" in text and analysed.studies["normal"] in text
    # the first study had no past case: its SR lists none
    first = node.workdir / "first-sr.dcm"
    first.write_bytes(node.client.get(earlier["sr"]).content)
    assert "Similar case" not in str(dcmread(first))


def test_source_image_png_endpoint(analysed: Analysed) -> None:
    node = analysed.node
    sop = analysed.results["malignant"]["per_image"][0]["sop_instance_uid"]
    response = node.client.get(f"/instances/{sop}/image.png", params={"size": 64})
    assert response.status_code == 200
    assert response.content[:8] == b"\x89PNG\r\n\x1a\n"
    from io import BytesIO

    from PIL import Image

    assert max(Image.open(BytesIO(response.content)).size) == 64
    assert node.client.get("/instances/1.2.3.4/image.png").status_code == 404


def test_dashboard_in_chromium(analysed: Analysed, tmp_path: Path) -> None:
    if not Path(CHROMIUM).exists() and shutil.which("chromium") is None:
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    playwright_api = pytest.importorskip("playwright.sync_api")
    node = analysed.node
    malignant = analysed.results["malignant"]
    with playwright_api.sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS
        )
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(node.url + "/")

            # the worklist: both studies, most suspicious first; the header sorts
            rows = page.locator("#worklist tbody tr.study-row")
            rows.nth(1).wait_for(timeout=15_000)
            order = [rows.nth(i).get_attribute("data-study") for i in range(rows.count())]
            worklist = node.client.get("/worklist").json()["items"]
            expected = [item["study_instance_uid"] for item in worklist]
            assert order == expected
            page.click("#worklist th[data-key=suspicion]")  # now ascending
            page.wait_for_function(
                "uid => document.querySelector('#worklist tbody tr').dataset.study === uid",
                arg=expected[-1],
            )
            # the state filter asks the API: no study is still receiving
            page.select_option("#filter-state", "receiving")
            page.locator("#worklist-empty").wait_for(state="visible", timeout=10_000)
            page.select_option("#filter-state", "done")
            rows.nth(1).wait_for(timeout=10_000)

            # open the malignant-looking study
            page.click(f"#worklist tr[data-study='{analysed.studies['malignant']}']")
            page.locator(".result .finding").wait_for(timeout=15_000)
            finding = page.locator(".result .finding").inner_text()
            assert malignant["label"] in finding
            try:
                page.wait_for_function(
                    "() => [...document.querySelectorAll('img.heatmap, img.source')]"
                    ".every(img => img.complete && img.naturalWidth > 0)"
                    " && document.querySelectorAll('img.heatmap').length > 0",
                    timeout=20_000,
                )
            except playwright_api.TimeoutError:
                states = page.eval_on_selector_all(
                    "img", "imgs => imgs.map(i => [i.src, i.complete, i.naturalWidth])"
                )
                page.screenshot(path=str(tmp_path / "failed.png"), full_page=True)
                raise AssertionError(f"images not loaded: {states}; {tmp_path}") from None
            width = page.eval_on_selector("img.heatmap", "img => img.naturalWidth")
            assert width > 0
            for label in malignant["probabilities"]:
                assert page.locator(f".probs tr[data-label='{label}']").count() == 1
            # similar cases: the earlier study, with its thumbnail loaded
            similar = page.locator(f".similar figure[data-study='{analysed.studies['normal']}']")
            similar.wait_for(timeout=15_000)
            page.wait_for_function(
                "() => [...document.querySelectorAll('.similar img')]"
                ".every(img => img.complete && img.naturalWidth > 0)",
                timeout=15_000,
            )
            # job progress shows the finished job; the failed delivery has a Retry button
            assert page.locator(".steps[data-job-state=done]").count() == 1
            [delivery] = malignant["deliveries"]
            retry = page.locator(f"tr[data-delivery='{delivery['id']}'] button.retry")
            retry.wait_for(timeout=10_000)

            screenshot = tmp_path / "dashboard-study.png"
            page.screenshot(path=str(screenshot), full_page=True)
            print(f"dashboard screenshot: {screenshot}")

            retry.click()
            # a retry is a fresh round of attempts: a second attempt row, failed again
            url = f"/deliveries/{delivery['id']}"
            _wait(
                lambda: len(node.client.get(url).json()["attempt_log"]) == 2
                and node.client.get(url).json()["state"] == "failed",
                60,
                "the retried delivery's second attempt",
            )

            # live progress: back on the worklist (no reload), a new study appears and is
            # analysed while the page polls
            page.evaluate("() => { window.__sameDocument = true; }")
            page.click("a[href='#/']")
            page.select_option("#filter-state", "")
            page.locator("#worklist tbody tr.study-row").nth(1).wait_for(timeout=10_000)
            sent = storescu([analysed.third], "127.0.0.1", node.dicom_port)
            assert sent.returncode == 0, sent.stderr
            row = page.locator(f"#worklist tr[data-study='{analysed.third_study}']")
            row.wait_for(timeout=60_000)
            row.locator(".badge.done").wait_for(timeout=240_000)
            assert page.evaluate("() => window.__sameDocument === true")
            assert "3 done" in page.locator("#progress").inner_text()
            assert not errors, errors
        finally:
            browser.close()
    assert screenshot.stat().st_size > 10_000


def test_mammography_study_page_in_chromium(analysed: Analysed, tmp_path: Path) -> None:
    """A four-series mammography study has one job and one result: its study page shows that
    result once (not under each of its series), with the right and left breasts' findings and
    the views each used, source and heatmap."""
    if not analysed.mammo:
        pytest.skip("mini-MIAS not found in the shared data")
    if not Path(CHROMIUM).exists() and shutil.which("chromium") is None:
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    playwright_api = pytest.importorskip("playwright.sync_api")
    node = analysed.node
    headers = [dcmread(p, stop_before_pixels=True) for p in analysed.mammo]
    study_uid = str(headers[0].StudyInstanceUID)
    series = [str(ds.SeriesInstanceUID) for ds in headers]
    sent = storescu(analysed.mammo, "127.0.0.1", node.dicom_port)
    assert sent.returncode == 0, sent.stderr

    def analysed_study() -> bool:
        response = node.client.get(f"/studies/{study_uid}")
        if response.status_code != 200:
            return False
        body = response.json()
        jobs = [j for s in body["series"] for j in s["jobs"]]
        return bool(body["results"]) and all(j["state"] in ("done", "failed") for j in jobs)

    _wait(analysed_study, 240, "the mammography study's result")
    study = node.client.get(f"/studies/{study_uid}").json()
    [result] = study["results"]
    assert result["series_instance_uids"] == series
    # the API lists the result under each of the four series: the page must not
    assert all([r["id"] for r in s["results"]] == [result["id"]] for s in study["series"])
    breasts = {b["laterality"]: b for b in result["breasts"]}
    assert set(breasts) == {"R", "L"}

    with playwright_api.sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS
        )
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(node.url + "/#/study/" + study_uid)
            page.locator(".study-result .result .breast").nth(1).wait_for(timeout=15_000)
            # the study result once, naming the four series it covers
            assert page.locator(".result").count() == 1
            assert page.locator(f".result[data-result='{result['id']}']").count() == 1
            covered = page.locator(".study-result .covered li")
            assert [covered.nth(i).get_attribute("data-series") for i in range(4)] == series
            assert [covered.nth(i).locator("strong").inner_text() for i in range(4)] == [
                "R CC", "R MLO", "L CC", "L MLO"]
            # the four series are listed, each pointing at that result instead of repeating it
            for uid in series:
                section = page.locator(f"section.series[data-series='{uid}']")
                assert section.count() == 1
                assert f"result {result['id']} above" in section.inner_text()
            # right breast first, then left: label, probabilities, the views with heatmaps
            panels = page.locator(".breast")
            assert [panels.nth(i).get_attribute("data-laterality") for i in range(2)] == ["R", "L"]
            for side, name in (("R", "Right breast"), ("L", "Left breast")):
                panel = page.locator(f".breast[data-laterality='{side}']")
                breast = breasts[side]
                heading = panel.locator("h3").inner_text()
                assert name in heading and breast["label"] in heading
                for label in breast["probabilities"]:
                    assert panel.locator(f".probs tr[data-label='{label}']").count() == 1
                shown = [panel.locator(".view").nth(i).get_attribute("data-sop")
                         for i in range(panel.locator(".view").count())]
                assert shown == [v["sop_instance_uid"] for v in breast["views"]]
                assert panel.locator("img.heatmap").count() == len(breast["views"])
                assert panel.locator("figcaption").first.inner_text() == f"{side} CC source"
            # the breast that gives the study finding (the more suspicious one) says so
            decides = [side for side, b in breasts.items()
                       if (b["label"], b["probabilities"][b["label"]])
                       == (result["label"], result["probability"])]
            assert decides
            assert sorted(page.locator(".breast.decides").nth(i).get_attribute("data-laterality")
                          or "" for i in range(page.locator(".breast.decides").count())) \
                == sorted(decides)
            # every image of the page is loaded (four sources, four heatmaps)
            try:
                page.wait_for_function(
                    "() => [...document.querySelectorAll('.breast img')]"
                    ".every(img => img.complete && img.naturalWidth > 0)"
                    " && document.querySelectorAll('.breast img').length === 8",
                    timeout=30_000,
                )
            except playwright_api.TimeoutError:
                page.screenshot(path=str(tmp_path / "failed.png"), full_page=True)
                raise AssertionError(f"mammography images not loaded; {tmp_path}") from None
            screenshot = tmp_path / "dashboard-mammography.png"
            page.screenshot(path=str(screenshot), full_page=True)
            print(f"mammography study screenshot: {screenshot}")
            assert not errors, errors
        finally:
            browser.close()
    assert screenshot.stat().st_size > 10_000
