"""Reproduce the report's results table at equal compute, with seeds and error bars.

    python -m charlm.study --dataset enwik8 --conditions base,rope,tipa,deep,deep+rope --budget 1.3e16 \
        --seeds 3 --out-dir studies/report                       # every run in sequence, then the table
    python -m charlm.study ... --plan-only                       # each condition's steps; nothing is trained
    python -m charlm.study ... --only deep+rope:1                # one run (one job per GPU); the same command
                                                                 # without --only then collects the table
    python -m charlm.study ... --budget 4e7 --budget-unit tokens # equal tokens instead of equal FLOPs
    python -m charlm.study ... --tokenization unicode             # the report's setting (data/enwik8-unicode)
    python -m charlm.study ... --preset tiny --batch-size 8       # any training flag applies to every run
    python -m charlm.study ... --conditions base,experts:base     # the expert scheme's row (charlm.experts)

A condition is a `--variant` combination with `+` between variants (`deep+rope`); conditions are
separated by commas. Every run is an ordinary charlm.train run in `OUT_DIR/runs/<condition>-s<seed>/`,
trained in sequence (data-parallel over the ranks under torchrun); running the command again skips
finished runs (result.json written) and resumes interrupted ones. Runs keep one rolling checkpoint
(`--keep-checkpoints 1` unless given) besides the trainer's best.pt. OUT_DIR/study.json records the
settings: a re-run with another budget or config is refused rather than mixed with finished runs.

Equal compute. The budget is the same for every run: training FLOPs (default) or tokens. A condition's
FLOPs per token come from `GPT.flops_per_token` (6 (N - V C) + 6 * L * T * C, charlm.model), its tokens per step
are batch_size * block_size, and it trains for floor(budget / (FLOPs per token * tokens per step)) steps,
so that no run exceeds the budget: DEEP gets fewer steps than BASE. The LR schedule of each run decays
over its own steps (warm-up stays warmup_iters steps), so every condition gets a complete schedule.
Note that a preset is applied after the variants: with `--preset tiny`, deep has tiny's depth and context.

`experts:VARIANT` runs charlm.experts' scheme (pre-training, one fine-tune per topic subset in order,
post-training of the fine-tune with the best val BPC) in the run folder, its steps split by
`--experts-split` (default 0.5,0.4,0.1 of the run's steps); the row is the post-trained model, and its
steps count everything spent to produce it: pre-training, every fine-tune (all are needed to choose one)
and post-training. The scheme's own equal-compute control also runs (see the run's report.md).

What is reported. val and test BPC are full passes over each split (charlm.eval: windows of the model's
own block size, every character scored once), next-character loss only: TIPA's auxiliary loss is a
training signal and never counts. The evaluated checkpoint is chosen without looking at test: a run's
`best.pt` (the trainer keeps the weights of its best val estimate), or the final checkpoint if best.pt
is missing or corrupt; an experts run's final post-training checkpoint. Test BPC is the headline: val
took part in the selection. results.png plots the trainer's val estimates against training FLOPs.

Statistics (documented in results.md too):
- mean ± sample standard deviation (ddof = 1) over seeds; with one seed the spread is n/a.
- the difference from the reference condition (`base`, or the first condition when base is not run)
  is mean(condition) - mean(reference) of test BPC with a 95% Welch t-interval: the seeds of two
  conditions are treated as independent samples with unequal variances, degrees of freedom by
  Welch-Satterthwaite, the t quantile computed here (no SciPy). Seed s gives two conditions at most the
  same data order (not when their block sizes differ) and different initial weights, so the runs are
  not treated as paired; the unpaired interval is the conservative choice. With fewer than two seeds in
  either condition the interval is n/a. With 3 seeds the interval is wide; it is meant to be.
- the figure's band is the min-max over seeds (with 3 seeds a standard deviation says little).
"""
import argparse
import dataclasses
import importlib
import json
import math
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from charlm.checkpoint import best_checkpoint
from charlm.config import Config, add_config_args, resolve
from charlm.data import DataError, load_meta, prepare_command, read_categories
from charlm.eval import evaluate
from charlm.io import atomic_write, atomic_write_text
from charlm.model import flops_per_token, parameter_counts, position_parameters
from charlm.runlog import read_metrics
from charlm.memory import MemoryPlanError
from charlm.checkpoint import RunStopped
from charlm.data import with_dataset
from charlm.runtime import DistContext, init_distributed
from charlm.trainer import train

