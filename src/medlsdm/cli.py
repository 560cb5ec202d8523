"""The `medlsdm` command. Thin: parses arguments, then calls library functions.

Errors the user can cause (``MedlsdmError``, I/O and permission errors, a full disk, too little
memory) end in one line on stderr naming the file or option, and exit status 2; ``--debug``
also prints the traceback. Anything else is a bug and keeps its traceback.

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
    "medlsdm.commands.reader_study",
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
    parser.add_argument("--max-volume-gb", type=float, metavar="GB",
                        help="largest volume a reader allocates, from its header (default 4, or "
                             "$MEDLSDM_MAX_VOLUME_GB); larger files are refused before reading")
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


def user_error(exc: BaseException) -> str | None:
    """The one-line message for an error the user's input or environment caused (a file that
    cannot be read or written, a full disk, too little memory), or None for a bug (traceback)."""
    import errno

    if isinstance(exc, MedlsdmError):
        return str(exc)
    if isinstance(exc, OSError):
        reason = exc.strerror or str(exc) or type(exc).__name__
        if exc.errno == errno.ENOSPC:
            reason = "no space left on device"
        names = [str(n) for n in (exc.filename, exc.filename2) if n is not None]
        return f"{' -> '.join(names)}: {reason}" if names else reason
    if isinstance(exc, MemoryError) or (isinstance(exc, RuntimeError) and _is_out_of_memory(exc)):
        detail = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        return ("out of memory" + (f" ({detail})" if detail else "")
                + "; use smaller volumes, a smaller batch or patch size, or a machine with more memory")
    return None


def _is_out_of_memory(exc: RuntimeError) -> bool:
    text = str(exc).lower()
    return type(exc).__name__ == "OutOfMemoryError" or "out of memory" in text or "not enough memory" in text


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO, format="%(message)s")
    if args.max_volume_gb is not None:
        import os

        os.environ["MEDLSDM_MAX_VOLUME_GB"] = str(args.max_volume_gb)  # read by medlsdm.data.io
    _flush_subnormals()
    try:
        result = args.func(args)
    except KeyboardInterrupt:
        print("medlsdm: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        message = user_error(exc)
        if message is None:
            raise
        if args.debug:
            traceback.print_exc()
        print(f"medlsdm: error: {' '.join(message.split())}", file=sys.stderr)
        return 2
    return int(result or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
