"""`medlsdm export`: write real and synthetic cases in the folder format of a segmentation
framework, to train a segmentation model on synthetic data (nnU-Net v2 raw datasets)."""

from __future__ import annotations

from medlsdm.commands.dataset_options import add_dataset_options, dataset_source


def register(subparsers) -> None:
    parser = subparsers.add_parser("export", help="export real + synthetic cases for segmentation training",
                                   description="Export real and synthetic cases for segmentation training.")
    sub = parser.add_subparsers(dest="export_format", metavar="FORMAT")
    sub.required = True
    p = sub.add_parser(
        "nnunet", help="nnU-Net v2 raw dataset (imagesTr/, labelsTr/, dataset.json)",
        description=(
            "Write OUT/DatasetNNN_NAME in nnU-Net v2 raw format: imagesTr/CASE_0000.nii.gz (one file per "
            "channel; 4D synthetic volumes are split), labelsTr/CASE.nii.gz (values renumbered 0..K-1 when "
            "needed), dataset.json and splits_final.json. Real cases are the training cases of --real (any "
            "dataset `medlsdm prepare` reads, or a prepared dataset); synthetic cases are the "
            "<case>_sample<k> volumes of `medlsdm sample` in --synthetic, named syn_<case>_<k>, with the "
            "label map of <case> from --labels (or from --real); those of test cases are left out. "
            "splits_final.json holds --folds cross-validation folds of whole subjects: a synthetic case "
            "shares the fold of the real case whose label map made it (copy the file to "
            "nnUNet_preprocessed/DatasetNNN_NAME/ after nnUNetv2_plan_and_preprocess). Written to a "
            "temporary folder, then renamed."),
    )
    p.add_argument("--real", metavar="DIR", help="real dataset (needed for --mix real; else gives label maps and names)")
    p.add_argument("--synthetic", metavar="DIR", help="folder of <case>_sample<k>.nii.gz from `medlsdm sample`")
    p.add_argument("--labels", metavar="DIR", help="label maps <case>.nii.gz the samples were generated from "
                                                   "(default: the real dataset's)")
    p.add_argument("--out", required=True, metavar="DIR", help="nnU-Net raw folder (e.g. $nnUNet_raw)")
    p.add_argument("--dataset-id", required=True, type=int, metavar="N", help="dataset number 1-999")
    p.add_argument("--name", required=True, help="dataset name (folder DatasetNNN_NAME)")
    p.add_argument("--mix", default="real,synthetic", help="cases to include: real,synthetic (default), real or synthetic")
    p.add_argument("--synthetic-per-case", type=int, metavar="K", help="at most K samples per case (lowest k first)")
    p.add_argument("--file-ending", default=".nii.gz", choices=[".nii.gz", ".nii"], help="default .nii.gz")
    p.add_argument("--channel-names", metavar="A,B", help="channel names for dataset.json, e.g. CT or T1,T2 "
                                                          "(nnU-Net normalises channels named CT differently)")
    p.add_argument("--table", metavar="JSON", help="labels.json or dataset.json naming the label values")
    p.add_argument("--folds", type=int, metavar="N",
                   help="cross-validation folds in splits_final.json, grouped by subject (default 5, fewer when "
                        "there are fewer subjects; 0: no file)")
    p.add_argument("--seed", type=int, default=0, help="seed for the fold assignment (default 0)")
    p.add_argument("--force", action="store_true", help="overwrite an existing dataset folder")
    add_dataset_options(p, "--real")
    p.set_defaults(func=run_nnunet)


def run_nnunet(args) -> int:
    from pathlib import Path

    from medlsdm.data.export import dataset_folder_name, export_nnunet
    from medlsdm.files import owned_target

    names = [n.strip() for n in args.channel_names.split(",")] if args.channel_names else None
    target = Path(args.out) / dataset_folder_name(args.dataset_id, args.name)
    # Locked, and never one of the inputs (export_nnunet replaces the dataset folder as a whole).
    with owned_target(target, inputs=[args.real, args.synthetic, args.labels], overwrite=True):
        result = export_nnunet(args.out, args.dataset_id, args.name, real=dataset_source(args.real, args),
                               synthetic=args.synthetic, labels=args.labels, mix=args.mix,
                               synthetic_per_case=args.synthetic_per_case, file_ending=args.file_ending,
                               channel_names=names, table=args.table, folds=args.folds, seed=args.seed,
                               force=args.force)
    print(f"wrote {result.path}: {result.count('real')} real + {result.count('synthetic')} synthetic cases, "
          f"channels {', '.join(result.channel_names)}")
    if result.left_out:
        print(f"left out {len(result.left_out)} synthetic volume(s) made from test label maps "
              f"(listed in medlsdm_export.json)")
    for note in result.notes:
        print(note)
    if result.folds:
        print(f"splits_final.json: {max(result.folds.values()) + 1} folds grouped by subject; copy it to "
              f"nnUNet_preprocessed/{result.path.name}/ after nnUNetv2_plan_and_preprocess")
    print("labels: " + ", ".join(f"{v} {n}" for v, n in sorted(result.label_table.names.items())))
    renumbered = {k: v for k, v in result.label_mapping.items() if k != v}
    if renumbered:
        print("label values renumbered for nnU-Net: " + ", ".join(f"{k}->{v}" for k, v in renumbered.items()))
    return 0
