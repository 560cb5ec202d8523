"""Regenerate the pinned lock files from pyproject.toml (run by `make lock`).

    requirements.lock       what the package imports at run time (its dependencies)
    requirements-demo.lock  + the `demo` extra (nilearn: the MNI152 template of the demo cohort)
    requirements-test.lock  + the `test` extra (pytest, scikit-image, Playwright)

Each file lists only what the previous one lacks. pip resolves each set (`--dry-run --report`,
nothing installed) with the current pins as constraints, so versions move only when a
requirement asks for it; torch is left out (installed on its own first, CPU or CUDA build).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TORCH = "torch==2.13.0"
FILES = {"": "requirements.lock", "demo": "requirements-demo.lock", "test": "requirements-test.lock"}


def _resolve(requirements: list[str], constraints: Path) -> set[str]:
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
                        "--report", str(report), "-c", str(constraints), TORCH, *requirements], check=True)
        items = json.loads(report.read_text(encoding="utf-8"))["install"]
    return {f"{i['metadata']['name']}=={i['metadata']['version']}" for i in items
            if i["metadata"]["name"].lower() not in ("torch", "setuptools", "pip")}


def main() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    runtime = [r for r in project["dependencies"] if not r.startswith("torch")]
    extras = project["optional-dependencies"]
    with tempfile.TemporaryDirectory() as tmp:
        constraints = Path(tmp) / "constraints.txt"
        pins = [line for name in FILES.values() if (ROOT / name).is_file()
                for line in (ROOT / name).read_text(encoding="utf-8").splitlines() if "==" in line]
        constraints.write_text("\n".join(pins) + "\n", encoding="utf-8")
        base = _resolve(runtime, constraints)
        demo = _resolve(runtime + extras["demo"], constraints)
        test = _resolve(runtime + extras["demo"] + extras["test"], constraints)
    for name, pinned in ((FILES[""], base), (FILES["demo"], demo - base), (FILES["test"], test - demo)):
        lines = sorted(pinned, key=str.lower)
        (ROOT / name).write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
        print(f"{name}: {len(lines)} packages")


if __name__ == "__main__":
    main()
