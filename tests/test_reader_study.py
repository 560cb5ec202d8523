"""`medlsdm reader-study build|serve|score` without a browser: sampling, blinding, the key,
answer checking and the statistics (the page itself: test_browser.py)."""

from __future__ import annotations

import base64
import csv
import json
import threading
import urllib.request

import nibabel as nib
import numpy as np
import pytest
from reader_study_data import write_cohorts

from medlsdm.cli import main
from medlsdm.errors import ConfigError, DataError, MedlsdmError
from medlsdm.readerstudy.build import build_study
from medlsdm.readerstudy.score import (binomial_accuracy, cohen_kappa, fleiss_kappa, score_study)
from medlsdm.readerstudy.serve import study_server


@pytest.fixture
def cohorts(tmp_path):
    return write_cohorts(tmp_path / "data")


def volume_bytes(study, item_id) -> bytes:
    text = (study / "volumes" / f"{item_id}.js").read_text(encoding="utf-8")
    prefix = f'medlsdmVolume("{item_id}", "'
    assert text.startswith(prefix) and text.endswith('");\n')
    return base64.b64decode(text[len(prefix):-4])


def answers_for(study_json, key, reader, correct_items=(), rating=lambda i, src: 3):
    """An answers file (as the page exports it): Turing answers right for `correct_items`."""
    sources = {it["id"]: it["source"] for it in key["items"]}
    rows = []
    for k, item in enumerate(study_json["items"]):
        src = sources[item["id"]]
        guess = src if item["id"] in correct_items else ("real" if src == "synthetic" else "synthetic")
        row = {"item": item["id"], **{c["id"]: rating(k, src) for c in study_json["categories"]}}
        if study_json["turing"]:
            row.update(turing=guess, confidence=2)
        rows.append(row)
    return {"format": "medlsdm-reader-study-answers", "version": 1, "study_id": study_json["study_id"],
            "reader": reader, "answers": rows}


def test_build_is_balanced_seeded_and_blinded(cohorts, tmp_path):
    real, synthetic = cohorts
    study = build_study(real, synthetic, 3, tmp_path / "study", seed=7, turing=True)
    key = json.loads((tmp_path / "study-key.json").read_text(encoding="utf-8"))
    assert key["study_id"] == study["study_id"]
    assert sorted(it["source"] for it in key["items"]) == ["real"] * 3 + ["synthetic"] * 3
    assert [it["id"] for it in key["items"]] == [it["id"] for it in study["items"]]
    # The same seed gives the same study; another seed another sample/order.
    again = build_study(real, synthetic, 3, tmp_path / "again", seed=7, turing=True)
    assert again["study_id"] == study["study_id"] and again["items"] == study["items"]
    other = build_study(real, synthetic, 3, tmp_path / "other", seed=8, turing=True)
    assert other["items"] != study["items"]

    folder = tmp_path / "study"
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    # Nothing readers get names a source or an original file, in any file name or content.
    telltales = ["real_scans", "generated_volumes", "patient_", "sample0", "hospital", "medlsdm synthetic",
                 '"source"', "seed"]
    for path in files:
        rel = str(path.relative_to(folder))
        text = b"" if rel.startswith("app/niivue/") else path.read_bytes()  # the library, as shipped
        for word in telltales:
            assert word.encode() not in text, f"{rel} contains {word!r}"
            assert word not in rel
    # Every volume: the same file size, the same header, nothing of the original in it.
    headers, sizes = [], set()
    for item in study["items"]:
        data = volume_bytes(folder, item["id"])
        sizes.add(len(data))
        img = nib.Nifti1Image.from_bytes(data)
        hdr = img.header
        assert hdr["descrip"].item() == b"" and hdr["intent_name"].item() == b"" and hdr["aux_file"].item() == b""
        assert img.shape == tuple(study["grid"]["shape"]) and img.get_data_dtype() == np.uint8
        arr = np.asarray(img.dataobj)
        # each volume normalised alike: its 99.5th percentile inside the field of view maps to 255
        assert arr.max() == 255 and np.percentile(arr[arr > 0], 50) > 10
        hdr_bytes = bytearray(data[:348])
        headers.append(bytes(hdr_bytes))
    assert len(sizes) == 1
    assert len(set(headers)) == 1, "headers differ between volumes"
    grid = study["grid"]
    # one RAS-aligned grid for all; its spacing fits the largest field of view (the oblique 0.7x0.7x5 mm one)
    assert grid["shape"] == [22, 22, 22]
    assert np.allclose(img.affine[:3, :3], np.eye(3) * grid["spacing_mm"], atol=1e-5)


