"""Scoring a reader study: the answers of every reader, checked against the study and its key,
turned into statistics and a report.

* **Ratings**, per category, per reader and pooled over readers: the distribution of the options
  chosen for real and for synthetic volumes (counts, mean, median) and a two-sided Mann–Whitney U
  test of real vs synthetic.
* **Turing test** (studies built with ``--turing``): accuracy of "real or synthetic?" with a
  95 % Clopper–Pearson interval and a two-sided exact binomial test against chance (0.5; the
  study shows as many real as synthetic volumes), also per source and per confidence level.
* **Agreement** between readers: Cohen's kappa for every pair (unweighted; quadratic-weighted
  for the ordinal ratings) and Fleiss' kappa over all readers, per category and for the Turing
  answers.

Pooled tests treat every (reader, volume) answer as independent although readers see the same
volumes; the per-reader results are the ones without that assumption.
"""

from __future__ import annotations

import csv
import itertools
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from medlsdm.errors import DataError, MedlsdmError
from medlsdm.files import ensure_writable_dir, read_json, write_json
from medlsdm.readerstudy.build import KEY_FORMAT, STUDY_FORMAT
from medlsdm.readerstudy.questions import TURING_SOURCES

__all__ = ["ANSWERS_FORMAT", "ReaderAnswers", "read_answers", "load_study", "load_key", "check_answers",
           "rating_summary", "binomial_accuracy", "cohen_kappa", "fleiss_kappa", "score_study"]

ANSWERS_FORMAT = "medlsdm-reader-study-answers"
POOLED = "all readers"


@dataclass
class ReaderAnswers:
    reader: str
    path: str
    study_id: str
    answers: dict[str, dict]  # item ID -> {question: value}


def _none_if_nan(value: float) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


# ----------------------------------------------------------------------------- reading

def load_study(folder: str | os.PathLike) -> dict:
    path = Path(folder) / "study.json"
    if not path.is_file():
        raise MedlsdmError(f"{folder}: not a reader-study folder (no study.json)")
    study = read_json(path)
    if study.get("format") != STUDY_FORMAT:
        raise MedlsdmError(f"{path}: not a medlsdm reader study (format {study.get('format')!r})")
    return study


def load_key(path: str | os.PathLike, study: dict) -> dict[str, str]:
    """{item ID: "real" | "synthetic"} from the key, checked against the study."""
    key = read_json(path)
    if not isinstance(key, dict) or key.get("format") != KEY_FORMAT:
        raise MedlsdmError(f"{path}: not a reader-study key (format {key.get('format') if isinstance(key, dict) else None!r})")
    if key.get("study_id") != study["study_id"]:
        raise MedlsdmError(f"{path}: the key of another study (study ID {key.get('study_id')}; this study is "
                           f"{study['study_id']})")
    sources = {item.get("id"): item.get("source") for item in key.get("items", [])}
    ids = [item["id"] for item in study["items"]]
    if set(sources) != set(ids) or any(sources[i] not in TURING_SOURCES for i in ids):
        raise MedlsdmError(f"{path}: does not match the study's items (damaged or edited key)")
    return {i: sources[i] for i in ids}


def _questions(study: dict) -> dict[str, set]:
    """{question ID: allowed values}."""
    out = {c["id"]: set(range(1, len(c["options"]) + 1)) for c in study["categories"]}
    if study.get("turing"):
        out["turing"] = set(TURING_SOURCES)
        out["confidence"] = set(range(1, len(study.get("turing_confidence", [])) + 1))
    return out