REFERENCE = "base"  # the condition differences are measured from, when it is run
# GPT.flops_per_token's formula, kept in study.json: a study planned with another count of FLOPs (older
# charlm counted the token-embedding lookup) would mix step counts, so it is refused.
FLOPS_PER_TOKEN = "6 (N - V C) + 6 L T C"
EXPERTS_PREFIX = "experts:"  # `experts:VARIANT` conditions come from charlm.experts (issue 7)
CONFIDENCE = 0.95
UNITS = {"flops": "FLOPs", "tokens": "tokens"}  # --budget-unit, as printed
# experts:VARIANT: shares of a run's steps for pre-training, all fine-tunes together, and post-training
EXPERTS_SPLIT = (0.5, 0.4, 0.1)
ExpertOptions = tuple[str, str | None, tuple[float, float, float]]  # categorisation, order (None: all), split
# Config fields the study sets itself, so they are not flags here.
STUDY_OWNED = ("variant", "max_iters", "seed", "out_dir", "resume", "init_from", "plan_only", "category")
# Flags that may change between invocations of one study without changing its results.
RUNTIME_FIELDS = ("device", "compile", "compile_mode", "attn", "rope_impl", "max_memory_gb", "micro_batch_size",
                  "checkpoint_layers", "log_interval", "keep_checkpoints", "data_root")


class StudyError(ValueError):
    pass


# --- planning: conditions, budget, steps -----------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class SchemePlan:
    """How an `experts:VARIANT` run spends its steps: charlm.experts' stages (pre, fine-tunes, post)."""
    categories: str  # the dataset's categorisation (charlm.categorize)
    order: tuple[str, ...]  # the categories fine-tuned on, in order
    pre_iters: int
    fine_iters: int  # per category
    post_iters: int  # on the full train split, from the fine-tune with the best val BPC

    @property
    def steps(self) -> int:
        """What producing the reported model costs: pre-training, every fine-tune (to choose one), post-training."""
        return self.pre_iters + len(self.order) * self.fine_iters + self.post_iters


@dataclasses.dataclass(frozen=True)
class Condition:
    name: str  # as given on the command line, e.g. "deep+rope" or "experts:base"
    cfg: Config  # resolved, dataset attached; seed, max_iters and out_dir are set per run
    params: int  # non-embedding-position parameters, as in flops_per_token
    flops_per_token: float  # training FLOPs per token (6 (N - V C) + 6 * L * T * C)
    steps: int  # optimizer steps that fit the budget
    scheme: SchemePlan | None = None  # experts:VARIANT only

    @property
    def tokens_per_step(self) -> int:
        return self.cfg.batch_size * self.cfg.model.block_size

    @property
    def tokens(self) -> int:
        return self.steps * self.tokens_per_step

    @property
    def flops(self) -> float:
        return self.steps * self.tokens_per_step * self.flops_per_token


def parse_conditions(text: str) -> list[str]:
    names = [c.strip() for c in text.split(",")]
    if not any(names):
        raise StudyError("--conditions is empty; give e.g. base,rope,tipa,deep,deep+rope")
    if not all(names):
        raise StudyError(f"--conditions {text!r} has an empty name (two commas, or one at an end)")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise StudyError(f"--conditions names {', '.join(duplicates)} more than once")
    return names


def cost_per_step(unit: str, flops_per_token: float, tokens_per_step: int) -> float:
    """What one optimizer step spends of the budget, in its unit."""
    return tokens_per_step * (flops_per_token if unit == "flops" else 1)


def model_size(cfg: Config) -> tuple[int, float]:
    """(parameters less the position table, as nanoGPT counts them; training FLOPs per token)."""
    return parameter_counts(cfg.model)[0] - position_parameters(cfg.model), flops_per_token(cfg.model)


