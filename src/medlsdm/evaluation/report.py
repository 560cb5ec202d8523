"""The human evaluation report: OUT/report.md and OUT/report.html with pictures.

Each ``medlsdm evaluate`` command leaves a JSON file and PNG figures in its output folder:
``metrics.json`` (quality), ``segmentation.json``, ``privacy.json``, figures under ``figures/``
with paths stored relative to the folder. ``build_report(out_dir)`` turns whichever of them exist
into sections and writes both documents, so running the three commands into one folder (in any
order) and then calling ``build_report`` — the commands do it themselves — gives one report.
Rendering reads only the JSON files, never the volumes, so the report can be rebuilt anywhere.

report.html is self-contained (figures embedded as data URIs): it can be copied or mailed alone.
report.md references the PNG files relatively. Other parts of the package add their own blocks
through ``build_report(out_dir, extra_sections=[Section(..., [HtmlBlock(html, markdown)])])``
(e.g. an interactive volume viewer); they appear after the evaluation sections.
"""

from __future__ import annotations

import base64
import html
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence, Union

from medlsdm.errors import MedlsdmError
from medlsdm.files import atomic_output, ensure_writable_dir, read_json
from medlsdm.evaluation.viewer import report_viewer

__all__ = ["Text", "Table", "Figure", "HtmlBlock", "Section", "SECTION_FILES", "fmt", "write_report",
           "build_report", "quality_section", "segmentation_section", "privacy_section",
           "label_edit_section"]


@dataclass
class Text:
    text: str


@dataclass
class Table:
    headers: list[str]
    rows: list[list[Any]]
    caption: str = ""


@dataclass
class Figure:
    path: str  # relative to the report's folder
    caption: str = ""


@dataclass
class HtmlBlock:
    """A trusted HTML fragment made by the package itself (never user text), with the Markdown
    shown in report.md instead. The place for interactive additions such as a volume viewer."""

    html: str
    markdown: str = ""


Block = Union[Text, Table, Figure, HtmlBlock]


@dataclass
class Section:
    title: str
    blocks: list[Block] = field(default_factory=list)


def fmt(value: Any, digits: int = 4) -> str:
    """A number for a table: 4 significant digits; JSON's null / "nan" as '–', "inf" as '∞'."""
    if value is None:
        return "–"
    if isinstance(value, str):
        return {"inf": "∞", "-inf": "-∞", "nan": "–"}.get(value, value)
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "–"
        if math.isinf(value):
            return "∞" if value > 0 else "-∞"
        return f"{value:.{digits}g}"
    return str(value)


def mean_std(summary: dict | None, digits: int = 4) -> str:
    """'mean ± std' from a ``{"mean", "std"}`` summary."""
    if not summary:
        return "–"
    std = summary.get("std")
    return fmt(summary.get("mean"), digits) + ("" if std in (None, "nan") else f" ± {fmt(std, digits)}")


# ----------------------------------------------------------------------------- rendering

def _md_cell(value: Any) -> str:
    return fmt(value).replace("|", "\\|").replace("\n", " ")


def _markdown(sections: Sequence[Section], title: str) -> str:
    lines = [f"# {title}", ""]
    for sec in sections:
        lines += [f"## {sec.title}", ""]
        for block in sec.blocks:
            if isinstance(block, Text):
                lines += [block.text, ""]
            elif isinstance(block, Table):
                if block.caption:
                    lines += [f"**{block.caption}**", ""]
                lines.append("| " + " | ".join(_md_cell(h) for h in block.headers) + " |")
                lines.append("|" + "---|" * len(block.headers))
                lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in block.rows]
                lines.append("")
            elif isinstance(block, Figure):
                lines += [f"![{block.caption}]({block.path})", ""]
                if block.caption:
                    lines += [f"*{block.caption}*", ""]
            elif isinstance(block, HtmlBlock) and block.markdown:
                lines += [block.markdown, ""]
    return "\n".join(lines)


def _data_uri(path: Path) -> str:
    """The picture embedded in the page, so report.html needs no other file."""
    kind = {".png": "image/png", ".gif": "image/gif", ".jpg": "image/jpeg", ".jpeg": "image/jpeg",
            ".svg": "image/svg+xml"}.get(path.suffix.lower(), "application/octet-stream")
    return f"data:{kind};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"


_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; max-width: 1100px;
       margin: 2em auto; padding: 0 1em; color: #222; line-height: 1.45; }
