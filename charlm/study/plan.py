"""Planning a study: each condition's config and the steps its budget buys, checked before anything is trained."""
import dataclasses
import math
from pathlib import Path

from charlm.config import Config, resolve
from charlm.data import DataError, category_names, load_meta, prepare_command, with_dataset
from charlm.errors import CharlmError
from charlm.experts import Scheme, check_subsets, parse_order
from charlm.model import flops_per_token, parameter_counts, position_parameters
from charlm.study import EXPERTS_CATEGORIES, EXPERTS_SPLIT

# GPT.flops_per_token's formula, kept in study.json: a study planned with another count of FLOPs (older
# charlm counted the token-embedding lookup) would mix step counts, so it is refused.
FLOPS_PER_TOKEN = "6 (N - V C) + 6 L T C"
EXPERTS_PREFIX = "experts:"  # `experts:VARIANT` conditions come from charlm.experts
UNITS = {"flops": "FLOPs", "tokens": "tokens"}  # --budget-unit, as printed


class StudyError(CharlmError, ValueError):
    """The study's arguments or folder do not allow it to run."""


@dataclasses.dataclass(frozen=True)
class ExpertOptions:
    """How `experts:VARIANT` conditions run charlm.experts' scheme (--experts-categories, -order, -split)."""
    categories: str = EXPERTS_CATEGORIES  # the dataset's categorisation (charlm.categorize)
    order: str | None = None  # comma-separated categories to fine-tune on, in order; None: all
    split: tuple[float, float, float] = EXPERTS_SPLIT  # shares of the steps: pre-training, fine-tunes, post-training


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
                   experts: ExpertOptions = ExpertOptions()) -> Condition:
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
    scheme = plan_scheme(name, cfg, steps, experts)
    return Condition(name, cfg, params, flops_per_token, scheme.steps, scheme)


def plan_scheme(name: str, cfg: Config, steps: int, experts: ExpertOptions) -> SchemePlan:
    """Split a run's steps between the scheme's stages; the categorisation and its subsets are checked here."""
    order = parse_order(experts.order, category_names(cfg.dataset_dir, experts.categories))
    pre_share, fine_share, post_share = experts.split
    plan = SchemePlan(experts.categories, tuple(order), math.floor(steps * pre_share),
                      math.floor(steps * fine_share / len(order)), math.floor(steps * post_share))
    if plan.pre_iters < 1 or plan.fine_iters < 1:
        raise StudyError(f"condition {name!r}: {steps} steps split {experts.split} leave {plan.pre_iters} for "
                         f"pre-training and {plan.fine_iters} per fine-tune ({len(order)} categories); raise --budget")
    check_subsets(expert_scheme(cfg, plan, Path(".")))
    return plan


def expert_scheme(cfg: Config, plan: SchemePlan, out_dir: Path) -> Scheme:
    """charlm.experts' Scheme of one run; top_k = 1: the study reports one model per run."""
    return Scheme(base=cfg.replace(out_dir=""), out_dir=Path(out_dir), categories=plan.categories,
                  order=list(plan.order), pre_iters=plan.pre_iters, fine_iters=plan.fine_iters,
                  post_iters=plan.post_iters, top_k=1)


def format_count(n: float) -> str:
    """12.3M, 4.1k: counts of parameters and tokens at a glance."""
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= scale:
            return f"{n / scale:.1f}{suffix}"
    return f"{n:g}"


def describe_plan(conditions: list[Condition], budget: float, unit: str) -> str:
    header = (f"  {'condition':<14} {'params':>8} {'FLOPs/token':>12} {'tokens/step':>12} {'steps':>9} "
              f"{'tokens':>8} {'FLOPs':>10}")
    lines = [f"budget per run: {budget:.3g} training {UNITS[unit]}", header]
    for c in conditions:
        lines.append(f"  {c.name:<14} {format_count(c.params):>8} {c.flops_per_token:>12.3e} "
                     f"{c.tokens_per_step:>12,} {c.steps:>9,} {format_count(c.tokens):>8} {c.flops:>10.3e}")
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
