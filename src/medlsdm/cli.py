"""The `medlsdm` command. Thin: parses arguments, then calls library functions.

Each sub-command lives in ``medlsdm.commands.<name>`` with a ``register(subparsers)`` function
that adds its parser and sets ``func`` (called with the parsed arguments). Heavy libraries are
imported inside those functions, so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import traceback

from medlsdm import __version__
from medlsdm.errors import MedlsdmError

# Order is the order shown in --help.
COMMAND_MODULES: list[str] = [
    "medlsdm.commands.demo_data",
    "medlsdm.commands.prepare",
    "medlsdm.commands.inspect",
    "medlsdm.commands.labels",
    "medlsdm.commands.train",
    "medlsdm.commands.sample",
    "medlsdm.commands.evaluate",
    "medlsdm.commands.weights",
    "medlsdm.commands.export",
    "medlsdm.commands.demo",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medlsdm",
        description="3D semantic medical image synthesis from label maps (latent semantic diffusion).",
    )
    parser.add_argument("--version", action="version", version=f"medlsdm {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def _flush_subnormals() -> None:
    """Treat subnormal floats as zero on the CPU: small activations of the networks fall into that
    range, where x86 arithmetic is many times slower (sampling the demo model: 3.3x), and no result
    here depends on values below 1e-38."""
    import torch

    torch.set_flush_denormal(True)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO, format="%(message)s")
    _flush_subnormals()
    try:
        result = args.func(args)
    except MedlsdmError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"medlsdm: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("medlsdm: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