def plan_condition(name: str, budget: float, unit: str, preset: str, overrides: dict,
                   experts: ExpertOptions = ("keywords", None, EXPERTS_SPLIT)) -> Condition:
    """A condition's config and its steps under the budget (for experts:VARIANT, split between the stages)."""
    try:
        cfg = resolve(name.removeprefix(EXPERTS_PREFIX).replace("+", ","), preset, **overrides)
    except ValueError as e:
        raise StudyError(f"condition {name!r}: {e}") from e
    cfg, _ = with_dataset(cfg)
    params, flops_per_token = model_size(cfg)
    per_step = cost_per_step(unit, flops_per_token, cfg.batch_size * cfg.model.block_size)
    steps = math.floor(budget / per_step)  # rounded down: no run exceeds the budget
    if steps < 1:
        hint = " or use --budget-unit tokens" if unit == "flops" else ""
        raise StudyError(f"a budget of {budget:.3g} {UNITS[unit]} buys no step of {name!r} "
                         f"({per_step:.3g} {UNITS[unit]} per step); raise --budget{hint}")
    if not name.startswith(EXPERTS_PREFIX):
        return Condition(name, cfg, params, flops_per_token, steps)
    scheme = plan_scheme(name, cfg, steps, *experts)
    return Condition(name, cfg, params, flops_per_token, scheme.steps, scheme)


def experts_module(name: str):
    try:
        return importlib.import_module("charlm.experts")
    except ModuleNotFoundError as e:
        raise StudyError(f"condition {name!r}: the expert scheme's rows come from charlm.experts (issue 7), which "
                         f"is not available in this checkout; leave {name!r} out of --conditions") from e


def plan_scheme(name: str, cfg: Config, steps: int, categories: str, order: str | None,
                split: tuple[float, float, float]) -> SchemePlan:
    """Split a run's steps between the scheme's stages; the categorisation and its subsets are checked here."""
    experts = experts_module(name)
    names = [c["name"] for c in read_categories(cfg.dataset_dir, categories)["categories"]]
    order = experts.parse_order(order, names)
    pre_share, fine_share, post_share = split
    plan = SchemePlan(categories, tuple(order), math.floor(steps * pre_share),
                      math.floor(steps * fine_share / len(order)), math.floor(steps * post_share))
    if plan.pre_iters < 1 or plan.fine_iters < 1:
        raise StudyError(f"condition {name!r}: {steps} steps split {split} leave {plan.pre_iters} for pre-training "
                         f"and {plan.fine_iters} per fine-tune ({len(order)} categories); raise --budget")
    experts.check_subsets(expert_scheme(experts, cfg, plan, Path(".")))
    return plan


def expert_scheme(experts, cfg: Config, plan: SchemePlan, out_dir: Path):
    """charlm.experts' Scheme of one run; top_k = 1: the study reports one model per run."""
    return experts.Scheme(base=cfg.replace(out_dir=""), out_dir=Path(out_dir),
                          categories=plan.categories, order=list(plan.order), pre_iters=plan.pre_iters,
                          fine_iters=plan.fine_iters, post_iters=plan.post_iters, top_k=1)


def describe_plan(conditions: list[Condition], budget: float, unit: str) -> str:
    header = (f"  {'condition':<14} {'params':>8} {'FLOPs/token':>12} {'tokens/step':>12} {'steps':>9} "
              f"{'tokens':>8} {'FLOPs':>10}")
    lines = [f"budget per run: {budget:.3g} training {UNITS[unit]}", header]
    for c in conditions:
        lines.append(f"  {c.name:<14} {_count(c.params):>8} {c.flops_per_token:>12.3e} {c.tokens_per_step:>12,} "
                     f"{c.steps:>9,} {_count(c.tokens):>8} {c.flops:>10.3e}")
    lines.append("equal " + ("compute" if unit == "flops" else "tokens") + ": "
                 + ", ".join(f"{c.name} gets {c.steps:,} steps" for c in conditions))
    for c in conditions:
        if p := c.scheme:
            lines.append(f"{c.name}: pre-training {p.pre_iters:,} + {len(p.order)} fine-tunes x {p.fine_iters:,} "
                         f"+ post-training {p.post_iters:,} steps ({p.categories} categories; the scheme's "
                         f"equal-compute control trains {c.steps - p.pre_iters:,} more)")
    return "\n".join(lines)


