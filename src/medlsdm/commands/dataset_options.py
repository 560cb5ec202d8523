"""Command-line options shared by the commands that read a real dataset (`evaluate`, `export`):
how to read it, as `medlsdm prepare` does (layout, dataset preset, subjects)."""

from __future__ import annotations

import argparse

from medlsdm.commands.prepare import DATASET_PRESETS, LAYOUT_CHOICES


def add_dataset_options(parser: argparse.ArgumentParser, which: str) -> None:
    """--layout, --preset, --labels-dir, --subject-regex for the real dataset folder(s) named by `which`."""
    group = parser.add_argument_group(
        "reading the real dataset",
        f"{which} may be a flat folder of volumes, a dataset root in any layout `medlsdm prepare` reads "
        f"(multi-channel cases such as BraTS's 4 modalities stay one case) or a prepared dataset (its "
        f"original files, subjects and splits).")
    group.add_argument("--layout", choices=LAYOUT_CHOICES, default="auto",
                       help="dataset layout (default: the preset's, else detected)")
    group.add_argument("--preset", metavar="NAME", help=f"dataset preset giving layout and options ({DATASET_PRESETS})")
    group.add_argument("--labels-dir", metavar="DIR",
                       help="label maps named by case/patient ID replacing the layout's (autopet, synthrad2023), "
                            "as for prepare")
    group.add_argument("--subject-regex", metavar="REGEX",
                       help="subject of each case from its ID (group 'subject', else group 1, else the whole "
                            "match); default: the layout's subjects, or subjects.csv in the folder")


def dataset_source(path, args: argparse.Namespace, splits=None):
    """`path` with the dataset options of `args` (None stays None)."""
    if path is None:
        return None
    from medlsdm.data.sources import DatasetSource

    options = {"labels_dir": args.labels_dir} if args.labels_dir else {}
    return DatasetSource(path, layout=args.layout, preset=args.preset, options=options,
                         subject_regex=args.subject_regex, splits=splits)
