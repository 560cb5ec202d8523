"""`medlsdm reader-study build|serve|score`: human evaluation of synthetic volumes in a browser."""

from __future__ import annotations


def register(sub) -> None:
    rs = sub.add_parser("reader-study", help="blinded reader study: build it, serve it, score the answers",
                        description="Human evaluation: experts rate real and synthetic volumes, shown "
                                    "blinded in a web page, and say which they think are synthetic.")
    kinds = rs.add_subparsers(dest="step", metavar="STEP")
    kinds.required = True

    b = kinds.add_parser("build", help="build a blinded study folder with its web page",
                         description="Sample N real and N synthetic volumes (seeded), resample them onto "
                                     "one grid, normalise their intensities the same way, rename them to "
                                     "opaque IDs in a random order and write a static web page that shows "
                                     "them and asks the questions. The un-blinding key is written apart.")
    b.add_argument("--real", required=True, help="real volumes (flat folder, or images/ [+ labels/])")
    b.add_argument("--synthetic", required=True, help="synthetic volumes (flat folder or images/)")
    b.add_argument("--n", type=int, required=True, help="volumes of each kind (the study shows 2N)")
    b.add_argument("--out", required=True, help="study folder to create (what readers get)")
    b.add_argument("--key", help="un-blinding key to write (default OUT-key.json beside the folder; "
                                 "never inside it)")
    b.add_argument("--seed", type=int, default=0, help="seed of the sampling, the order and the IDs (default 0)")
    b.add_argument("--categories", default="default",
                   help="'default' (medicaldiffusion's three 4-point categories) or a JSON/YAML file "
                        "with a list of {id, question, options}")
    b.add_argument("--turing", action="store_true", help="also ask 'real or synthetic?' with a confidence")
    b.add_argument("--shape", type=int, help="voxels per side of the common grid (default: the largest "
                                             "side among the volumes, at most 160)")
    b.add_argument("--channel", type=int, default=0, help="channel shown for multi-channel volumes (default 0)")
    b.add_argument("--title", default="Reader study", help="title shown on the page")
    b.add_argument("--overwrite", action="store_true", help="replace an existing study folder and key")
    b.set_defaults(func=_run_build)

    s = kinds.add_parser("serve", help="serve a study folder on localhost",
                         description="Serve STUDY over http on this machine only (the page also works "
                                     "opened directly as a file). Ctrl-C stops it.")
    s.add_argument("study", help="study folder written by `reader-study build`")
    s.add_argument("--port", type=int, default=8765, help="port (default 8765; 0 = any free port)")
    s.set_defaults(func=_run_serve)

    c = kinds.add_parser("score", help="statistics of the readers' answers, with a report",
                         description="Rating distributions real vs synthetic per category, Turing-test "
                                     "accuracy with a binomial confidence interval and test against chance, "
                                     "inter-reader agreement (Cohen's and Fleiss' kappa); per reader and "
                                     "pooled; score.json, report.md, report.html and plots in --out.")
    c.add_argument("study", help="study folder")
    c.add_argument("--answers", nargs="+", required=True, help="answer files exported by the page (JSON or CSV)")
    c.add_argument("--key", required=True, help="the study's key (written by `reader-study build`)")
    c.add_argument("--out", required=True, help="output folder")
    c.add_argument("--overwrite", action="store_true", help="replace score.json and a report already in --out")
    c.set_defaults(func=_run_score)


def _run_build(args) -> int:
    from medlsdm.readerstudy.build import build_study, default_key_path

    study = build_study(args.real, args.synthetic, args.n, args.out, seed=args.seed, categories=args.categories,
                        turing=args.turing, key=args.key, shape=args.shape, channel=args.channel,
                        title=args.title, overwrite=args.overwrite)
    grid = study["grid"]
    print(f"study {study['study_id']}: {len(study['items'])} volumes on a {grid['shape'][0]}^3 grid of "
          f"{grid['spacing_mm']:.3g} mm in {args.out} (open {args.out}/index.html)")
    print(f"key (keep it from the readers): {args.key or default_key_path(args.out)}")
    return 0


def _run_serve(args) -> int:
    from medlsdm.readerstudy.serve import serve_study

    serve_study(args.study, port=args.port)
    return 0


def _run_score(args) -> int:
    from medlsdm.readerstudy.score import score_study

    result = score_study(args.study, args.answers, args.key, args.out, overwrite=args.overwrite)
    for reader, res in result["turing"]["per_reader"].items():
        print(f"{reader}: Turing accuracy {res['accuracy']:.3f} (95% CI {res['ci95'][0]:.3f}–{res['ci95'][1]:.3f}, "
              f"p = {res['p_value']:.3g}, n = {res['n']})")
    print(f"report: {args.out}/report.html")
    return 0
