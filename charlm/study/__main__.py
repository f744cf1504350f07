"""The command: python -m charlm.study --budget B [--conditions ...] (see the package's docstring)."""
import argparse
import math
import shlex
import sys
from pathlib import Path

import charlm.study
from charlm import cli
from charlm.config import add_config_args
from charlm.study import EXPERTS_CATEGORIES, EXPERTS_SPLIT, STUDY_OWNED
from charlm.study.stats import describe_statistics


def parse_args(argv: list[str]) -> argparse.Namespace:
    statistics = describe_statistics("the reference condition (base, or the first condition when base is not run)")
    parser = argparse.ArgumentParser(prog="python -m charlm.study",
                                     description=f"{charlm.study.__doc__}\nStatistics (results.md says the same):\n"
                                                 f"{statistics}\n",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    study = parser.add_argument_group("study")
    study.add_argument("--conditions", default="base,rope,tipa,deep",
                       help="comma-separated conditions, variants joined by + (default: base,rope,tipa,deep)")
    study.add_argument("--budget", type=float, required=True, help="per run, in --budget-unit")
    study.add_argument("--budget-unit", choices=["flops", "tokens"], default="flops")
    study.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 per condition (default 3)")
    study.add_argument("--out-dir", type=Path, help="the study folder, e.g. studies/NAME (required unless --plan-only)")
    study.add_argument("--only", action="append", default=[], metavar="CONDITION:SEED",
                       help="train and evaluate only this run (repeatable); collect the table without it")
    study.add_argument("--tokenization", choices=["bytes", "unicode"], default="bytes",
                       help="unicode: the report's code-point setting, dataset <dataset>-unicode")
    study.add_argument("--eval-batch-size", type=int, default=32, help="windows per forward pass in evaluation")
    study.add_argument("--plan-only", action="store_true", help="print each condition's steps and exit")
    study.add_argument("--experts-categories", default=EXPERTS_CATEGORIES,
                       help="experts:VARIANT: the dataset's categorisation (python -m charlm.categorize)")
    study.add_argument("--experts-order", help="experts:VARIANT: comma-separated categories to fine-tune on, in "
                                               "order (default: all, the categorisation's order)")
    study.add_argument("--experts-split", default=",".join(map(str, EXPERTS_SPLIT)), metavar="PRE,FINE,POST",
                       help="experts:VARIANT: shares of a run's steps for pre-training, all fine-tunes together "
                            "and post-training (default %(default)s)")
    add_config_args(parser.add_argument_group("training (applies to every run)"), exclude=STUDY_OWNED)
    args = parser.parse_args(argv)
    if args.seeds < 1 or not (math.isfinite(args.budget) and args.budget > 0):
        parser.error(f"--seeds must be positive ({args.seeds}) and --budget a positive finite number ({args.budget})")
    if args.out_dir is None and not args.plan_only:
        parser.error("--out-dir is required (the study folder, e.g. studies/NAME)")
    args.experts_split = parse_split(args.experts_split, parser)
    return args


def parse_split(text: str, parser: argparse.ArgumentParser) -> tuple[float, float, float]:
    try:
        split = tuple(float(v) for v in text.split(","))
    except ValueError:
        split = ()
    if len(split) != 3 or min(split) < 0 or split[0] == 0 or split[1] == 0 or sum(split) > 1 + 1e-9:
        parser.error(f"--experts-split {text}: expected PRE,FINE,POST shares, PRE and FINE > 0, summing to at most 1")
    return split


def _main(argv: list[str]) -> None:
    args = parse_args(argv)
    # Imported after parsing: --help and argument errors should not wait for torch to load.
    from charlm.study.command import plan_study, run_study
    from charlm.study.plan import describe_plan

    conditions, settings = plan_study(args)
    if args.plan_only:
        print(describe_plan(conditions, args.budget, args.budget_unit))
        return
    run_study(args, conditions, settings, "python -m charlm.study " + shlex.join(argv))


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    cli.run(lambda: _main(argv))


if __name__ == "__main__":
    main()
