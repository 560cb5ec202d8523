"""The reader-study page and the report viewer in a real headless browser: Chromium from the
system packages (`make test` installs it with apt when it can), driven by Playwright.

Skipped, with the reason, when Playwright or Chromium is missing."""

from __future__ import annotations

import io
import json
import os
import shutil

import nibabel as nib
import numpy as np
import pytest
from reader_study_data import write_cohorts

from medlsdm.cli import main
from medlsdm.readerstudy.build import build_study

CHROMIUM = os.environ.get("MEDLSDM_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
# WebGL through the CPU (SwiftShader): the test machines have no GPU.
CHROMIUM_ARGS = ["--use-angle=swiftshader", "--enable-unsafe-swiftshader", "--ignore-gpu-blocklist"]


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api",
                                   reason="Playwright is not installed (pip install -e '.[test]')")
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"Chromium not found at {CHROMIUM}: `make test` installs the Debian package 'chromium' "
                    f"when run as root with apt; or set MEDLSDM_CHROMIUM")
    with sync_api.sync_playwright() as pw:
        instance = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield instance
        instance.close()


def pixels(png: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(png)).convert("L"), dtype=np.float32)


def assert_not_blank(png: bytes, what: str) -> np.ndarray:
    px = pixels(png)
    lit = float(np.mean(px > 40))
    assert lit > 0.03 and px.std() > 10, f"{what}: blank ({lit:.3f} of the pixels lit)"
    return px


def wait_until(page, condition: str, timeout: float = 30000) -> None:
    page.wait_for_function(condition, timeout=timeout)


STUDY_READY = "window.MedlsdmViewer && MedlsdmViewer.all.length == 1 && !document.body.dataset.loading"
ATTRIBUTES = """Array.from(document.querySelectorAll('*')).flatMap(e => Array.from(e.attributes)
                  .map(a => e.tagName + ' ' + a.name + '=' + a.value)).sort()"""


def answer_item(page, study, choices: dict) -> None:
    for q, v in choices.items():
        page.check(f"input[name='{q}'][value='{v}']")