def read_answers(path: str | os.PathLike) -> ReaderAnswers:
    """One reader's exported answers (JSON or CSV, as the page writes them); values as exported
    (checked by ``check_answers``)."""
    path = Path(path)
    if not path.is_file():
        raise MedlsdmError(f"{path}: answers file not found")
    if path.suffix.lower() == ".csv":
        with open(path, newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
        if not rows or not {"study_id", "reader", "item"} <= set(rows[0]):
            raise MedlsdmError(f"{path}: not a reader-study answers file (expected columns study_id, reader, item, ...)")
        study_ids, readers = {r["study_id"] for r in rows}, {r["reader"] for r in rows}
        if len(study_ids) != 1 or len(readers) != 1:
            raise MedlsdmError(f"{path}: answers of more than one study or reader in one file")
        answers_list = [{k: v for k, v in r.items() if k not in ("study_id", "reader") and v not in ("", None)}
                        for r in rows]
        study_id, reader = study_ids.pop(), readers.pop()
    else:
        data = read_json(path)
        if not isinstance(data, dict) or data.get("format") != ANSWERS_FORMAT:
            raise MedlsdmError(f"{path}: not a reader-study answers file (format "
                               f"{data.get('format') if isinstance(data, dict) else None!r})")
        study_id, reader, answers_list = data.get("study_id"), data.get("reader"), data.get("answers", [])
        if not isinstance(answers_list, list) or not all(isinstance(a, dict) for a in answers_list):
            raise MedlsdmError(f"{path}: 'answers' must be a list of objects")
    if not reader or not str(reader).strip():
        raise MedlsdmError(f"{path}: no reader name")
    answers: dict[str, dict] = {}
    for row in answers_list:
        item = row.get("item")
        if item in answers:
            raise DataError(f"{path}: duplicate answers for volume {item}")
        answers[item] = {k: v for k, v in row.items() if k != "item"}
    return ReaderAnswers(str(reader).strip(), str(path), str(study_id), answers)


def _value(raw, allowed: set, where: str):
    if all(isinstance(a, int) for a in allowed):
        try:
            if isinstance(raw, bool):
                raise ValueError
            value = int(raw)
            if value != float(raw):
                raise ValueError
        except (TypeError, ValueError):
            raise DataError(f"{where}: {raw!r} is not one of {sorted(allowed)}") from None
    else:
        value = raw
    if value not in allowed:
        raise DataError(f"{where}: {raw!r} is not one of {sorted(allowed, key=str)}")
    return value


def check_answers(study: dict, files: Sequence[ReaderAnswers]) -> list[ReaderAnswers]:
    """The answers checked: of this study, one file per reader, every volume and question
    answered once with an allowed value; values converted (ratings to int)."""
    questions = _questions(study)
    ids = [item["id"] for item in study["items"]]
    seen: dict[str, str] = {}
    out = []
    for f in files:
        if f.study_id != study["study_id"]:
            raise DataError(f"{f.path}: answers from another study (study ID {f.study_id}; this study is "
                            f"{study['study_id']})")
        if f.reader in seen:
            raise DataError(f"{f.path}: reader {f.reader!r} already answered in {seen[f.reader]} "
                            f"(duplicate answers; give each reader's final export once)")
        seen[f.reader] = f.path
        unknown = [i for i in f.answers if i not in ids]
        if unknown:
            raise DataError(f"{f.path}: volume(s) {', '.join(map(str, unknown[:5]))} are not in this study")
        missing = [i for i in ids if i not in f.answers or any(q not in f.answers[i] for q in questions)]
        if missing:
            raise DataError(f"{f.path}: reader {f.reader!r} left {len(missing)} of {len(ids)} volumes unanswered or "
                            f"incomplete (e.g. {', '.join(missing[:5])}); all questions must be answered")
        checked = {}
        for i in ids:
            extra = set(f.answers[i]) - set(questions)
            if extra:
                raise DataError(f"{f.path}: volume {i}: unknown question(s) {', '.join(sorted(extra))}")
            checked[i] = {q: _value(f.answers[i][q], allowed, f"{f.path}: volume {i}, {q}")
                          for q, allowed in questions.items()}
        out.append(ReaderAnswers(f.reader, f.path, f.study_id, checked))
    if not out:
        raise MedlsdmError("no answer files given")
    return out


# ----------------------------------------------------------------------------- statistics

def rating_summary(real: Sequence[int], synthetic: Sequence[int], n_options: int) -> dict:
    """Counts per option (1..n), mean and median for each source, Mann–Whitney U p-value."""
    from scipy.stats import mannwhitneyu

    def one(values):
        v = np.asarray(values, dtype=float)
        return {"n": int(v.size), "counts": [int(np.sum(v == k)) for k in range(1, n_options + 1)],
                "mean": _none_if_nan(float(v.mean())) if v.size else None,
                "median": _none_if_nan(float(np.median(v))) if v.size else None}

    p = None
    if len(real) and len(synthetic) and len(set(real) | set(synthetic)) > 1:
        p = _none_if_nan(float(mannwhitneyu(real, synthetic, alternative="two-sided").pvalue))
    elif len(real) and len(synthetic):
        p = 1.0  # every answer the same: no difference at all
    return {"real": one(real), "synthetic": one(synthetic), "mann_whitney_p": p}


def binomial_accuracy(correct: Sequence[bool]) -> dict:
    """Accuracy with its 95 % Clopper–Pearson interval and the two-sided exact binomial test
    against 0.5."""
    from scipy.stats import binomtest

    n, k = len(correct), int(sum(bool(c) for c in correct))
    if n == 0:
        return {"n": 0, "correct": 0, "accuracy": None, "ci95": [None, None], "p_value": None}
    test = binomtest(k, n, 0.5, alternative="two-sided")
    ci = test.proportion_ci(confidence_level=0.95, method="exact")
    return {"n": n, "correct": k, "accuracy": k / n, "ci95": [float(ci.low), float(ci.high)],
            "p_value": float(test.pvalue), "differs_from_chance": bool(test.pvalue < 0.05)}


def cohen_kappa(a: Sequence, b: Sequence, labels: Sequence, weights: str | None = None) -> float | None:
    """Cohen's kappa of two readers' answers (None when undefined: both always gave one answer)."""
    from sklearn.metrics import cohen_kappa_score

    if len(set(a) | set(b)) < 2:
        return None
    with np.errstate(divide="ignore", invalid="ignore"):
        return _none_if_nan(float(cohen_kappa_score(a, b, labels=list(labels), weights=weights)))


def fleiss_kappa(answers: Sequence[Sequence], labels: Sequence) -> float | None:
    """Fleiss' kappa of ``answers[reader][item]`` (every reader rates every item). Written here
    because scikit-learn has only Cohen's and statsmodels is not a dependency:
    kappa = (P_bar - P_e) / (1 - P_e), P_bar the mean agreement per item, P_e chance agreement."""
    table = np.array([[sum(r[i] == label for r in answers) for label in labels]
                      for i in range(len(answers[0]))], dtype=float)  # (items, labels)
    n = len(answers)
    if n < 2:
        return None
    p_item = ((table ** 2).sum(axis=1) - n) / (n * (n - 1))
    p_label = table.sum(axis=0) / table.sum()
    p_e = float((p_label ** 2).sum())
    if p_e >= 1.0:
        return None
    return float((p_item.mean() - p_e) / (1.0 - p_e))


# ----------------------------------------------------------------------------- scoring

def _ratings(study: dict, readers: list[ReaderAnswers], sources: dict[str, str]) -> dict:
    out = {}
    groups = {r.reader: [r] for r in readers}
    groups[POOLED] = readers
    for c in study["categories"]:
        per = {}
        for name, group in groups.items():
            values = {s: [r.answers[i][c["id"]] for r in group for i, src in sources.items() if src == s]
                      for s in TURING_SOURCES}
            per[name] = rating_summary(values["real"], values["synthetic"], len(c["options"]))
        out[c["id"]] = {"question": c["question"], "options": c["options"], "pooled": per.pop(POOLED),
                        "per_reader": per}
    return out


def _turing(study: dict, readers: list[ReaderAnswers], sources: dict[str, str]) -> dict:
    if not study.get("turing"):
        return {"asked": False, "per_reader": {}}

    def block(group):
        answers = [(r.answers[i], src) for r in group for i, src in sources.items()]
        res = binomial_accuracy([a["turing"] == src for a, src in answers])
        res["per_source"] = {s: binomial_accuracy([a["turing"] == src for a, src in answers if src == s])
                             for s in TURING_SOURCES}
        levels = study.get("turing_confidence", [])
        res["per_confidence"] = {levels[k - 1]: binomial_accuracy([a["turing"] == src for a, src in answers
                                                                   if a["confidence"] == k])
                                 for k in range(1, len(levels) + 1)}
        return res

    return {"asked": True, "pooled": block(readers), "per_reader": {r.reader: block([r]) for r in readers}}


def _agreement(study: dict, readers: list[ReaderAnswers]) -> dict:
    ids = [item["id"] for item in study["items"]]
    questions = [(c["id"], list(range(1, len(c["options"]) + 1)), True) for c in study["categories"]]
    if study.get("turing"):
        questions.append(("turing", list(TURING_SOURCES), False))
    pairs = []
    for a, b in itertools.combinations(readers, 2):
        row = {"readers": [a.reader, b.reader]}
        for q, labels, ordinal in questions:
            x, y = [a.answers[i][q] for i in ids], [b.answers[i][q] for i in ids]
            row[q] = {"kappa": cohen_kappa(x, y, labels)}
            if ordinal:
                row[q]["kappa_quadratic"] = cohen_kappa(x, y, labels, "quadratic")
        pairs.append(row)
    fleiss = {q: fleiss_kappa([[r.answers[i][q] for i in ids] for r in readers], labels)
              for q, labels, _ in questions} if len(readers) >= 2 else {}
    return {"n_readers": len(readers), "cohen": pairs, "fleiss": fleiss}


OUTPUTS = ("score.json", "report.md", "report.html", "figures/ratings.png", "figures/turing.png")


def score_study(study_dir: str | os.PathLike, answer_files: Sequence[str | os.PathLike],
                key: str | os.PathLike, out_dir: str | os.PathLike, overwrite: bool = False) -> dict:
    """Check the answers, compute the statistics, write OUT/score.json, plots and the report
    (replacing such files already in OUT only with ``overwrite``)."""
    from medlsdm.readerstudy.report import write_score_report

    present = [name for name in OUTPUTS if (Path(out_dir) / name).exists()]
    if present and not overwrite:
        raise MedlsdmError(f"{out_dir}: already holds {', '.join(present)}; pass --overwrite to replace them "
                           f"or choose another --out")
    study = load_study(study_dir)
    sources = load_key(key, study)
    readers = check_answers(study, [read_answers(p) for p in answer_files])
    out_dir = ensure_writable_dir(out_dir)
    result = {
        "kind": "medlsdm-reader-study-score", "study_id": study["study_id"], "study": str(study_dir),
        "readers": [r.reader for r in readers], "answer_files": [r.path for r in readers],
        "n_volumes": len(sources), "n_real": sum(s == "real" for s in sources.values()),
        "n_synthetic": sum(s == "synthetic" for s in sources.values()),
        "ratings": _ratings(study, readers, sources), "turing": _turing(study, readers, sources),
        "agreement": _agreement(study, readers),
    }
    result["figures"] = write_score_report(result, out_dir)
    write_json(out_dir / "score.json", result)
    return result
