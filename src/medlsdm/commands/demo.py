"""`medlsdm demo`: the whole pipeline on the built-in demo cohort, in minutes on a CPU."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser(
        "demo", help="run the whole pipeline on built-in data (cohort, model, samples, evaluation, report)",
        description=("Build the demo cohort from the MNI152 template shipped with nilearn, prepare it, take the "
                     "shipped demo model (or train one with --train), generate synthetic volumes from the "
                     "held-out label maps, evaluate them (quality, segmentation, privacy) and write NIfTI files, "
                     "pictures and a report. Re-running reuses what OUT already holds."))
    p.add_argument("--out", default="demo_output", help="output folder (default demo_output)")
    p.add_argument("--train", action="store_true", help="train both stages from scratch instead of the shipped model")
    p.add_argument("--budget-minutes", type=float, default=15.0,
                   help="training time for both stages together with --train (default 15)")
    p.add_argument("--steps", type=int, help="sampling steps (default: the model's)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_run)


def _run(args) -> int:
    import json
    import logging

    from medlsdm.demo import run_demo

    for name in ("lightning.pytorch", "lightning.fabric"):  # keep the demo's own progress readable
        logging.getLogger(name).setLevel(logging.WARNING)
    summary = run_demo(args.out, train=args.train, budget_minutes=args.budget_minutes, steps=args.steps,
                       seed=args.seed)
    print("\nmedlsdm demo — headline numbers")
    print(json.dumps(summary, indent=2))
    return 0
