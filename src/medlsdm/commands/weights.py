"""`medlsdm weights`: the pretrained networks the project can use (LPIPS, FID Inception,
MedicalNet), where each is looked for and whether it is there; `weights fetch NAME` downloads one
from its canonical URL and keeps it only when its SHA-256 is the published one; `weights import
NAME FILE` installs a local file (an allow-listed TorchScript Inception is converted to a state
dict)."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser("weights", help="list, fetch or import pretrained networks for metrics and losses",
                              description="Without a sub-command: list every pretrained network with its "
                                          "status (found / missing / hash mismatch), file, SHA-256, URL and "
                                          "licence. Files live in the torch hub cache "
                                          "($TORCH_HOME/hub/checkpoints).")
    p.set_defaults(func=_run_list)
    sub = p.add_subparsers(dest="weights_command", metavar="ACTION")
    fetch = sub.add_parser("fetch", help="download a network from its canonical URL and verify its SHA-256")
    fetch.add_argument("name", metavar="NAME")
    fetch.add_argument("--url", help="download from this URL instead (a mirror); the hash is still checked")
    fetch.set_defaults(func=_run_fetch)
    imp = sub.add_parser("import", help="install a local weight file (hash-checked; TorchScript Inception "
                                        "converted to a state dict)")
    imp.add_argument("name", metavar="NAME")
    imp.add_argument("file", metavar="FILE")
    imp.set_defaults(func=_run_import)


def _run_list(args: argparse.Namespace) -> int:
    from medlsdm.pretrained import hub_checkpoints, weights_status

    print(f"torch hub cache: {hub_checkpoints()}")
    for row in weights_status():
        where = f" at {row['path']}" if row["path"] else ""
        print(f"{row['name']:20s} {row['status']}{where}")
        print(f"    {row['description']}; licence {row['licence']}")
        for expected in row["expected"]:
            print(f"    file {expected}")
        print(f"    source: {row['url'] or 'no direct URL (see `medlsdm weights import`)'}")
    return 0


def _converter(name: str):
    if name == "inception-fid":
        from medlsdm.evaluation.features import inception_from_torchscript

        return inception_from_torchscript
    return None


def _run_fetch(args: argparse.Namespace) -> int:
    from medlsdm.pretrained import fetch_weights

    print(f"{args.name}: {fetch_weights(args.name, args.url)} (SHA-256 verified)")
    return 0


def _run_import(args: argparse.Namespace) -> int:
    from medlsdm.pretrained import import_weights

    print(f"{args.name}: {import_weights(args.name, args.file, _converter(args.name))}")
    return 0