def study_dataset(dataset: str, data_root: str, tokenization: str) -> str:
    """The dataset folder name for a tokenization; a missing one names the command that prepares it."""
    name = dataset if tokenization == "bytes" else f"{dataset}-unicode"
    folder = Path(data_root) / name
    try:
        meta = load_meta(folder)
    except DataError:
        command = prepare_command(folder)
        if tokenization == "unicode" and "--tokenization" not in command:
            command += " --tokenization unicode"
        raise StudyError(f"no prepared dataset at {folder} (--tokenization {tokenization}): "
                         f"prepare it with `{command}`") from None
    if meta["tokenization"] != tokenization:
        raise StudyError(f"{folder} is tokenized as {meta['tokenization']}, not {tokenization}; "
                         f"pick the tokenization with --tokenization and the source with --dataset")
    return name


def check_study_settings(out_dir: Path, settings: dict) -> None:
    """Refuse to mix runs of different budgets or configs in one folder: finished runs would not match."""
    path = out_dir / "study.json"
    if path.is_file():
        saved = json.loads(path.read_text())
        differ = [f"{k}: {_show(saved.get(k))} there, {_show(settings.get(k))} now"
                  for k in sorted(set(saved) | set(settings)) if saved.get(k) != settings.get(k)]
        if differ:
            raise StudyError(f"{out_dir} holds a study with other settings ({'; '.join(differ)}); "
                             f"use another --out-dir")
    atomic_write_text(path, json.dumps(settings, indent=2) + "\n")


def _show(value) -> str:
    return "unset" if value is None else f"{value:g}" if isinstance(value, float) else repr(value)


# --- running --------------------------------------------------------------------------------------

def run_dir(out_dir: Path, condition: str, seed: int) -> Path:
    return Path(out_dir) / "runs" / f"{condition.replace(':', '-')}-s{seed}"


def run_config(c: Condition, seed: int, out_dir: Path) -> Config:
    """The charlm.train config of one run; resume=True starts it fresh or continues an interrupted one."""
    return c.cfg.replace(seed=seed, max_iters=c.steps, resume=True,
                               out_dir=str(run_dir(out_dir, c.name, seed)))


def selected_checkpoint(run: Path) -> tuple[Path | None, str]:
    """The checkpoint to report, chosen on val only: the trainer's intact best.pt, else the newest (final) one."""
    best = best_checkpoint(run)
    return (best, "best val estimate") if best is not None else (None, "final")


def new_record(c: Condition, seed: int, **result) -> dict:
    """A run's line in the study: its plan and `result` (checkpoint_step, selection, val_bpc, test_bpc, curve)."""
    return {"condition": c.name, "seed": seed, "params": c.params, "flops_per_token": c.flops_per_token,
            "tokens_per_step": c.tokens_per_step, "steps": c.steps, "tokens": c.tokens, "flops": c.flops, **result}


def train_and_evaluate(c: Condition, seed: int, out_dir: Path, d: DistContext, eval_batch_size: int) -> dict | None:
    """Train one run to its step count (or finish it) and evaluate it (data-parallel under torchrun);
    returns its record (None off rank 0)."""
    run = run_dir(out_dir, c.name, seed)
    trainer = train(run_config(c, seed, out_dir), d)  # a finished run returns at once
    if trainer.step < c.steps:  # stopped by a signal; its checkpoint is saved
        raise StudyError(f"{run} stopped at step {trainer.step} of {c.steps}; run the same command again to resume")
    if d.distributed:
        dist.barrier()  # rank 0's checkpoints are on disk for every rank
    checkpoint, selection = selected_checkpoint(run)
    result = evaluate(run, batch_size=eval_batch_size, device=c.cfg.device, checkpoint=checkpoint, ctx=d)
    if selection == "final" and result["step"] != c.steps:
        raise StudyError(f"{run}: the newest checkpoint is at step {result['step']}, not {c.steps}")
    record = None
    if d.is_master:
        record = new_record(c, seed, checkpoint_step=result["step"], selection=selection,
                            val_bpc=result["val_bpc"], test_bpc=result["test_bpc"], curve=[[".", 0]])
        atomic_write_text(run / "result.json", json.dumps(record, indent=2) + "\n")  # marks the run done
    if d.distributed:
        dist.barrier()
    return record


