"""The command: python -m charlm.study --budget B [--conditions ...] (see the package's docstring)."""
import argparse
import math
import shlex
import sys
from pathlib import Path

import charlm.study
from charlm import cli
from charlm.config import Config, add_config_args, given_flags
from charlm.runtime import distributed
from charlm.study.plan import (EXPERTS_SPLIT, FLOPS_PER_TOKEN, Condition, ExpertOptions, StudyError, describe_plan,
                               parse_conditions, plan_condition, study_dataset)
from charlm.study.report import write_results
from charlm.study.run import check_study_settings, run_all
from charlm.study.stats import describe_statistics, reference_condition

# Config fields the study sets itself, so they are not flags here.
STUDY_OWNED = ("variant", "max_iters", "seed", "out_dir", "resume", "init_from", "plan_only", "category")
# Flags that may change between invocations of one study without changing its results.
RUNTIME_FIELDS = ("device", "compile", "compile_mode", "attn", "rope_impl", "max_memory_gb", "micro_batch_size",
                  "checkpoint_layers", "log_interval", "keep_checkpoints", "data_root")


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
    study.add_argument("--experts-categories", default=ExpertOptions.categories,
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


def config_overrides(args: argparse.Namespace) -> dict:
    """The training flags given on the command line (preset apart), model flags included, as Config overrides."""
    # --out-dir and --plan-only are the study's own flags, under the names of Config fields.
    given = {k: v for k, v in given_flags(args).items() if k not in STUDY_OWNED + ("preset",)}
    # One rolling checkpoint to resume from (plus the trainer's best.pt) unless asked: 15 runs add up.
    return {"keep_checkpoints": 1, **given}


def parse_only(only: list[str], conditions: list[str], seeds: list[int]) -> list[tuple[str, int]]:
    picked = []
    for item in only:
        name, _, seed = item.rpartition(":")
        if name not in conditions or not seed.isdigit() or int(seed) not in seeds:
            raise StudyError(f"--only {item}: expected CONDITION:SEED with a condition of --conditions "
                             f"({', '.join(conditions)}) and a seed in 0..{len(seeds) - 1}")
        picked.append((name, int(seed)))
    return picked


def plan_study(args: argparse.Namespace) -> tuple[list[Condition], dict]:
    """Every check and the steps of each condition, before anything is trained; and the study's settings."""
    overrides = config_overrides(args)
    overrides["dataset"] = study_dataset(overrides.get("dataset", Config.dataset),
                                         overrides.get("data_root", Config.data_root), args.tokenization)
    experts = ExpertOptions(args.experts_categories, args.experts_order, args.experts_split)
    conditions = [plan_condition(n, args.budget, args.budget_unit, args.preset or "", overrides, experts)
                  for n in parse_conditions(args.conditions)]
    settings = {"flops_per_token": FLOPS_PER_TOKEN, "tokenization": args.tokenization, "budget": args.budget,
                "budget_unit": args.budget_unit, "preset": args.preset or "",
                "experts_categories": experts.categories, "experts_order": experts.order,
                "experts_split": list(experts.split),
                **{k: v for k, v in overrides.items() if k not in RUNTIME_FIELDS}}
    return conditions, settings


def run_study(args: argparse.Namespace, conditions: list[Condition], settings: dict, command: str) -> None:
    names, seeds = [c.name for c in conditions], list(range(args.seeds))
    only = parse_only(args.only, names, seeds)
    with distributed(conditions[0].cfg.device) as ctx:
        if ctx.is_master:
            check_study_settings(args.out_dir, settings)
        ctx.print(describe_plan(conditions, args.budget, args.budget_unit))
        if only:
            for c in conditions:
                if chosen := [s for n, s in only if n == c.name]:
                    run_all([c], chosen, args.out_dir, ctx, args.eval_batch_size)
            ctx.print("run the same command without --only to collect the table once every run is done")
            return
        records = run_all(conditions, seeds, args.out_dir, ctx, args.eval_batch_size)
        if ctx.is_master:
            reference = reference_condition(names)
            table = write_results(records, reference, {"name": args.out_dir.name, **settings}, args.out_dir, command)
            print(f"\n{table}\n\nwrote {args.out_dir / 'results.md'} and {args.out_dir / 'results.png'}")


def _main(argv: list[str]) -> None:
    args = parse_args(argv)
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