h1 { border-bottom: 2px solid #444; } h2 { border-bottom: 1px solid #bbb; margin-top: 2em; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 3px 9px; text-align: right; }
th { background: #f0f0f0; } td:first-child, th:first-child { text-align: left; }
caption { caption-side: top; font-weight: bold; text-align: left; padding-bottom: 4px; }
figure { margin: 1em 0; } figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { font-style: italic; color: #555; }
"""


def _html(sections: Sequence[Section], title: str, out_dir: Path) -> str:
    esc = html.escape
    out = ["<!DOCTYPE html>", "<html><head><meta charset='utf-8'>", f"<title>{esc(title)}</title>",
           f"<style>{_CSS}</style></head><body>", f"<h1>{esc(title)}</h1>"]
    for sec in sections:
        out.append(f"<h2>{esc(sec.title)}</h2>")
        for block in sec.blocks:
            if isinstance(block, Text):
                out.append(f"<p>{esc(block.text)}</p>")
            elif isinstance(block, Table):
                out.append("<table>")
                if block.caption:
                    out.append(f"<caption>{esc(block.caption)}</caption>")
                out.append("<tr>" + "".join(f"<th>{esc(fmt(h))}</th>" for h in block.headers) + "</tr>")
                out += ["<tr>" + "".join(f"<td>{esc(fmt(c))}</td>" for c in row) + "</tr>"
                        for row in block.rows]
                out.append("</table>")
            elif isinstance(block, Figure):
                out.append(f"<figure><img src='{_data_uri(out_dir / block.path)}' "
                           f"alt='{esc(block.caption, quote=True)}'>"
                           f"<figcaption>{esc(block.caption)}</figcaption></figure>")
            elif isinstance(block, HtmlBlock):
                out.append(block.html)
    out.append("</body></html>")
    return "\n".join(out)


def write_report(out_dir: str | os.PathLike, sections: Sequence[Section],
                 title: str = "medlsdm evaluation report") -> tuple[Path, Path]:
    """Write OUT/report.md and OUT/report.html from ``sections``; returns both paths. Figure paths
    must be relative to ``out_dir`` and exist (a missing picture is a bug, not a broken link)."""
    out_dir = ensure_writable_dir(out_dir)
    for sec in sections:
        for block in sec.blocks:
            if isinstance(block, Figure) and not (out_dir / block.path).is_file():
                raise MedlsdmError(f"{out_dir / block.path}: report figure is missing")
    md, page = out_dir / "report.md", out_dir / "report.html"
    for path, text in ((md, _markdown(sections, title)), (page, _html(sections, title, out_dir))):
        with atomic_output(path) as tmp:
            tmp.write_text(text, encoding="utf-8")
    return md, page


# ----------------------------------------------------------------------------- sections

def _figures(data: dict, out_dir: Path) -> list[Figure]:
    """The figures a command listed, those still present."""
    return [Figure(f["path"], f.get("caption", "")) for f in data.get("figures", [])
            if (out_dir / f["path"]).is_file()]


def _names(names: Sequence[str], n: int = 12) -> str:
    if not names:
        return "none"
    return ", ".join(names[:n]) + (f", ... ({len(names)} in all)" if len(names) > n else "")


def _skipped_table(skipped: dict) -> list[Block]:
    if not skipped:
        return []
    return [Table(["metric", "skipped because"], [[k, v] for k, v in skipped.items()], "Skipped metrics")]


PAIRED_ORDER = ("ssim", "ms_ssim", "psnr", "rmse", "mae", "lpips_vgg", "lpips_alex")


def quality_section(data: dict, out_dir: str | os.PathLike) -> Section:
    """Paired, distributional and diversity metrics from ``metrics.json``."""
    out_dir = Path(out_dir)
    pairing = data.get("pairing", {})
    sec = Section("Image quality")
    sec.blocks.append(Text(
        f"Real: {data.get('real')}; synthetic: {data.get('synthetic')}. {pairing.get('n_pairs', 0)} synthetic "
        f"volumes paired with {pairing.get('n_cases', 0)} real cases by case ID. Intensity range for "
        f"paired metrics: {data.get('data_range_rule', '')}. Mask: {data.get('mask') or 'none (whole volume)'}."))
    if pairing.get("unpaired_synthetic") or pairing.get("unpaired_real"):
        sec.blocks.append(Text(f"Unpaired synthetic files (not in paired metrics): "
                               f"{_names(pairing.get('unpaired_synthetic', []))}; real cases without a "
                               f"synthetic volume: {_names(pairing.get('unpaired_real', []))}."))
    paired = data.get("paired", {})
    summary = paired.get("summary", {})
    names = [m for m in PAIRED_ORDER if m in summary]
    if names:
        sec.blocks.append(Table(["metric", "mean ± std", "n"],
                                [[m, mean_std(summary[m]), summary[m].get("n")] for m in names],
                                "Paired metrics (synthetic vs the real case of the same label map)"))
        rows = [[r["case_id"], "–" if r.get("sample") is None else r["sample"], *[r.get(m) for m in names]]
                for r in paired.get("per_case", [])]
        sec.blocks.append(Table(["case", "sample", *names], rows, "Per case"))
    dist = data.get("distribution", {})
    dist_rows = []
    fid2d = dist.get("fid2d")
    if fid2d:
        for axis, value in fid2d.get("per_axis", {}).items():
            dist_rows.append([f"2D FID, slices along {axis}", value, fid2d.get("features", "")])
        dist_rows.append(["2D FID, mean over axes", fid2d.get("mean"), fid2d.get("features", "")])
    for key, label in (("fid3d", "3D FID (MedicalNet)"), ("fid3d_random", "3D FID (random 3D CNN, untrained)"),
                       ("mmd", "MMD²"), ("checkerboard", "checkerboard energy ratio (1 = as real)")):
        if dist.get(key):
            dist_rows.append([label, dist[key].get("value"), dist[key].get("features", "")])
    if dist_rows:
        sec.blocks.append(Table(["metric", "value", "features"], dist_rows,
                                "Distribution metrics (all real vs all synthetic volumes)"))
    div = data.get("diversity")
    if div:
        # "all synthetic volumes": quality.UNPAIRED_GROUP, the group of unconditional samples
        rows = [[f"synthetic, samples of case {c}" if c != "all synthetic volumes" else "synthetic, all volumes", v]
                for c, v in div.get("synthetic_per_case", {}).items()]
        rows += [["synthetic, mean over cases", div.get("synthetic_mean")], ["real volumes", div.get("real")]]
        sec.blocks.append(Table(["diversity: mean pairwise MS-SSIM (lower = more diverse)", "value"], rows))
        if div.get("note"):
            sec.blocks.append(Text(div["note"]))
    sec.blocks += _skipped_table(data.get("skipped", {}))
    sec.blocks += _settings_table(data.get("settings", {}))
    sec.blocks += _figures(data, out_dir)
    return sec


def _settings_table(settings: dict) -> list[Block]:
    """How every metric was computed (metrics.json ``settings``), so numbers can be compared."""
    if not settings:
        return []
    rows = []
    ssim = settings.get("ssim", {})
    if ssim:
        rows.append(["SSIM", f"{ssim.get('window_shape')} window {ssim.get('window')} voxels, sigma "
                             f"{ssim.get('sigma')}, K1 {ssim.get('k1')}, K2 {ssim.get('k2')}, "
                             f"{ssim.get('covariance')} covariances, {ssim.get('region')}"])
    if settings.get("data_range_rule"):
        rows.append(["data range (SSIM, PSNR)", settings["data_range_rule"]])
    for name, net in (settings.get("lpips", {}).get("networks") or {}).items():
        rows.append([f"LPIPS-{name}", f"v0.1, {settings['lpips'].get('slices')}; backbone {_weights(net['backbone'])}; "
                                      f"heads {_weights(net['heads'])}"])
    if settings.get("fid2d"):
        f = settings["fid2d"]
        rows.append(["2D FID", f"slices along {', '.join(f.get('axes', []))}: {f.get('slices_per_axis')}; "
                               f"{f.get('intensity')}; {f.get('resize')}; Inception {_weights(f.get('network'))}"])
    for key, label in (("fid3d", "3D FID (MedicalNet)"), ("fid3d_random", "3D FID (random 3D CNN)")):
        if settings.get(key):
            rows.append([label, f"{settings[key].get('features')}; {_weights(settings[key].get('network'))}"])
    return [Table(["metric", "settings"], rows, "How the metrics were computed")] if rows else []


def _weights(prov: dict | None) -> str:
    if not prov:
        return "–"
    state = "verified" if prov.get("verified") else "UNVERIFIED"
    return f"{prov.get('file', prov.get('network', ''))} sha256 {str(prov.get('sha256', ''))[:16]}… ({state})"


def with_ci(summary: dict | None) -> str:
    """'mean [low, high]' from a ``bootstrap_mean_ci`` summary."""
    if not summary:
        return "–"
    return f"{fmt(summary.get('mean'))} [{fmt(summary.get('ci_low'), 3)}, {fmt(summary.get('ci_high'), 3)}]"


SEG_SCORES = ("dice", "iou", "precision", "recall")


def segmentation_section(data: dict, out_dir: str | os.PathLike) -> Section:
    """Downstream segmentation results from ``segmentation.json``."""
    out_dir = Path(out_dir)
    sec = Section("Downstream segmentation")
    gap = data.get("domain_gap", {})
    st = data.get("settings", {})
    length = (f"{st.get('steps')} steps" if st.get("steps") else f"{st.get('epochs')} epochs" if st.get("epochs")
              else f"a wall-clock budget of {st.get('budget_minutes')} min (not reproducible)")
    sec.blocks.append(Text(
        f"A 3D U-Net is trained on real images and tested on the real test images and on the synthetic "
        f"images generated from the same test label maps (reference = the test label map). Every network: "
        f"{length}, seed {st.get('seed')}, {st.get('threads')} CPU threads, settings {st.get('network')}. "
        f"Foreground classes only. Headline: per-case mean Dice (mean over test cases of each case's mean "
        f"over classes) with a {st.get('confidence_interval', 'bootstrap confidence interval')}; the Dice of "
        f"all test voxels pooled is shown beside it. Per-case mean Dice real {fmt(gap.get('dice_real'))}, "
        f"synthetic {fmt(gap.get('dice_synthetic'))}, ratio synthetic/real {fmt(gap.get('ratio'))} "
        f"(1 = no domain gap)."))
    rows = []
    for name, proto in data.get("protocols", {}).items():
        for test_name, res in proto.get("tests", {}).items():
            mean = res.get("mean", {})
            rows.append([name, test_name, proto.get("n_train_volumes"), res.get("n_volumes"),
                         with_ci(res.get("case_mean")), *[mean.get(s) for s in SEG_SCORES]])
    if rows:
        sec.blocks.append(Table(["trained on", "tested on", "train volumes", "test volumes",
                                 "per-case mean Dice [CI]", *[f"pooled {s}" for s in SEG_SCORES]],
                                rows, "Mean over foreground classes"))
    class_names = data.get("class_names", {})
    for name, proto in data.get("protocols", {}).items():
        for test_name, res in proto.get("tests", {}).items():
            per = res.get("per_class", {})
            case_mean = res.get("per_class_case_mean", {})
            if per:
                sec.blocks.append(Table(
                    ["class", "per-case mean Dice [CI]", *[f"pooled {s}" for s in SEG_SCORES]],
                    [[f"{c} {class_names.get(str(c), '')}".strip(), with_ci(case_mean.get(c, case_mean.get(str(c)))),
                      *[v.get(k) for k in SEG_SCORES]] for c, v in per.items()],
                    f"Per class: trained on {name}, tested on {test_name}"))
    study = data.get("augmentation")
    if study and study.get("rows"):
        sec.blocks.append(Text(
            f"Augmentation study: networks trained on N real cases (nested seeded subsets of the training set), "
            f"without and with the {study.get('n_synthetic_train')} synthetic training volumes (generated from "
            f"non-test label maps), and on the synthetic volumes only; all tested on the real test cases."))
        sec.blocks.append(Table(
            ["real cases", "synthetic", "train volumes", "per-case mean Dice [CI]", "pooled Dice"],
            [[r["n_real"] or "–", "yes" if r["synthetic"] else "no", r["n_train_volumes"], with_ci(r["case_mean"]),
              r.get("pooled_dice")] for r in study["rows"]], "Augmentation study (Dice on real test cases)"))
    skipped = data.get("skipped_protocols", {})
    if skipped:
        sec.blocks.append(Table(["protocol", "skipped because"], [[k, v] for k, v in skipped.items()]))
    sec.blocks += _figures(data, out_dir)
    return sec


def privacy_section(data: dict, out_dir: str | os.PathLike) -> Section:
    """Memorisation audit from ``privacy.json``."""
    out_dir = Path(out_dir)
    sec = Section("Privacy: are synthetic volumes copies of training volumes?")
    conditional = data.get("mode") == "conditional"
    method = ("what a label map and the cohort do not explain, in two bands compared by correlation inside the "
              "class interiors: voxel-scale detail (Laplacian; every training image, over small shifts and "
              "axis flips) and the smooth intensity field minus the cohort's mean field (the image of the "
              "sample's own label map); copy margin = the larger band correlation minus that band's "
              "threshold" if conditional else
              f"{data.get('similarity')} of the images{' inside the foreground mask' if data.get('mask') else ''}")
    baseline = data.get("baseline_rate")
    sec.blocks.append(Text(
        f"Method: {method}. Threshold {fmt(data.get('threshold'))} ({data.get('threshold_rule')}). "
        f"{data.get('n_flagged')} of {data.get('n_synthetic')} synthetic volumes flagged "
        f"({fmt(100 * (data.get('fraction_flagged') or 0), 3)} %), {data.get('n_train')} training volumes"
        + (f", {data.get('n_held_out')} held-out real cases; held-out cases flagged against the others' "
           f"threshold (the rate an honest model should not exceed): {fmt(100 * baseline, 3)} %."
           if baseline is not None else ".")))
    bands = data.get("bands") or {}
    if bands:
        sec.blocks.append(Table(["band", "compared with", "threshold", "baseline rate", "flagged"],
                                [[name, b.get("compared_with"), b.get("threshold"), b.get("baseline_rate"),
                                  b.get("n_flagged")] for name, b in bands.items()], "Copy-audit bands"))
    if data.get("note"):
        sec.blocks.append(Text(data["note"]))
    if data.get("subjects_flagged"):
        sec.blocks.append(Text(f"Training subjects with a flagged synthetic volume: {_names(data['subjects_flagged'])}."))
    if data.get("scope"):
        sec.blocks.append(Text(f"What this audit can and cannot detect. {data['scope']}"))
    closest = sorted(data.get("pairs", []), key=lambda p: -(p.get("similarity") or -math.inf))[:10]
    if closest:
        sec.blocks.append(Table(["synthetic", "nearest training volume", data.get("similarity") or "similarity", "flagged"],
                                [[p["synthetic_id"], p["train_id"], p["similarity"], p["flagged"]] for p in closest],
                                "Closest synthetic-training pairs"))
    sec.blocks += _figures(data, out_dir)
    return sec


def label_edit_section(data: dict, out_dir: str | os.PathLike) -> Section:
    """Label-map editing from ``label_edit.json`` (`medlsdm.evaluation.editing`)."""
    out_dir = Path(out_dir)
    names = data.get("class_names", {})
    target = data.get("target_class")
    target_name = f"{target} ({names.get(str(target), '?')})"
    sec = Section("Label-map editing: does the image follow the map?")
    sec.blocks.append(Text(
        f"{data.get('label_map')}: {'; '.join(data.get('edits', []))}, sampled with the original and the edited "
        f"label map from the same noise ({data.get('sampler')}, {data.get('steps') or 'all'} steps, guidance "
        f"{data.get('guidance')}, seed {data.get('seed')}). {data.get('changed_voxels')} voxels became class "
        f"{target_name}. Intensities on the model's grid in [-1, 1]."))
    sec.blocks.append(Table(
        ["changed voxels, from the original map", "changed voxels, from the edited map", "change",
         f"class {target_name} elsewhere", "fraction of the way followed", "mean |change| elsewhere"],
        [[data.get("changed_before"), data.get("changed_after"), data.get("mean_change"),
          data.get("target_reference"), data.get("followed"), data.get("unchanged_mae")]],
        "Mean synthetic intensity"))
    if data.get("followed") is None:
        sec.blocks.append(Text(f"No 'fraction followed': class {target_name} looks on average like the voxels it "
                               "took over (its mean differs by less than 0.1), so only the change itself is shown."))
    sec.blocks += _figures(data, out_dir)
    return sec


# file name -> renderer, in report order
SECTION_FILES: dict[str, Callable[[dict, Path], Section]] = {
    "metrics.json": quality_section,
    "segmentation.json": segmentation_section,
    "privacy.json": privacy_section,
    "label_edit.json": label_edit_section,
}


def build_report(out_dir: str | os.PathLike, extra_sections: Sequence[Section] = ()) -> tuple[Path, Path]:
    """Assemble every section whose JSON exists in ``out_dir`` into report.md and report.html,
    followed by ``extra_sections`` (blocks other parts of the package add, e.g. a viewer)."""
    out_dir = Path(out_dir)
    sections = [render(read_json(out_dir / name), out_dir)
                for name, render in SECTION_FILES.items() if (out_dir / name).is_file()]
    viewer = report_viewer(out_dir) if sections else None
    if viewer:
        sections.insert(1, Section("Interactive viewer",
                                   [HtmlBlock(viewer, "Open report.html for an interactive 3D viewer.")]))
    sections += list(extra_sections)
    if not sections:
        raise MedlsdmError(f"{out_dir}: no evaluation results to report (expected one of "
                           f"{', '.join(SECTION_FILES)}; run `medlsdm evaluate quality|segmentation|privacy --out {out_dir}`)")
    return write_report(out_dir, sections)
