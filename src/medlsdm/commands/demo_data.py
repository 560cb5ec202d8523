"""`medlsdm demo-data`: write the built-in demo cohort (synthetic brain MRIs + tissue label maps
made offline from the MNI ICBM152 template shipped with nilearn)."""

from __future__ import annotations

import argparse
import logging

log = logging.getLogger(__name__)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo-data",
        help="write a small synthetic brain MRI cohort with tissue label maps (offline)",
        description=(
            "Write a demo cohort of synthetic skull-stripped T1-weighted brain MRIs with 4-class "
            "tissue label maps (0 background, 1 CSF/other brain, 2 grey matter, 3 white matter), made "
            "by randomly deforming the MNI ICBM152 2009 template shipped with nilearn. Layout: "
            "OUT/images, OUT/labels (training), OUT/imagesTs, OUT/labelsTs (test), labels.json, "
            "dataset.json, README.txt; ready for `medlsdm prepare`."
        ),
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder (new, empty or an earlier demo cohort)")
    parser.add_argument("--n-subjects", type=int, default=24, metavar="N", help="number of subjects in all (default 24)")
    parser.add_argument("--n-test", type=int, default=4, metavar="N", help="how many of them (the last ones) form the test split (default 4)")
    parser.add_argument(
        "--shape", type=int, nargs="+", default=[64], metavar="N",
        help="voxels per axis in the files' (X, Y, Z) order: one value for a cube or three (default 64)",
    )
    parser.add_argument(
        "--spacing", type=float, nargs="+", default=[3.0], metavar="MM", help="voxel size in mm: one value or three (default 3)"
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed; subject i depends only on the seed and i (default 0)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from medlsdm.data.demo import write_demo_cohort
    from medlsdm.errors import ConfigError

    for option, values in (("--shape", args.shape), ("--spacing", args.spacing)):
        if len(values) not in (1, 3):
            raise ConfigError(f"{option}: give one value or three, got {len(values)}")
    out = write_demo_cohort(
        args.out,
        n_subjects=args.n_subjects,
        n_test=args.n_test,
        shape=args.shape[0] if len(args.shape) == 1 else args.shape,
        spacing=args.spacing[0] if len(args.spacing) == 1 else args.spacing,
        seed=args.seed,
    )
    log.info("demo cohort: %d training + %d test subjects written to %s", args.n_subjects - args.n_test, args.n_test, out)
    return 0
