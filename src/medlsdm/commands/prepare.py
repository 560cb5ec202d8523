"""`medlsdm prepare`: discover, check, preprocess and split a dataset folder into a prepared
dataset (manifest.json + images/*.npy + labels/*.npy) ready for training."""

from __future__ import annotations

import argparse

LAYOUT_CHOICES = ["auto", "generic", "nnunet", "brats", "autopet", "synthrad2023", "duke"]
DATASET_PRESETS = "brats, autopet, synthrad2023, duke, med-ddpm-head, demo"


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "prepare",
        help="turn a folder of images + label maps into a prepared dataset",
        description=(
            "Find image/label-map pairs by case ID in INPUT_DIR (layouts: generic images/ + labels/ "
            "[+ imagesTs/ + labelsTs/ as test split], nnU-Net v2, BraTS, autoPET, SynthRAD2023, Duke "
            "breast MRI), reorient to RAS, resample, crop/pad, normalise to [-1, 1], remap labels to "
            "0..K-1 and split by subject (seeded). Writes PREPARED/manifest.json, images/, labels/, "
            "prepare.yaml (resolved config) and unmatched.txt (files without a partner) into PREPARED, "
            "which must be new, empty or prepared before (then replaced); a failed run leaves it as it was."
        ),
    )
    parser.add_argument("input", metavar="INPUT_DIR", help="dataset folder")
    parser.add_argument("--out", required=True, metavar="PREPARED", help="output folder: new, empty, or an earlier prepared dataset (replaced)")
    parser.add_argument("--overwrite", action="store_true",
                        help="also write into a non-empty folder that is not a prepared dataset, or one above "
                             "INPUT_DIR (only the prepared dataset's entries are replaced; inputs never are)")
    parser.add_argument("--layout", choices=LAYOUT_CHOICES, default=None,
                        help="dataset layout (default: the preset's, else detected)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--preset", metavar="NAME", help=f"dataset preset ({DATASET_PRESETS})")
    source.add_argument("--config", metavar="YAML",
                        help="YAML file with a prepare: section (a preset name works here too)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a setting, e.g. --set shape=[64,64,64] or --set split.counts=[null,10,10] "
                             "(repeatable)")
    parser.add_argument("--seed", type=int, default=None, help="split seed (default: split.seed, 0)")
    parser.add_argument("--skip-bad", action="store_true",
                        help="skip cases that cannot be read or prepared (listed in the manifest) instead of stopping")
    parser.add_argument("--labels-dir", metavar="DIR",
                        help="folder of label maps named by case/patient ID (synthrad2023, autopet)")
    parser.add_argument("--modality", choices=["ct", "mr"], default=None,
                        help="intensity normalisation (ct: HU window, mr: percentiles); synthrad2023 also "
                             "picks ct.nii.gz or mr.nii.gz with it")
    parser.add_argument("--image-pattern", metavar="TEXT",
                        help="duke: pick the image file whose name contains TEXT when a patient has several "
                             "(default: pre)")
    parser.add_argument("--label-pattern", metavar="TEXT",
                        help="duke: pick the segmentation whose name contains TEXT (default: Dense_and_Vessels)")
    parser.add_argument("--subject-regex", metavar="REGEX",
                        help="subject (patient) of each case, searched in its case ID: group 'subject', else "
                             "group 1, else the whole match (e.g. '^(sub-[0-9]+)_'); default: the layout's "
                             "subjects, or subjects.csv (case_id,subject_id) in INPUT_DIR")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from medlsdm.data.prepare import prepare_dataset

    overrides = list(args.overrides)
    if args.modality is not None:
        overrides.append(f"modality={args.modality}")
    options = {key: value for key, value in (("labels_dir", args.labels_dir), ("image_pattern", args.image_pattern),
                                             ("label_pattern", args.label_pattern)) if value is not None}
    prepare_dataset(args.input, args.out, config=args.preset or args.config, overrides=overrides,
                    layout=args.layout, seed=args.seed, skip_bad=args.skip_bad, progress=not args.no_progress,
                    subject_regex=args.subject_regex, overwrite=args.overwrite, **options)
    return 0
