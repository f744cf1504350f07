"""The command: python -m charlm.experts [flags] and python -m charlm.experts report DIR (see the package's
docstring)."""
import argparse
import sys
from pathlib import Path

import charlm.experts
from charlm import cli
from charlm.config import add_config_args, config_from_args

# Flags of charlm.train that the scheme sets per stage.
STAGE_FIELDS = ("max_iters", "category", "init_from", "resume")


def scheme_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m charlm.experts", description=charlm.experts.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    scheme = parser.add_argument_group("the scheme")
    scheme.add_argument("--categories", required=True,
                        help="the dataset's categorisation to use: keywords, embed, import (see charlm.categorize)")
    scheme.add_argument("--pre-iters", type=int, help="pre-training steps on the full train split")
    scheme.add_argument("--from", dest="pre_from", type=Path, metavar="RUN",
                        help="start from this run's newest checkpoint instead")
    scheme.add_argument("--fine-iters", type=int, required=True, help="fine-tuning steps per category")
    scheme.add_argument("--post-iters", type=int, required=True, help="post-training steps per selected fine-tune")
    scheme.add_argument("--order", help="comma-separated categories to fine-tune on, in order (default: all, the "
                                        "report's order)")
    scheme.add_argument("--top-k", type=int, default=2, help="fine-tunes to post-train, by global val BPC (default 2)")
    add_config_args(parser.add_argument_group("training (charlm.train's flags)"), exclude=STAGE_FIELDS)
    return parser


def build_scheme(args: argparse.Namespace):
    """The scheme of the command line, every argument checked before any training."""
    # Imported here, as in _main: --help and argument errors should not wait for torch to load.
    from charlm.data import category_names, with_dataset
    from charlm.experts.scheme import (
        Scheme,
        SchemeError,
        check_subsets,
        checkpoint_step,
        parse_order,
        pretrained_checkpoint,
    )

    cfg = config_from_args(args)
    if args.keep_checkpoints is None:  # a stage needs only its newest: to resume it and to start the next
        cfg = cfg.replace(keep_checkpoints=1)
    if args.save_best is None:  # stages are judged by their final checkpoint, which the next one starts from
        cfg = cfg.replace(save_best=False)
    cfg, _ = with_dataset(cfg)  # a missing dataset names the command that prepares it
    if args.fine_iters < 1 or args.post_iters < 0:
        raise SchemeError(f"--fine-iters must be >= 1 and --post-iters >= 0, got {args.fine_iters} and "
                          f"{args.post_iters}")
    if (args.pre_from is None) == (args.pre_iters is None):
        raise SchemeError("give either --pre-iters (pre-train here) or --from RUN (start from an existing run)")
    if args.pre_iters is not None and args.pre_iters < 1:
        raise SchemeError(f"--pre-iters must be >= 1, got {args.pre_iters}")
    order = parse_order(args.order, category_names(cfg.dataset_dir, args.categories))
    if not 1 <= args.top_k <= len(order):
        raise SchemeError(f"--top-k must be in 1..{len(order)} (the number of fine-tunes), got {args.top_k}")
    pre_from = args.pre_from.resolve() if args.pre_from else None
    pre_iters = checkpoint_step(pretrained_checkpoint(pre_from, cfg)) if pre_from else args.pre_iters
    out_dir = Path(cfg.out_dir or f"runs/experts-{cfg.run_name}")
    scheme = Scheme(base=cfg.replace(out_dir=""), out_dir=out_dir,
                    categories=args.categories, order=order, pre_iters=pre_iters, fine_iters=args.fine_iters,
                    post_iters=args.post_iters, top_k=args.top_k, pre_from=pre_from)
    check_subsets(scheme)
    return scheme


def _main(argv: list[str]) -> None:
    if argv[:1] == ["report"]:
        parser = argparse.ArgumentParser(prog="python -m charlm.experts report",
                                         description="Write a scheme folder's report.md and finetune_curves.png.")
        parser.add_argument("scheme_dir", type=Path, help="the scheme's --out-dir")
        scheme_dir = parser.parse_args(argv[1:]).scheme_dir
        from charlm.experts.report import write_report
        print(write_report(scheme_dir))
        return
    scheme = build_scheme(scheme_parser().parse_args(argv))
    from charlm.experts.run import run_scheme
    from charlm.memory import plan_only
    from charlm.runtime import distributed

    if scheme.base.plan_only:
        print(plan_only(scheme.base).describe())
        return
    with distributed(scheme.base.device) as ctx:
        report = run_scheme(scheme, ctx)
    ctx.print(report)
    ctx.print(f"wrote {scheme.out_dir / 'report.md'} and {scheme.out_dir / 'finetune_curves.png'} (each stage's run "
              f"folder is under {scheme.out_dir}); python -m charlm.experts report {scheme.out_dir} writes them again")


def main(argv=None) -> None:
    cli.run(lambda: _main(sys.argv[1:] if argv is None else list(argv)))


if __name__ == "__main__":
    main()