def run_experts_condition(c: Condition, seed: int, out_dir: Path, d: DistContext) -> dict | None:
    """An experts:VARIANT run: charlm.experts' scheme in the run folder (it skips and resumes its own stages).
    Returns its record (None off rank 0).

    The reported model is the post-training of the fine-tune with the best val BPC (the scheme selects on
    val); its curve follows its lineage: pre-training, the fine-tunes up to the chosen one, post-training.
    """
    experts = experts_module(c.name)
    run = run_dir(out_dir, c.name, seed)
    scheme = expert_scheme(experts, c.cfg.replace(seed=seed), c.scheme, run)
    experts.run_scheme(scheme, d)
    if not d.is_master:
        dist.barrier()  # until rank 0 has written result.json
        return None
    state = experts.read_state(run)
    fine = scheme.fine_stages()
    chosen = next(i for i, stage in enumerate(fine) if stage.name == state["selected"][0])
    lineage = [scheme.pre_stage(), *fine[:chosen + 1]]
    if scheme.post_iters > 0:
        lineage.append(scheme.post_stage(fine[chosen]))
    final = state["stages"][lineage[-1].name]
    record = new_record(c, seed, checkpoint_step=lineage[-1].steps_total,
                        selection=f"final; expert {fine[chosen].category!r} chosen on val",
                        val_bpc=final["val_bpc"], test_bpc=final["test_bpc"],
                        curve=[[stage.name, stage.steps_total - stage.iters] for stage in lineage])
    atomic_write_text(run / "result.json", json.dumps(record, indent=2) + "\n")
    if d.distributed:
        dist.barrier()
    return record


def read_record(out_dir: Path, condition: str, seed: int) -> dict | None:
    path = run_dir(out_dir, condition, seed) / "result.json"
    return json.loads(path.read_text()) if path.is_file() else None


def run_all(conditions: list[Condition], seeds: list[int], out_dir: Path, d: DistContext, eval_batch_size: int) -> list[dict]:
    """Every (condition, seed) in order, skipping done runs; prints progress and a time estimate."""
    say = print if d.is_master else (lambda *args: None)
    todo = [(c, s) for c in conditions for s in seeds]
    records, durations = [], []
    for i, (c, seed) in enumerate(todo, 1):
        label = f"[{i}/{len(todo)}] {c.name} seed {seed}"
        record = read_record(out_dir, c.name, seed)
        if record is not None:
            say(f"{label}: done before, skipped ({run_dir(out_dir, c.name, seed)})")
        else:
            say(f"{label}: {c.steps:,} steps -> {run_dir(out_dir, c.name, seed)}")
            start = time.perf_counter()
            if c.scheme is not None:
                record = run_experts_condition(c, seed, out_dir, d)
            else:
                record = train_and_evaluate(c, seed, out_dir, d, eval_batch_size)
            durations.append(time.perf_counter() - start)
            left = sum(read_record(out_dir, c2.name, s2) is None for c2, s2 in todo[i:])
            say(f"{label}: {format_duration(durations[-1])}"
                  + (f"; about {format_duration(left * sum(durations) / len(durations))} left "
                     f"for {left} runs (equal budgets take about equal time)" if left else ""))
        records.append(record)
    return records


def format_duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


# --- statistics -----------------------------------------------------------------------------------

def mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (ddof = 1); the deviation is None for a single value."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    """Lentz's continued fraction for the incomplete beta function (Numerical Recipes, betacf)."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 1000):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1 + numerator * d
            d = 1 / (d if abs(d) > tiny else tiny)
            c = 1 + numerator / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1) < 1e-15:
            break
    return h


def regularized_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b), the regularized incomplete beta function."""
    if x <= 0 or x >= 1:
        return 0.0 if x <= 0 else 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1) / (a + b + 2):  # the fraction converges fast on this side; use the symmetry otherwise
        return math.exp(log_front) * _beta_continued_fraction(a, b, x) / a
    return 1 - math.exp(log_front) * _beta_continued_fraction(b, a, 1 - x) / b


def student_t_cdf(t: float, df: float) -> float:
    tail = 0.5 * regularized_beta(df / 2, 0.5, df / (df + t * t))
    return 1 - tail if t > 0 else tail


def student_t_quantile(p: float, df: float) -> float:
    """The p-quantile of Student's t with (possibly fractional) df, by bisection; no SciPy needed."""
    if not 0 < p < 1 or df <= 0:
        raise ValueError(f"need 0 < p < 1 and df > 0, got p={p}, df={df}")
    if p < 0.5:
        return -student_t_quantile(1 - p, df)
    lo, hi = 0.0, 1.0
    while student_t_cdf(hi, df) < p:
        lo, hi = hi, 2 * hi
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if student_t_cdf(mid, df) < p else (lo, mid)
        if hi - lo < 1e-12 * max(1.0, hi):
            break
    return (lo + hi) / 2


def welch_interval(sample: list[float], reference: list[float],
                   level: float = CONFIDENCE) -> tuple[float, float | None, float | None]:
    """mean(sample) - mean(reference) and its Welch t-interval; the bounds are None with < 2 values in either."""
    (m1, s1), (m2, s2) = mean_std(sample), mean_std(reference)
    diff = m1 - m2
    if s1 is None or s2 is None:
        return diff, None, None
    v1, v2 = s1 ** 2 / len(sample), s2 ** 2 / len(reference)
    se = math.sqrt(v1 + v2)
    if se == 0:
        return diff, diff, diff
    df = (v1 + v2) ** 2 / (v1 ** 2 / (len(sample) - 1) + v2 ** 2 / (len(reference) - 1))
    half = student_t_quantile(0.5 + level / 2, df) * se
    return diff, diff - half, diff + half


# --- results: table and figure --------------------------------------------------------------------

def summarize(records: list[dict], reference: str) -> list[dict]:
    """One row per condition (in first-seen order) with the statistics of its seeds."""
    by_condition: dict[str, list[dict]] = {}
    for r in records:
        by_condition.setdefault(r["condition"], []).append(r)
    reference_test = [r["test_bpc"] for r in by_condition.get(reference, [])]
    rows = []
    for name, runs in by_condition.items():
        first = runs[0]
        test = [r["test_bpc"] for r in runs]
        rows.append({"condition": name, "params": first["params"], "steps": first["steps"],
                     "tokens": first["tokens"], "flops": first["flops"], "seeds": len(runs),
                     "val_bpc": mean_std([r["val_bpc"] for r in runs]), "test_bpc": mean_std(test),
                     "diff": None if name == reference or not reference_test else welch_interval(test, reference_test)})
    return rows


def _count(n: float) -> str:
    """12.3M, 4.1k: counts of parameters and tokens at a glance."""
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= scale:
            return f"{n / scale:.1f}{suffix}"
    return f"{n:g}"


def _mean_pm_std(stats: tuple[float, float | None]) -> str:
    mean, std = stats
    return f"{mean:.4f} ± " + ("n/a" if std is None else f"{std:.4f}")


def _difference(diff: tuple[float, float | None, float | None] | None) -> str:
    if diff is None:
        return "(reference)"
    d, lo, hi = diff
    return f"{d:+.4f} [" + ("n/a" if lo is None else f"{lo:+.4f}, {hi:+.4f}") + "]"


