"""Pages that open in a browser, offline: the vendored NiiVue viewer (``vendor/niivue``, BSD-2),
our own viewer script around it (``viewer.js``), volumes encoded for embedding (``volumes``) and
the interactive viewer of the evaluation reports (``viewer``)."""

from __future__ import annotations

from importlib import resources

NIIVUE_VERSION = "0.69.0"
NIIVUE_FILES = ("vendor/niivue/niivue.umd.js", "vendor/niivue/LICENSE")


def asset_path(name: str):
    """A file shipped in this package (a Traversable: ``read_text`` / ``read_bytes``)."""
    return resources.files("medlsdm.web") / name


def asset_text(name: str) -> str:
    return asset_path(name).read_text(encoding="utf-8")


def inline_script(text: str) -> str:
    """A ``<script>`` element holding ``text``; a literal ``</script`` inside it would end the
    element early, so it is escaped (valid in JavaScript strings and comments)."""
    return "<script>" + text.replace("</script", "<\\/script") + "</script>"


def script_bundle() -> str:
    """NiiVue and the viewer script as inline ``<script>`` elements, for single-file pages."""
    return inline_script(asset_text("vendor/niivue/niivue.umd.js")) + "\n" + inline_script(asset_text("viewer.js"))
