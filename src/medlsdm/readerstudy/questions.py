"""The questions a reader answers for each volume.

Defaults: the three categories medicaldiffusion (Khader et al. 2023, Table 1) gave two
radiologists, each with four options, scored 1 (worst) to 4 (best). The paper's text names the
top options ("largely realistic with only minor unrealistic areas", "consistent between most
slices", "only minor or no anatomic inconsistencies"); the others follow the same scale.
With ``turing``, the reader also says whether the volume is real or synthetic, and how sure.

A custom set is a JSON or YAML file: a list of ``{"id", "question", "options": [...]}`` with at
least two options each, listed from worst to best (scored 1..n).
"""

from __future__ import annotations

import re
from pathlib import Path

from medlsdm.errors import ConfigError

DEFAULT_CATEGORIES: list[dict] = [
    {"id": "appearance", "question": "Realistic image appearance",
     "options": ["Not realistic", "Partly realistic, large unrealistic areas",
                 "Largely realistic, only minor unrealistic areas", "Realistic"]},
    {"id": "slice_consistency", "question": "Consistency between slices",
     "options": ["Inconsistent between most slices", "Consistent between some slices",
                 "Consistent between most slices", "Consistent between all slices"]},
    {"id": "anatomy", "question": "Anatomic correctness",
     "options": ["Major anatomic inconsistencies", "Several anatomic inconsistencies",
                 "Only minor anatomic inconsistencies", "No anatomic inconsistencies"]},
]

TURING_SOURCES = ("real", "synthetic")
TURING_CONFIDENCE = ["Guessing", "Fairly sure", "Certain"]  # scored 1..3

_ID = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,39}$")


def load_categories(spec: str | Path | None = "default") -> list[dict]:
    """The default categories, or those of a JSON/YAML file (checked)."""
    if spec is None or str(spec) == "default":
        return [dict(c, options=list(c["options"])) for c in DEFAULT_CATEGORIES]
    import yaml

    path = Path(spec)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))  # YAML reads JSON too
    except FileNotFoundError:
        raise ConfigError(f"--categories {path}: file not found") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"--categories {path}: not valid JSON/YAML ({str(exc).splitlines()[0]})") from None
    return check_categories(data, str(path))


def check_categories(data, source: str = "categories") -> list[dict]:
    if not isinstance(data, list) or not data:
        raise ConfigError(f"{source}: expected a non-empty list of {{id, question, options}}")
    out, seen = [], set()
    for i, c in enumerate(data):
        if not isinstance(c, dict) or set(c) - {"id", "question", "options"}:
            raise ConfigError(f"{source}: category {i + 1} must have exactly the keys id, question, options")
        cid, question, options = c.get("id"), c.get("question"), c.get("options")
        if not isinstance(cid, str) or not _ID.match(cid) or cid == "turing":
            raise ConfigError(f"{source}: category {i + 1}: id {cid!r} must be a short name of letters, digits "
                              f"and _ (not 'turing')")
        if cid in seen:
            raise ConfigError(f"{source}: category id {cid!r} appears twice")
        if not isinstance(question, str) or not question.strip():
            raise ConfigError(f"{source}: category {cid}: 'question' must be a text")
        if (not isinstance(options, list) or len(options) < 2
                or not all(isinstance(o, str) and o.strip() for o in options)):
            hint = (" (YAML reads unquoted yes/no/on/off as true/false: quote them)"
                    if isinstance(options, list) and any(isinstance(o, bool) for o in options) else "")
            raise ConfigError(f"{source}: category {cid}: 'options' must be a list of at least two texts{hint}")
        seen.add(cid)
        out.append({"id": cid, "question": question.strip(), "options": [o.strip() for o in options]})
    return out