def format_table(rows: list[dict], reference: str) -> str:
    """The report's table in Markdown: one row per condition, BPC as mean ± std over seeds."""
    header = ["condition", "params", "steps", "tokens", "seeds", "val BPC", "test BPC",
              f"Δ test BPC vs {reference} (95% CI)"]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for r in rows:
        cells = [r["condition"], _count(r["params"]), f"{r['steps']:,}", _count(r["tokens"]),
                 str(r["seeds"]), _mean_pm_std(r["val_bpc"]), _mean_pm_std(r["test_bpc"]), _difference(r["diff"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_runs(records: list[dict]) -> str:
    lines = ["| run | checkpoint | val BPC | test BPC |", "|---|---|---:|---:|"]
    for r in records:
        lines.append(f"| {r['condition']}-s{r['seed']} | step {r['checkpoint_step']:,} ({r['selection']}) "
                     f"| {r['val_bpc']:.4f} | {r['test_bpc']:.4f} |")
    return "\n".join(lines)


def results_markdown(records: list[dict], reference: str, settings: dict, command: str) -> str:
    rows = summarize(records, reference)
    flops = settings["budget_unit"] == "flops"
    unit = "training FLOPs (6(N − V·C) + 6·L·T·C per token, charlm.model)" if flops else "tokens"
    budget = f"{settings['budget']:.3g} {unit}"
    return f"""# {settings['name']}: results at equal {"compute" if flops else "tokens"}

`{command}`

Dataset `{settings['dataset']}` ({settings['tokenization']}); every run trained on at most {budget}.

{format_table(rows, reference)}

- val and test BPC: full passes over each split (charlm.eval, windows of the model's block size), next-character
  loss only (TIPA's auxiliary loss never counts); mean ± sample standard deviation (ddof = 1) over seeds.
  Test BPC is the headline: the checkpoint was selected on val.
- Checkpoints (per run below): a plain run's best.pt, the weights of its best val estimate during training (its
  final checkpoint if best.pt is missing). An experts:VARIANT run (charlm.experts) reports the final checkpoint of
  the post-training of the fine-tune the scheme chose on val; its steps are pre-training, every fine-tune and
  post-training (the scheme's own control run is not counted; see the run's report.md).
- Δ: mean test BPC of the condition minus that of {reference}, with a 95% Welch t-interval (independent
  samples, unequal variances, Welch-Satterthwaite degrees of freedom); n/a with fewer than two seeds.
- params: parameters without position embeddings, as counted in the FLOPs per token.

## Runs

{format_runs(records)}

![val BPC against training FLOPs](results.png)
"""


def val_curves(records: list[dict], out_dir: Path) -> dict[str, list[tuple[list[float], list[float]]]]:
    """Per condition, one (training FLOPs, val BPC estimate) curve per seed, from the runs' metrics.jsonl."""
    curves: dict[str, list] = {}
    for r in records:
        x, y, flops_per_step = [], [], r["flops_per_token"] * r["tokens_per_step"]
        for folder, first_step in r["curve"]:  # [(stage folder, steps before it)]: one for a plain run
            rows = read_metrics(run_dir(out_dir, r["condition"], r["seed"]) / folder)
            x += [(first_step + m["step"]) * flops_per_step for m in rows if "val_bpc" in m]
            y += [m["val_bpc"] for m in rows if "val_bpc" in m]
        curves.setdefault(r["condition"], []).append((x, y))
    return curves


def plot_results(curves: dict[str, list[tuple[list[float], list[float]]]], path: Path) -> Path:
    """Mean val BPC against training FLOPs per condition, with the min-max band over seeds shaded."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for name, seeds in curves.items():
        seeds = [(x, y) for x, y in seeds if x]
        if not seeds:
            continue
        # Seeds share eval points except in the expert scheme, whose lineage depends on the chosen expert:
        # interpolate every seed onto the points inside all of them.
        lo, hi = max(x[0] for x, _ in seeds), min(x[-1] for x, _ in seeds)
        x = np.unique([v for xs, _ in seeds for v in xs if lo <= v <= hi])
        y = np.asarray([np.interp(x, xs, ys) for xs, ys in seeds])  # (seeds, points)
        line, = ax.plot(x, y.mean(0), "o-", markersize=3, label=f"{name} (n={len(seeds)})")
        if len(seeds) > 1:
            ax.fill_between(x, y.min(0), y.max(0), color=line.get_color(), alpha=0.2, linewidth=0)
    ax.set_xlabel("training FLOPs")
    ax.set_ylabel("val BPC (trainer's estimate)")
    ax.set_title("val BPC against training FLOPs (line: mean over seeds; band: min-max)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write(Path(path), lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)
    return Path(path)


def write_results(records: list[dict], reference: str, settings: dict, out_dir: Path, command: str) -> str:
    atomic_write_text(out_dir / "results.md", results_markdown(records, reference, settings, command))
    plot_results(val_curves(records, out_dir), out_dir / "results.png")
    return format_table(summarize(records, reference), reference)


# --- command line ---------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m charlm.study", description=__doc__,
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
    study.add_argument("--experts-categories", default="keywords",
                       help="experts:VARIANT: the dataset's categorisation (python -m charlm.categorize)")
    study.add_argument("--experts-order", help="experts:VARIANT: comma-separated categories to fine-tune on, in "
                                               "order (default: all, the categorisation's order)")
    study.add_argument("--experts-split", default=",".join(map(str, EXPERTS_SPLIT)), metavar="PRE,FINE,POST",
                       help="experts:VARIANT: shares of a run's steps for pre-training, all fine-tunes together "
                            "and post-training (default %(default)s)")
    add_config_args(parser.add_argument_group("training (applies to every run)"), exclude=STUDY_OWNED)
    args = parser.parse_args(argv)
    if args.seeds < 1 or args.budget <= 0:
        parser.error("--seeds and --budget must be positive")
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
    """The training flags given on the command line (preset apart), as Config overrides."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(Config)
             if f.name not in STUDY_OWNED + ("preset", "extra") and getattr(args, f.name, None) is not None}
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
    names = parse_conditions(args.conditions)
    experts = (args.experts_categories, args.experts_order, args.experts_split)
    conditions = [plan_condition(n, args.budget, args.budget_unit, args.preset or "", overrides, experts)
                  for n in names]
    settings = {"flops_per_token": FLOPS_PER_TOKEN, "tokenization": args.tokenization, "budget": args.budget,
                "budget_unit": args.budget_unit,
                "preset": args.preset or "", "experts_categories": args.experts_categories,
                "experts_order": args.experts_order, "experts_split": list(args.experts_split),
                **{k: v for k, v in overrides.items() if k not in RUNTIME_FIELDS}}
    return conditions, settings


def run_study(args: argparse.Namespace, conditions: list[Condition], settings: dict, command: str) -> None:
    names, seeds = [c.name for c in conditions], list(range(args.seeds))
    only = parse_only(args.only, names, seeds)
    d = init_distributed(conditions[0].cfg.device)
    if d.is_master:
        check_study_settings(args.out_dir, settings)
        print(describe_plan(conditions, args.budget, args.budget_unit))
    if only:
        for c in conditions:
            if chosen := [s for n, s in only if n == c.name]:
                run_all([c], chosen, args.out_dir, d, args.eval_batch_size)
        if d.is_master:
            print("run the same command without --only to collect the table once every run is done")
        return
    records = run_all(conditions, seeds, args.out_dir, d, args.eval_batch_size)
    if d.is_master:
        reference = REFERENCE if REFERENCE in names else names[0]
        table = write_results(records, reference, {"name": args.out_dir.name, **settings}, args.out_dir, command)
        print(f"\n{table}\n\nwrote {args.out_dir / 'results.md'} and {args.out_dir / 'results.png'}")


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    try:
        conditions, settings = plan_study(args)
        if args.plan_only:
            print(describe_plan(conditions, args.budget, args.budget_unit))
            return
        run_study(args, conditions, settings, "python -m charlm.study " + shlex.join(argv))
    except (ValueError, FileNotFoundError, MemoryPlanError, RunStopped) as e:  # StudyError, DataError: ValueErrors
        sys.exit(f"error: {e}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
