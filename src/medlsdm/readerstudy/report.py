"""The reader-study report: plots of the scored answers and report.md / report.html, written with
the evaluation report's renderer (``medlsdm.evaluation.report``)."""

from __future__ import annotations

from pathlib import Path

from medlsdm.evaluation.report import Figure, Section, Table, Text, fmt, write_report
from medlsdm.readerstudy.score import POOLED


def _ci(res: dict) -> str:
    lo, hi = res.get("ci95") or (None, None)
    return "–" if lo is None else f"{fmt(lo, 3)}–{fmt(hi, 3)}"


def _plots(result: dict, out_dir: Path) -> list[dict]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from medlsdm.viz import save_figure

    figures = []
    cats = result["ratings"]
    fig, axes = plt.subplots(1, len(cats), figsize=(4.2 * len(cats), 3.4), squeeze=False)
    for ax, (cid, cat) in zip(axes[0], cats.items()):
        x = np.arange(1, len(cat["options"]) + 1)
        for shift, source, colour in ((-0.2, "real", "#4477aa"), (0.2, "synthetic", "#ee6677")):
            block = cat["pooled"][source]
            frac = np.asarray(block["counts"], dtype=float) / max(1, block["n"])
            ax.bar(x + shift, frac, width=0.4, color=colour, label=f"{source} (n={block['n']})")
        ax.set_xticks(x)
        ax.set_title(cat["question"], fontsize=10)
        ax.set_xlabel("rating (1 = worst)")
        ax.set_ylabel("fraction of answers")
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, out_dir / "figures" / "ratings.png")
    figures.append({"path": "figures/ratings.png",
                    "caption": "Ratings of real and synthetic volumes, all readers pooled"})
    turing = result["turing"]
    if turing.get("asked"):
        rows = list(turing["per_reader"].items()) + [(POOLED, turing["pooled"])]
        fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(rows), 3.2))
        acc = np.array([r["accuracy"] for _, r in rows])
        lo = np.array([r["ci95"][0] for _, r in rows])
        hi = np.array([r["ci95"][1] for _, r in rows])
        ax.errorbar(np.arange(len(rows)), acc, yerr=[acc - lo, hi - acc], fmt="o", capsize=4, color="#222")
        ax.axhline(0.5, color="#ee6677", linestyle="--", label="chance")
        ax.set_xticks(np.arange(len(rows)))
        ax.set_xticklabels([name for name, _ in rows], rotation=20, fontsize=8)
        ax.set_ylim(0, 1)
        ax.set_ylabel("accuracy (95% CI)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        save_figure(fig, out_dir / "figures" / "turing.png")
        figures.append({"path": "figures/turing.png",
                        "caption": "Real-or-synthetic accuracy per reader with 95% Clopper–Pearson intervals"})
    return figures


def _sections(result: dict, figures: list[dict]) -> list[Section]:
    intro = Section("Study")
    intro.blocks.append(Text(
        f"Study {result['study_id']}: {result['n_volumes']} volumes ({result['n_real']} real, "
        f"{result['n_synthetic']} synthetic), {len(result['readers'])} reader(s): {', '.join(result['readers'])}. "
        f"Pooled results count every reader's answer to every volume; they assume independent answers, "
        f"which readers rating the same volumes are not."))
    ratings = Section("Ratings: real vs synthetic")
    for cid, cat in result["ratings"].items():
        rows = []
        for name, block in [(POOLED, cat["pooled"]), *cat["per_reader"].items()]:
            for source in ("real", "synthetic"):
                b = block[source]
                rows.append([name, source, *b["counts"], b["mean"], b["median"],
                             block["mann_whitney_p"] if source == "real" else ""])
        ratings.blocks.append(Table(
            ["reader", "source", *[f"{k + 1}: {o}" for k, o in enumerate(cat["options"])], "mean", "median",
             "Mann–Whitney p"], rows, cat["question"]))
    ratings.blocks += [Figure(f["path"], f["caption"]) for f in figures if f["path"].endswith("ratings.png")]
    sections = [intro, ratings]
    turing = result["turing"]
    if turing.get("asked"):
        sec = Section("Turing test: can readers tell real from synthetic?")
        sec.blocks.append(Text(
            "Accuracy of the answer 'real or synthetic', with a 95% Clopper–Pearson interval and a two-sided "
            "exact binomial test against chance (0.5). Accuracy near 0.5 means synthetic volumes pass for real."))
        rows = [[name, r["n"], r["correct"], r["accuracy"], _ci(r), r["p_value"],
                 r["per_source"]["real"]["accuracy"], r["per_source"]["synthetic"]["accuracy"]]
                for name, r in [*turing["per_reader"].items(), (POOLED, turing["pooled"])]]
        sec.blocks.append(Table(["reader", "answers", "correct", "accuracy", "95% CI", "p (vs 0.5)",
                                 "accuracy on real", "accuracy on synthetic"], rows))
        sec.blocks.append(Table(["confidence (all readers)", "answers", "accuracy", "95% CI"],
                                [[level, r["n"], r["accuracy"], _ci(r)]
                                 for level, r in turing["pooled"]["per_confidence"].items()]))
        sec.blocks += [Figure(f["path"], f["caption"]) for f in figures if f["path"].endswith("turing.png")]
        sections.append(sec)
    agreement = result["agreement"]
    sec = Section("Agreement between readers")
    if agreement["n_readers"] < 2:
        sec.blocks.append(Text("One reader: agreement needs at least two."))
    else:
        questions = list(agreement["fleiss"])
        sec.blocks.append(Text("Cohen's kappa per pair of readers (quadratic-weighted in brackets, for the ordinal "
                               "ratings) and Fleiss' kappa over all readers; 1 = perfect agreement, 0 = chance; "
                               "– = undefined (every answer the same)."))
        rows = []
        for pair in agreement["cohen"]:
            cells = []
            for q in questions:
                k = pair[q]
                cells.append(fmt(k["kappa"], 3) + (f" ({fmt(k['kappa_quadratic'], 3)})" if "kappa_quadratic" in k else ""))
            rows.append([" / ".join(pair["readers"]), *cells])
        rows.append(["Fleiss (all readers)", *[fmt(agreement["fleiss"][q], 3) for q in questions]])
        sec.blocks.append(Table(["readers", *questions], rows))
    sections.append(sec)
    return sections


def write_score_report(result: dict, out_dir: Path) -> list[dict]:
    """Plots under OUT/figures, then OUT/report.md and OUT/report.html; returns the figure list."""
    figures = _plots(result, out_dir)
    write_report(out_dir, _sections(result, figures), title="medlsdm reader study")
    return figures