@pytest.mark.slow
def test_study_page_renders_scrolls_is_answered_and_scored(browser, tmp_path):
    real, synthetic = write_cohorts(tmp_path / "data", 3, 3)
    study = build_study(real, synthetic, 3, tmp_path / "study", seed=4, turing=True)
    key = json.loads((tmp_path / "study-key.json").read_text(encoding="utf-8"))
    sources = {it["id"]: it["source"] for it in key["items"]}
    context = browser.new_context(viewport={"width": 1000, "height": 1100}, accept_downloads=True)
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto((tmp_path / "study" / "index.html").as_uri())
    page.fill("#reader", "Reader A")
    page.click("#begin")
    wait_until(page, STUDY_READY)

    # Each plane renders (non-blank pixels), and the wheel moves through the slices.
    canvas = page.locator("#viewer")
    for plane in ("axial", "coronal", "sagittal"):
        page.select_option(".mv-plane", plane)
        page.wait_for_timeout(200)
        assert_not_blank(canvas.screenshot(), f"{plane} plane")
    page.select_option(".mv-plane", "axial")
    page.wait_for_timeout(200)
    before_px, before = pixels(canvas.screenshot()), page.evaluate("Array.from(MedlsdmViewer.all[0].scene.crosshairPos)")
    box = canvas.bounding_box()
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    for _ in range(4):
        page.mouse.wheel(0, 120)
        page.wait_for_timeout(60)
    page.wait_for_timeout(200)
    after = page.evaluate("Array.from(MedlsdmViewer.all[0].scene.crosshairPos)")
    assert after[2] != pytest.approx(before[2], abs=1e-3), "the wheel did not change the axial slice"
    assert np.abs(pixels(canvas.screenshot()) - before_px).mean() > 0.5, "the picture did not change on scroll"

    # Blinding in the page: every item shows the same attributes (up to its ID), the parsed header
    # carries nothing, and no original name appears anywhere.
    shapes = {}
    ids = [it["id"] for it in study["items"]]
    for k, item_id in enumerate(ids):
        page.select_option("#jump", str(k))
        wait_until(page, "!document.body.dataset.loading")
        # (the Previous/Next buttons are disabled at the ends: position, not source)
        attrs = [a.replace(item_id, "ID") for a in page.evaluate(ATTRIBUTES) if a != "BUTTON disabled="]
        shapes.setdefault(sources[item_id], []).append(attrs)
        hdr = page.evaluate("(() => { const h = MedlsdmViewer.all[0].volumes[0].hdr;"
                            " return [h.description, h.intent_name, h.aux_file, Array.from(h.dims)]; })()")
        assert hdr[:3] == ["", "", ""] and hdr[3][1:4] == study["grid"]["shape"]
    assert len({tuple(a) for group in shapes.values() for a in group}) == 1
    html = page.content()
    for word in ("real_scans", "generated_volumes", "patient_", "sample0", '"source"'):
        assert word not in html

    # Reader A answers everything (Turing right except on the first volume), with a reload midway.
    page.select_option("#jump", "0")
    wait_until(page, "!document.body.dataset.loading")
    a_choice = {}
    for k, item_id in enumerate(ids):
        src = sources[item_id]
        guess = src if k > 0 else ("real" if src == "synthetic" else "synthetic")
        a_choice[item_id] = {"appearance": 4 if src == "real" else 2, "slice_consistency": 3, "anatomy": 3,
                             "turing": guess, "confidence": 3}
        answer_item(page, study, a_choice[item_id])
        if k == 1:
            page.reload()
            wait_until(page, STUDY_READY)
            assert page.text_content("#progress").startswith("2 of 6")
            assert page.text_content("#item-title") == "Volume 2 of 6"
            assert page.is_checked(f"input[name='turing'][value='{guess}']")
        if k < len(ids) - 1:
            page.click("#next")
            wait_until(page, "!document.body.dataset.loading")
    assert page.text_content("#progress").startswith("6 of 6") and page.is_hidden("#incomplete")
    with page.expect_download() as download:
        page.click("#export-json")
    a_file = tmp_path / "a.json"
    download.value.save_as(a_file)

    # Reader B on the same browser: a fresh sheet, says "real" to everything, exports CSV.
    page.click("#switch-reader")
    page.fill("#reader", "Reader B")
    page.click("#begin")
    wait_until(page, STUDY_READY)
    assert page.text_content("#progress").startswith("0 of 6")
    for k in range(len(ids)):
        answer_item(page, study, {"appearance": 3, "slice_consistency": 3, "anatomy": 2, "turing": "real",
                                  "confidence": 1})
        if k < len(ids) - 1:
            page.click("#next")
            wait_until(page, "!document.body.dataset.loading")
    with page.expect_download() as download:
        page.click("#export-csv")
    b_file = tmp_path / "b.csv"
    download.value.save_as(b_file)
    assert not errors, errors
    context.close()

    exported = json.loads(a_file.read_text(encoding="utf-8"))
    assert exported["study_id"] == study["study_id"] and exported["reader"] == "Reader A"
    assert {r["item"]: {k: v for k, v in r.items() if k != "item"} for r in exported["answers"]} == a_choice
    assert main(["reader-study", "score", str(tmp_path / "study"), "--answers", str(a_file), str(b_file),
                 "--key", str(tmp_path / "study-key.json"), "--out", str(tmp_path / "score")]) == 0
    res = json.loads((tmp_path / "score" / "score.json").read_text(encoding="utf-8"))
    assert res["turing"]["per_reader"]["Reader A"]["correct"] == 5
    assert res["turing"]["per_reader"]["Reader B"]["accuracy"] == 0.5
    assert res["ratings"]["appearance"]["per_reader"]["Reader A"]["real"]["counts"] == [0, 0, 0, 3]
    assert res["ratings"]["anatomy"]["per_reader"]["Reader B"]["synthetic"]["counts"] == [0, 3, 0, 0]


def labelled_evaluation(tmp_path):
    """An evaluation folder made by `medlsdm evaluate quality` (real, the first case with a label
    map, synthetic with two samples of the first case)."""
    real, _ = write_cohorts(tmp_path / "data", 2, 0)
    labels, syn = tmp_path / "labels", tmp_path / "syn"
    labels.mkdir()
    syn.mkdir()
    for k, case in enumerate(("patient_00", "patient_01")):
        img = nib.load(real / f"{case}.nii.gz")
        arr = np.asarray(img.dataobj).astype(np.float32)
        if k == 0:
            nib.save(nib.Nifti1Image((arr > 300).astype(np.int16) + (arr > 500), img.affine), str(labels / f"{case}.nii.gz"))
        for s in range(2 if k == 0 else 1):
            fake = np.roll(arr, 2 * s + 1, axis=0) * 0.9
            nib.save(nib.Nifti1Image(fake, img.affine), str(syn / f"{case}_sample{s}.nii.gz"))
    out = tmp_path / "evaluation"
    assert main(["evaluate", "quality", "--real", str(real), "--synthetic", str(syn), "--labels", str(labels),
                 "--out", str(out), "--metrics", "ssim,psnr"]) == 0
    return out


REPORT_READY = "document.querySelector('.mv-root') && document.querySelector('.mv-root').dataset.ready == '1'"


