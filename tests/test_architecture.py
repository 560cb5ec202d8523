"""The dependency rule of docs/architecture.md, checked from the source: which package of medlsdm
may import which (imports inside functions count too), and that inference runs without Lightning."""

import ast
import re
import subprocess
import sys
import tomllib
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "medlsdm"

BASE = {"errors", "files"}
# package -> the medlsdm packages it may import (besides itself); "evaluation.metrics" allows that
# module alone. Every package of the source tree must be listed here.
ALLOWED = {
    "errors": set(),
    "files": {"errors"},
    "config": BASE,
    "weights": BASE,
    "pretrained": BASE | {"weights"},
    "viz": BASE,
    "data": BASE | {"config"},
    "models": BASE | {"weights", "pretrained", "data"},
    "diffusion": BASE | {"models", "data"},
    "inference": BASE | {"config", "data", "models", "diffusion", "weights", "viz"},
    "web": BASE | {"data"},
    "evaluation": BASE | {"config", "data", "models", "diffusion", "weights", "pretrained", "viz", "inference", "web"},
    "readerstudy": BASE | {"data", "web", "viz", "evaluation"},
    "training": BASE | {"config", "data", "models", "diffusion", "weights", "pretrained", "viz", "inference",
                        "evaluation.metrics"},
    "demo": BASE | {"config", "data", "models", "diffusion", "weights", "pretrained", "viz", "inference", "evaluation",
                    "training",
                    "web"},
    "commands": None,   # the command line may import everything
    "cli": BASE | {"commands"},
}
FORBIDDEN_THIRD_PARTY = {"inference": {"lightning", "pytorch_lightning"}, "data": {"lightning", "pytorch_lightning"},
                         "models": {"lightning", "pytorch_lightning"}, "diffusion": {"lightning", "pytorch_lightning"},
                         "evaluation": {"lightning", "pytorch_lightning"}}


def _names(text: str, package: list[str]):
    """Absolute module names imported by source `text` of a module in `package` (e.g.
    ["medlsdm", "inference"]): ``from medlsdm import training`` counts as ``medlsdm.training``,
    relative imports are resolved against `package`."""
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            if module == "medlsdm":   # a submodule, or a name of medlsdm/__init__.py (__version__)
                yield from (f"medlsdm.{a.name}" if (SRC / a.name).is_dir() or (SRC / f"{a.name}.py").is_file()
                            else "medlsdm" for a in node.names)
            elif module:
                yield module


def _imports(path: Path):
    package = ["medlsdm", *path.parent.relative_to(SRC).parts] if path.is_relative_to(SRC) else ["medlsdm"]
    return _names(path.read_text(encoding="utf-8"), package)


def _package(path: Path) -> str:
    return path.relative_to(SRC).parts[0].removesuffix(".py")


def test_every_package_follows_the_dependency_rule():
    packages = {_package(p) for p in SRC.rglob("*.py") if p.name != "__init__.py" or p.parent != SRC}
    assert packages <= set(ALLOWED), f"packages without a rule: {sorted(packages - set(ALLOWED))}"
    broken = []
    for path in sorted(SRC.rglob("*.py")):
        if path.parent == SRC and path.name == "__init__.py":
            continue
        package = _package(path)
        for name in _imports(path):
            parts = name.split(".")
            if parts[0] != "medlsdm":
                if parts[0] in FORBIDDEN_THIRD_PARTY.get(package, set()):
                    broken.append(f"{path.relative_to(SRC)} imports {name}")
                continue
            if len(parts) == 1 or parts[1] == package or ALLOWED[package] is None:
                continue
            allowed = ALLOWED[package]
            if parts[1] not in allowed and ".".join(parts[1:3]) not in allowed:
                broken.append(f"{path.relative_to(SRC)} ({package}) imports {name}")
    assert not broken, "\n".join(broken)


def test_the_rule_check_catches_a_breach(tmp_path):
    """The checker itself: an inference module importing training code is reported."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from medlsdm.training.runner import fit\n    from medlsdm import evaluation\n",
                   encoding="utf-8")
    assert list(_imports(bad)) == ["medlsdm.training.runner", "medlsdm.evaluation"]
    assert list(_names("from .synthesis import decode\n", ["medlsdm", "inference"])) == ["medlsdm.inference.synthesis"]
    assert list(_names("from .. import training\n", ["medlsdm", "inference"])) == ["medlsdm.training"]
    assert "training" not in ALLOWED["inference"]


def test_inference_imports_no_lightning_and_no_training_code():
    code = ("import sys, medlsdm.inference, medlsdm.inference.labelmaps, medlsdm.inference.editing\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning') "
            "or m.startswith(('medlsdm.training', 'medlsdm.evaluation')))\n"
            "print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, encoding="utf-8",
                            errors="replace")
    assert result.returncode == 0, result.stdout + result.stderr


# import name -> distribution name, where they differ
DISTRIBUTIONS = {"PIL": "pillow", "yaml": "pyyaml", "sklearn": "scikit-learn", "SimpleITK": "simpleitk"}
USED_INDIRECTLY = {"tensorboard"}   # Lightning's TensorBoard logger needs it; nothing imports it by name


def test_runtime_dependencies_are_what_the_package_imports():
    imported = set()
    for path in SRC.rglob("*.py"):
        for name in _imports(path):
            top = name.split(".")[0]
            if top != "medlsdm" and top not in sys.stdlib_module_names:
                imported.add(DISTRIBUTIONS.get(top, top).lower())
    project = tomllib.loads((SRC.parents[1] / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    declared = {re.split(r"[<>=!~ \[]", r, maxsplit=1)[0].lower() for r in project["dependencies"]}
    assert imported <= declared, f"imported but not declared: {sorted(imported - declared)}"
    assert declared - USED_INDIRECTLY <= imported, f"declared but never imported: {sorted(declared - imported - USED_INDIRECTLY)}"