def test_build_refuses_what_it_should(cohorts, tmp_path, capsys):
    real, synthetic = cohorts
    with pytest.raises(DataError, match="--n 9"):
        build_study(real, synthetic, 9, tmp_path / "s")
    with pytest.raises(MedlsdmError, match="outside the study folder"):
        build_study(real, synthetic, 2, tmp_path / "s", key=tmp_path / "s" / "key.json")
    with pytest.raises(DataError, match="same folder"):
        build_study(real, real, 2, tmp_path / "s")
    existing = tmp_path / "mine"
    existing.mkdir()
    (existing / "notes.txt").write_text("keep me")
    with pytest.raises(MedlsdmError, match="not a reader study"):
        build_study(real, synthetic, 2, existing)
    assert (existing / "notes.txt").read_text(encoding="utf-8") == "keep me"
    build_study(real, synthetic, 2, tmp_path / "s")
    assert main(["reader-study", "build", "--real", str(real), "--synthetic", str(synthetic), "--n", "2",
                 "--out", str(tmp_path / "s")]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert main(["reader-study", "build", "--real", str(real), "--synthetic", str(synthetic), "--n", "2",
                 "--out", str(tmp_path / "s"), "--overwrite", "--seed", "3"]) == 0
    with pytest.raises(DataError, match="--channel 2"):
        build_study(real, synthetic, 1, tmp_path / "c", channel=2)


def test_build_multichannel_and_custom_categories(tmp_path):
    real, synthetic = write_cohorts(tmp_path / "data", 2, 2, channels=4)
    spec = tmp_path / "questions.yaml"
    spec.write_text("- id: contrast\n  question: Is the contrast plausible?\n  options: ['no', partly, 'yes']\n")
    study = build_study(real, synthetic, 2, tmp_path / "study", categories=spec, channel=3, shape=12)
    assert study["categories"] == [{"id": "contrast", "question": "Is the contrast plausible?",
                                    "options": ["no", "partly", "yes"]}]
    assert study["grid"]["shape"] == [12, 12, 12] and study["turing"] is False
    spec.write_text("- id: contrast\n  question: x\n  options: [only one]\n")
    with pytest.raises(ConfigError, match="at least two"):
        build_study(real, synthetic, 2, tmp_path / "study2", categories=spec)
    spec.write_text("- id: contrast\n  question: x\n  options: [no, yes]\n")
    with pytest.raises(ConfigError, match="quote them"):
        build_study(real, synthetic, 2, tmp_path / "study2", categories=spec)


def test_statistics_match_textbook_values():
    # Fleiss (1971) / Wikipedia example: 10 subjects, 14 raters, 5 categories -> kappa 0.210
    table = [[0, 0, 0, 0, 14], [0, 2, 6, 4, 2], [0, 0, 3, 5, 6], [0, 3, 9, 2, 0], [2, 2, 8, 1, 1],
             [7, 7, 0, 0, 0], [3, 2, 6, 3, 0], [2, 5, 3, 2, 2], [6, 5, 2, 1, 0], [0, 2, 2, 3, 7]]
    per_item = [[c for c, n in enumerate(row, 1) for _ in range(n)] for row in table]
    raters = [[per_item[i][r] for i in range(10)] for r in range(14)]
    assert fleiss_kappa(raters, [1, 2, 3, 4, 5]) == pytest.approx(0.20993, abs=1e-4)
    # Cohen: perfect agreement 1, systematic disagreement negative, undefined when constant
    assert cohen_kappa([1, 2, 3, 1], [1, 2, 3, 1], [1, 2, 3]) == pytest.approx(1.0)
    assert cohen_kappa(["real", "synthetic"] * 3, ["synthetic", "real"] * 3, ["real", "synthetic"]) == pytest.approx(-1.0)
    assert cohen_kappa([2, 2, 2], [2, 2, 2], [1, 2, 3]) is None
    # Binomial: 9 of 10 right: exact two-sided p = 22/1024, Clopper-Pearson (0.5550, 0.9975)
    res = binomial_accuracy([True] * 9 + [False])
    assert res["accuracy"] == 0.9 and res["p_value"] == pytest.approx(22 / 1024)
    assert res["ci95"] == pytest.approx([0.5550, 0.9975], abs=1e-4) and res["differs_from_chance"]
    assert binomial_accuracy([True, False] * 5)["p_value"] == pytest.approx(1.0)


@pytest.fixture
def built(cohorts, tmp_path):
    real, synthetic = cohorts
    study = build_study(real, synthetic, 4, tmp_path / "study", seed=1, turing=True)
    key = json.loads((tmp_path / "study-key.json").read_text(encoding="utf-8"))
    return tmp_path / "study", study, key, tmp_path / "study-key.json"


def write(path, data):
    path.write_text(json.dumps(data))
    return path


def test_score_computes_per_reader_and_pooled(built, tmp_path, capsys):
    folder, study, key, key_path = built
    ids = [it["id"] for it in study["items"]]
    # Reader A right on 6 of 8 volumes, rates real 4 and synthetic 2; reader B right on all, rates 3.
    a = write(tmp_path / "a.json", answers_for(study, key, "A", ids[:6], lambda k, s: 4 if s == "real" else 2))
    b_data = answers_for(study, key, "B", ids)
    b = tmp_path / "b.csv"  # the CSV export reads the same
    with open(b, "w", newline="", encoding="utf-8") as fh:
        cols = ["study_id", "reader", "item", "appearance", "slice_consistency", "anatomy", "turing", "confidence"]
        w = csv.DictWriter(fh, cols)
        w.writeheader()
        for row in b_data["answers"]:
            w.writerow({"study_id": study["study_id"], "reader": "B", **row})
    assert main(["reader-study", "score", str(folder), "--answers", str(a), str(b), "--key", str(key_path),
                 "--out", str(tmp_path / "score")]) == 0
    assert "A: Turing accuracy 0.750" in capsys.readouterr().out
    res = json.loads((tmp_path / "score" / "score.json").read_text(encoding="utf-8"))
    t = res["turing"]
    assert t["per_reader"]["A"]["correct"] == 6 and t["per_reader"]["B"]["accuracy"] == 1.0
    assert t["pooled"]["n"] == 16 and t["pooled"]["correct"] == 14
    app = res["ratings"]["appearance"]
    assert app["per_reader"]["A"]["real"]["counts"] == [0, 0, 0, 4]
    assert app["per_reader"]["A"]["synthetic"]["counts"] == [0, 4, 0, 0]
    assert app["pooled"]["real"]["counts"] == [0, 0, 4, 4] and app["pooled"]["synthetic"]["mean"] == 2.5
    assert app["per_reader"]["A"]["mann_whitney_p"] < 0.05 and app["per_reader"]["B"]["mann_whitney_p"] == 1.0
    # B answers every Turing question right, A 6 of 8: their agreement follows from the key
    sources = [s["source"] for s in key["items"]]
    a_answers = [s if i < 6 else ("real" if s == "synthetic" else "synthetic") for i, s in enumerate(sources)]
    assert res["agreement"]["cohen"][0]["turing"]["kappa"] == pytest.approx(
        cohen_kappa(a_answers, sources, ["real", "synthetic"]))
    assert res["agreement"]["cohen"][0]["appearance"]["kappa"] is not None
    # a second run into the same folder needs --overwrite (another command's report may be there)
    again = ["reader-study", "score", str(folder), "--answers", str(a), str(b), "--key", str(key_path),
             "--out", str(tmp_path / "score")]
    assert main(again) == 2 and "pass --overwrite" in capsys.readouterr().err
    assert main(again + ["--overwrite"]) == 0
    report = (tmp_path / "score" / "report.html").read_text(encoding="utf-8")
    assert "Turing test" in report and "<img src='data:image/png;base64," in report   # figures embedded
    assert (tmp_path / "score" / "figures" / "turing.png").stat().st_size > 1000


def test_score_refuses_bad_answers_and_keys(built, tmp_path, cohorts, capsys):
    folder, study, key, key_path = built
    ids = [it["id"] for it in study["items"]]
    good = answers_for(study, key, "A", ids[:4])
    out = tmp_path / "out"

    def fails(answers, match, key_file=key_path):
        paths = [write(tmp_path / f"ans{i}.json", a) for i, a in enumerate(answers)]
        with pytest.raises(MedlsdmError, match=match):
            score_study(folder, paths, key_file, out)

    fails([dict(good, study_id="0123456789abcdef")], "another study")
    fails([good, dict(good)], "already answered")
    fails([dict(good, answers=good["answers"][:-1])], "left 1 of 8 volumes unanswered")
    fails([dict(good, answers=good["answers"] + [good["answers"][0]])], "duplicate answers")
    bad_value = json.loads(json.dumps(good))
    bad_value["answers"][0]["appearance"] = 7
    fails([bad_value], "7 is not one of")
    no_conf = json.loads(json.dumps(good))
    del no_conf["answers"][2]["confidence"]
    fails([no_conf], "incomplete")
    # a key of another study
    real, synthetic = cohorts
    build_study(real, synthetic, 4, tmp_path / "other", seed=2, turing=True)
    fails([good], "key of another study", tmp_path / "other-key.json")
    edited = dict(key, items=key["items"][:-1])
    fails([good], "does not match the study's items", write(tmp_path / "edited-key.json", edited))
    # the command prints the error on one line and exits 2
    assert main(["reader-study", "score", str(folder), "--answers", str(write(tmp_path / "x.json", good)),
                 "--key", str(tmp_path / "other-key.json"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "key of another study" in err


def test_serve_gives_the_folder_on_localhost(built):
    folder, study, _, _ = built
    server = study_server(folder, port=0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        host, port = server.server_address[:2]
        assert host == "127.0.0.1"
        page = urllib.request.urlopen(f"http://127.0.0.1:{port}/index.html", timeout=10).read().decode()
        assert study["study_id"] in page
        item = study["items"][0]["id"]
        vol = urllib.request.urlopen(f"http://127.0.0.1:{port}/volumes/{item}.js", timeout=10).read()
        assert vol.startswith(b'medlsdmVolume("')
    finally:
        server.shutdown()
        server.server_close()
    with pytest.raises(MedlsdmError, match="not a reader-study folder"):
        study_server(folder / "volumes", port=0)


def test_report_viewer_embeds_cases_and_degrades(tmp_path):
    """The evaluation report gets the viewer block while the volumes exist, and none after."""
    from medlsdm.evaluation.report import build_report
    from medlsdm.evaluation.viewer import case_rows, viewer_block

    real, synthetic = write_cohorts(tmp_path / "data", 2, 0)
    syn = tmp_path / "syn"
    syn.mkdir()
    for k in (0, 1):  # two samples of patient_00 on its grid, one of patient_01
        img = nib.load(real / "patient_00.nii.gz")
        nib.save(nib.Nifti1Image(np.asarray(img.dataobj) * (0.5 + k), img.affine), str(syn / f"patient_00_sample{k}.nii.gz"))
    img = nib.load(real / "patient_01.nii.gz")
    nib.save(img, str(syn / "patient_01.nii.gz"))
    labels = tmp_path / "labels"  # a label scheme 0/1/2/4, on patient_00 only
    labels.mkdir()
    lab = np.zeros((16, 16, 16), np.int16)
    lab[2:6], lab[6:9], lab[9:12] = 1, 2, 4
    nib.save(nib.Nifti1Image(lab, nib.load(real / "patient_00.nii.gz").affine), str(labels / "patient_00.nii.gz"))
    rows, samples = case_rows(real, syn, labels)
    assert [r.title for r in rows] == ["case patient_00", "case patient_01"]
    assert [p.title for p in rows[0].panels] == ["real", "label map on real", "synthetic, sample 0"]
    assert [p.title for p in rows[1].panels] == ["real", "synthetic"]
    assert samples is not None and [p.title for p in samples.panels] == ["label map on sample 1", "sample 1", "sample 2"]
    block = viewer_block(rows, samples, max_side=8)
    data = json.loads(block.split('class="mv-data">', 1)[1].split("</script>", 1)[0])
    overlay = data["cases"][0]["panels"][1]["layers"][1]
    assert overlay["labels"] == 4
    lab_vol = nib.Nifti1Image.from_bytes(__import__("gzip").decompress(base64.b64decode(overlay["base64"])))
    assert set(np.unique(np.asarray(lab_vol.dataobj))) == {0, 1, 2, 4}  # nearest neighbour: no new values
    layer = data["cases"][0]["panels"][0]["layers"][0]
    vol = nib.Nifti1Image.from_bytes(__import__("gzip").decompress(base64.b64decode(layer["base64"])))
    assert vol.shape == (8, 8, 8) and vol.get_data_dtype() == np.uint8
    assert np.allclose(np.abs(vol.affine[:3, :3]).sum(0), 2.0)  # 16 mm covered by 8 voxels
    assert "https://" not in block.split("<script>", 1)[0] and "<noscript>" in block

    metrics = {"kind": "medlsdm-quality", "real": str(real), "synthetic": str(syn), "labels": None,
               "pairing": {"n_pairs": 3, "n_cases": 2}, "paired": {"summary": {}, "per_case": []}}
    out = tmp_path / "ev"
    out.mkdir()
    (out / "metrics.json").write_text(json.dumps(metrics))
    md, html = build_report(out)
    assert "Interactive viewer" in html.read_text(encoding="utf-8") and "mv-data" in html.read_text(encoding="utf-8")
    assert "Open report.html for an interactive 3D viewer." in md.read_text(encoding="utf-8")
    metrics["synthetic"] = str(tmp_path / "gone")
    (out / "metrics.json").write_text(json.dumps(metrics))
    md, html = build_report(out)
    assert "mv-data" not in html.read_text(encoding="utf-8")