def test_report_viewer_renders_links_and_degrades(browser, tmp_path):
    out = labelled_evaluation(tmp_path)
    uri = (out / "report.html").as_uri()
    context = browser.new_context(viewport={"width": 1100, "height": 900})
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(uri)
    wait_until(page, REPORT_READY, 60000)
    captions = page.eval_on_selector_all(".mv-report figcaption", "els => els.map(e => e.textContent)")
    assert captions == ["real", "label map on real", "synthetic, sample 0",
                        "label map on sample 1", "sample 1", "sample 2"]
    canvases = page.locator(".mv-report canvas")
    first_row = [assert_not_blank(canvases.nth(i).screenshot(), captions[i]) for i in range(6)][:3]
    # the overlay panel shows the label map in colour over the real image
    assert not np.allclose(first_row[0], first_row[1])

    # Linked cursors: a click in the real image moves the cursor of the other two; the wheel in
    # one scrolls all three.
    positions = "MedlsdmViewer.all.slice(0, 3).map(nv => Array.from(nv.scene.crosshairPos))"
    start = page.evaluate(positions)
    box = canvases.nth(0).bounding_box()
    page.mouse.click(box["x"] + box["width"] * 0.35, box["y"] + box["height"] * 0.3)
    page.wait_for_timeout(300)
    clicked = page.evaluate(positions)
    assert clicked[0][:2] != pytest.approx(start[0][:2], abs=1e-3)
    assert clicked[1] == pytest.approx(clicked[0], abs=1e-3) and clicked[2] == pytest.approx(clicked[0], abs=1e-3)
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    for _ in range(3):
        page.mouse.wheel(0, 120)
        page.wait_for_timeout(60)
    page.wait_for_timeout(300)
    scrolled = page.evaluate(positions)
    assert scrolled[0][2] != pytest.approx(clicked[0][2], abs=1e-3)
    assert [p[2] for p in scrolled] == pytest.approx([scrolled[0][2]] * 3, abs=1e-3)

    # Middle drag pans (all linked views), right drag changes window/level.
    pan = "MedlsdmViewer.all.slice(0, 3).map(nv => Array.from(nv.scene.pan2Dxyzmm))"
    cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    for button in ("middle", "right"):
        page.mouse.move(cx, cy)
        page.mouse.down(button=button)
        page.mouse.move(cx + 40, cy + 25, steps=5)
        page.mouse.up(button=button)
        page.wait_for_timeout(200)
    panned = page.evaluate(pan)
    assert panned[0][:2] != pytest.approx([0, 0], abs=1e-3) and panned[1] == pytest.approx(panned[0], abs=1e-3)
    window = page.evaluate("[MedlsdmViewer.all[0].volumes[0].cal_min, MedlsdmViewer.all[0].volumes[0].cal_max]")
    assert window != pytest.approx([0, 255], abs=0.5)
    page.click(".mv-reset")

    # Zoom and the case menu change what the canvases show.
    before = pixels(canvases.nth(2).screenshot())
    page.locator(".mv-controls").first.locator("input[type=range]").nth(2).fill("3")
    page.wait_for_timeout(300)
    zoomed = pixels(canvases.nth(2).screenshot())
    assert np.abs(zoomed - before).mean() > 1
    page.select_option(".mv-case", "1")  # a case without a label map: two panels
    wait_until(page, REPORT_READY)
    assert page.text_content(".mv-row h3") == "case patient_01"
    visible = page.eval_on_selector_all(".mv-row:first-child figure:not([hidden]) figcaption",
                                        "els => els.map(e => e.textContent)")
    assert visible == ["real", "synthetic, sample 0"]
    layers = "MedlsdmViewer.all.slice(0, 3).map(nv => nv.volumes.length)"
    assert page.evaluate(layers)[:2] == [1, 1]  # real; synthetic (was: label map over real)
    # back to the middle slice (the wheel moved it), where every test volume shows its ball
    page.evaluate("MedlsdmViewer.all.forEach(nv => { nv.scene.crosshairPos = [0.5, 0.5, 0.5]; nv.drawScene(); })")
    page.wait_for_timeout(200)
    for i in range(2):
        assert_not_blank(canvases.nth(i).screenshot(), f"case 2, {visible[i]}")
    page.select_option(".mv-case", "0")
    wait_until(page, REPORT_READY)
    assert page.locator(".mv-row:first-child figure:not([hidden])").count() == 3
    assert page.evaluate(layers) == [1, 2, 1]
    assert not errors, errors
    context.close()

    # Without scripting: the viewer stays hidden, a note says why, the static figures remain.
    context = browser.new_context(java_script_enabled=False)
    page = context.new_page()
    page.goto(uri)
    assert page.is_hidden(".mv-root")
    note = page.locator(".mv-report noscript em")
    assert note.is_visible() and "needs JavaScript" in note.text_content()
    assert page.locator("figure img").count() >= 1
    context.close()
