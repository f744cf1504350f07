"""What the study command does once its flags are parsed: plan every condition, then train and evaluate."""
import argparse

from charlm.config import Config, given_flags
from charlm.runtime import distributed
from charlm.study import RUNTIME_FIELDS, STUDY_OWNED
from charlm.study.plan import (
    FLOPS_PER_TOKEN,
    Condition,
    ExpertOptions,
    StudyError,
    describe_plan,
    parse_conditions,
    plan_condition,
    study_dataset,
)
from charlm.study.report import write_results
from charlm.study.run import check_study_settings, run_all
from charlm.study.stats import reference_condition


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
