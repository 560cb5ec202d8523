"""The reader-study page: ``index.html`` (the study manifest embedded, so it works when opened as
a file) and ``app/`` with its script, style, our viewer script and the vendored NiiVue."""

from __future__ import annotations

import html
import json
from pathlib import Path

from medlsdm.files import atomic_output
from medlsdm.web import NIIVUE_FILES, asset_path

_APP = Path(__file__).parent / "app"


def _write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_page(folder: str | Path, study: dict) -> Path:
    """Write ``index.html`` and ``app/`` into ``folder``; returns the page's path."""
    folder = Path(folder)
    for name in ("study.js", "study.css"):
        _write_text(folder / "app" / name, (_APP / name).read_text(encoding="utf-8"))
    _write_text(folder / "app" / "viewer.js", asset_path("viewer.js").read_text(encoding="utf-8"))
    for name in NIIVUE_FILES:
        _write_text(folder / "app" / "niivue" / Path(name).name, asset_path(name).read_text(encoding="utf-8"))
    # JSON inside <script type="application/json">: only "</" could end the element early.
    data = json.dumps(study, indent=1).replace("</", "<\\/")
    page = ((_APP / "study.html").read_text(encoding="utf-8")
            .replace("__TITLE__", html.escape(study["title"])).replace("__STUDY_JSON__", data))
    _write_text(folder / "index.html", page)
    return folder / "index.html"
