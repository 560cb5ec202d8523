"""The evaluation report (Markdown + HTML with pictures) and the `medlsdm evaluate privacy` and
`evaluate report` commands."""

import json
import shutil

import numpy as np
import pytest

from evaluation_data import write_cohort, write_nifti
from medlsdm.cli import main
from medlsdm.errors import MedlsdmError
from medlsdm.evaluation.audit import audit_folders
from medlsdm.evaluation.report import (Figure, Section, Table, Text, build_report, fmt,
                                       write_report)


def png(path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    plt.imsave(path, np.zeros((4, 4)))
    return path


def test_fmt_handles_json_safe_values():
    assert fmt(None) == "–" and fmt("inf") == "∞" and fmt("nan") == "–" and fmt(float("inf")) == "∞"
    assert fmt(0.123456) == "0.1235" and fmt(3) == "3" and fmt(True) == "yes"


def test_write_report_markdown_and_html(tmp_path):
    png(tmp_path / "figures" / "a.png")
    sections = [Section("First", [Text("Some <text> & more"), Table(["metric", "value"], [["ssim|3d", 0.5], ["psnr", "inf"]], "Summary"),
                                  Figure("figures/a.png", "A picture")])]
    md, page = write_report(tmp_path, sections, title="T")
    text = md.read_text(encoding="utf-8")
    assert "# T" in text and "## First" in text and "![A picture](figures/a.png)" in text
    assert "| ssim\\|3d | 0.5 |" in text and "| psnr | ∞ |" in text
    doc = page.read_text(encoding="utf-8")
    # self-contained: the picture is embedded, byte for byte
    import base64

    embedded = base64.b64encode((tmp_path / "figures" / "a.png").read_bytes()).decode("ascii")
    assert f"<img src='data:image/png;base64,{embedded}'" in doc and "figures/a.png" not in doc
    assert "Some &lt;text&gt; &amp; more" in doc and "<td>∞</td>" in doc
    # a block added by another part of the package (e.g. a viewer) goes after the evaluation sections
    from medlsdm.evaluation.report import HtmlBlock

    md, page = write_report(tmp_path, sections + [Section("Viewer", [HtmlBlock("<div id='viewer'></div>", "(viewer)")])])
    assert page.read_text(encoding="utf-8").index("<div id='viewer'></div>") > page.read_text(encoding="utf-8").index("First")
    assert "(viewer)" in md.read_text(encoding="utf-8")
    with pytest.raises(MedlsdmError, match="missing.png: report figure is missing"):
        write_report(tmp_path, [Section("x", [Figure("missing.png")])])


def test_build_report_assembles_existing_sections(tmp_path):
    with pytest.raises(MedlsdmError, match="no evaluation results"):
        build_report(tmp_path)
    png(tmp_path / "figures" / "quality_cases.png")
    (tmp_path / "metrics.json").write_text(json.dumps({
        "real": "r", "synthetic": "s", "pairing": {"n_pairs": 2, "n_cases": 1, "unpaired_synthetic": ["x"]},
        "paired": {"summary": {"ssim": {"mean": 0.8, "std": 0.1, "n": 2}, "psnr": {"mean": "inf", "std": 0.0, "n": 2}},
                   "per_case": [{"case_id": "c0", "sample": 0, "ssim": 0.7, "psnr": "inf"}]},
        "distribution": {"fid2d": {"per_axis": {"D": 1.5, "H": 2.0, "W": 2.5}, "mean": 2.0, "features": "inc"}},
        "diversity": {"synthetic_per_case": {"c0": 0.9}, "synthetic_mean": 0.9, "real": 0.8},
        "skipped": {"lpips": "weights not found"},
        "figures": [{"path": "figures/quality_cases.png", "caption": "cases"}]}), encoding="utf-8")
    (tmp_path / "segmentation.json").write_text(json.dumps({
        "domain_gap": {"dice_real": 0.8, "dice_synthetic": 0.6, "ratio": 0.75}, "class_names": {"1": "tumour"},
        "protocols": {"real": {"n_train_volumes": 4, "tests": {
            "real": {"n_volumes": 2, "mean": {"dice": 0.78}, "per_class": {"1": {"dice": 0.78}},
                     "case_mean": {"mean": 0.8, "ci_low": 0.7, "ci_high": 0.9, "n": 2},
                     "per_class_case_mean": {"1": {"mean": 0.8, "ci_low": 0.7, "ci_high": 0.9, "n": 2}}},
            "synthetic": {"n_volumes": 2, "mean": {"dice": 0.6}, "per_class": {"1": {"dice": 0.6}}}}}},
        "skipped_protocols": {"synthetic": "no synthetic training volume"}}), encoding="utf-8")
    md, page = build_report(tmp_path)
    text = md.read_text(encoding="utf-8")
    assert text.index("## Image quality") < text.index("## Downstream segmentation")
    assert "| ssim | 0.8 ± 0.1 | 2 |" in text and "| psnr | ∞ ± 0 | 2 |" in text
    assert "2D FID, slices along W | 2.5" in text and "| lpips | weights not found |" in text
    assert "ratio synthetic/real 0.75" in text and "| 1 tumour | 0.8 [0.7, 0.9] | 0.78" in text
    assert "| real | real | 4 | 2 | 0.8 [0.7, 0.9] | 0.78 |" in text  # per-case mean [CI], pooled beside
    assert "Privacy" not in text and "data:image/png;base64," in page.read_text(encoding="utf-8")


@pytest.fixture
def privacy_data(tmp_path):
    train = tmp_path / "train"
    vols = write_cohort(train, [f"p{i}" for i in range(5)], seed=30)
    syn = tmp_path / "syn"
    syn.mkdir()
    shutil.copy(train / "images" / "p2.nii.gz", syn / "gen0.nii.gz")  # a memorised training volume
    rng = np.random.default_rng(1)
    for k in (1, 2):
        image, _ = write_cohort(tmp_path / f"new{k}", ["x"], seed=40 + k)["x"]
        write_nifti(syn / f"gen{k}.nii.gz", image + rng.normal(0, 1, image.shape))
    return train, syn, vols


def test_privacy_command_flags_copy_and_writes_report(privacy_data, tmp_path, capsys):
    train, syn, _ = privacy_data
    out = tmp_path / "out"
    assert main(["evaluate", "privacy", "--train", str(train), "--synthetic", str(syn), "--out", str(out)]) == 0
    result = json.loads((out / "privacy.json").read_text(encoding="utf-8"))
    assert [p["synthetic_id"] for p in result["flagged"]] == ["gen0"]
    assert result["flagged"][0]["train_id"] == "p2" and result["flagged"][0]["similarity"] == pytest.approx(1, abs=1e-5)
    for fig in result["figures"]:
        assert (out / fig["path"]).is_file()
    assert {f["path"] for f in result["figures"]} == {"figures/privacy_histogram.png", "figures/privacy_closest_pairs.png"}
    assert "1 of 3 synthetic volumes flagged" in capsys.readouterr().out
    text = (out / "report.md").read_text(encoding="utf-8")
    assert "## Privacy" in text and "figures/privacy_histogram.png" in text
    assert not list((out / "cache").glob("privacy_*.npy"))  # temporary copies removed
    # The report command rebuilds the same report from the JSON alone.
    (out / "report.md").unlink()
    assert main(["evaluate", "report", "--dir", str(out)]) == 0 and (out / "report.md").is_file()


def test_privacy_masked_ssim_and_errors(privacy_data, tmp_path, capsys):
    train, syn, _ = privacy_data
    result = audit_folders(train, syn, tmp_path / "o", similarity="ssim", mask="foreground",
                           figures=False, progress=False)
    assert result["flagged"][0]["synthetic_id"] == "gen0" and result["data_range"] > 0
    assert main(["evaluate", "privacy", "--train", str(train), "--synthetic", str(train), "--out", str(tmp_path / "x")]) == 2
    assert "same folder" in capsys.readouterr().err
    write_nifti(syn / "odd.nii.gz", np.zeros((16, 16, 12), np.float32))
    assert main(["evaluate", "privacy", "--train", str(train), "--synthetic", str(syn), "--out", str(tmp_path / "y")]) == 2
    assert "odd.nii.gz has shape (1, 16, 16, 12)" in capsys.readouterr().err
