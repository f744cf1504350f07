"""The report's expert scheme ("SubData"), with an equal-compute control and evaluation that can be compared.

    python -m charlm.categorize enwik8 --method keywords        # the 16 topic subsets, once
    python -m charlm.experts --dataset enwik8 --categories keywords --variant base \\
        --pre-iters 2500 --fine-iters 500 --post-iters 500 --out-dir runs/experts-base
    python -m charlm.experts --categories keywords --variant deep --from runs/deep \\
        --fine-iters 500 --post-iters 500 --out-dir runs/experts-deep      # start from an existing run
    python -m charlm.experts report runs/experts-base             # report.md and finetune_curves.png again

Every flag of charlm.train applies to every stage (--variant, --preset, --batch-size, --device, ...), except
--max-iters, --category, --init-from and --resume, which the scheme sets. Stages, each a normal
charlm.train run in its own folder under --out-dir:

    pre/             X = --pre-iters steps on the full train split (or --from: that run's newest checkpoint)
    fine/NN-<cat>/   Y = --fine-iters steps on each category's train subset, in --order (default: the
                     report's), each starting from the previous stage's final weights
    post/<cat>/      Z = --post-iters steps on the full train split from each of the --top-k fine-tunes
                     with the lowest global val BPC
    control/         the pre-trained model continued on the full train split for N*Y + Z steps (N fine-tunes):
                     as many steps from scratch as the scheme's longest path, pre + every fine-tune + post

Each stage starts with a fresh optimizer and LR schedule (warm-up, cosine decay over its own steps). Its
final checkpoint is evaluated with full passes over the global val and test splits (charlm.eval; eval.json
in the stage folder, but never written into a --from run's folder); a fine-tune or a post-train also on its
category's val subset (eval_<categories>_<category>.json). Experts are selected on global val BPC only: a model's BPC on
its own topic measures other text and is not comparable with BPC on all of val, so the report keeps the
two in separate columns, beside test BPC and the equal-compute control.

Re-running the command skips finished stages (final checkpoint present) and resumes an interrupted one
from its newest checkpoint. scheme.json in --out-dir records the settings (a re-run with other ones is
refused), which weights each stage started from (a stage whose predecessor has since been retrained is
refused, not silently mixed), every stage's results and the selection. Under torchrun every stage trains
and evaluates data-parallel over the ranks (`torchrun --nproc_per_node 8 -m charlm.experts ...`).
"""
import argparse
import dataclasses
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch.distributed as dist

from charlm import cli
from charlm.categorize import category_slug
from charlm.checkpoint import checkpoint_entry, latest_checkpoint
from charlm.config import Config, add_config_args, config_from_args
from charlm.data import categorisation_sha256, category_spans, read_categories, with_dataset
from charlm.errors import CharlmError
from charlm.eval import evaluate
from charlm.io import atomic_write_text, pyplot, save_figure
from charlm.runlog import read_metrics
from charlm.runtime import SINGLE_PROCESS, DistContext, distributed
from charlm.trainer import plan_only, train

SCHEME_FILE = "scheme.json"
FORMAT = 1
# Flags of charlm.train that the scheme sets per stage.
STAGE_FIELDS = ("max_iters", "category", "init_from", "resume")


class SchemeError(CharlmError, ValueError):
    """The scheme's arguments or folder do not allow it to run."""


@dataclass(frozen=True)
class Stage:
    name: str  # folder under the scheme's, e.g. "fine/02-science"
    kind: str  # pre | fine | post | control
    iters: int  # optimizer steps of this stage
    steps_total: int  # optimizer steps from scratch to this stage's final checkpoint
    category: str = ""  # fine: the subset it trains on; post: the fine-tune it starts from


@dataclass(frozen=True)
class Scheme:
    base: Config  # shared by every stage; each sets out_dir, max_iters, category and init_from
    out_dir: Path
    categories: str  # a categorisation of the dataset: a folder under <dataset>/categories/ (charlm.categorize)
    order: list[str]  # the categories to fine-tune on, in order
    pre_iters: int  # with pre_from: the step of that run's checkpoint
    fine_iters: int
    post_iters: int
    top_k: int  # fine-tunes to post-train
    pre_from: Path | None = None  # an existing run to start from instead of pre-training

    def pre_stage(self) -> Stage:
        return Stage("pre", "pre", self.pre_iters, self.pre_iters)

    def fine_stages(self) -> list[Stage]:
        return [Stage(f"fine/{i:02d}-{category_slug(name)}", "fine", self.fine_iters,
                      self.pre_iters + i * self.fine_iters, name) for i, name in enumerate(self.order, start=1)]

    def post_stage(self, fine: Stage) -> Stage:
        return Stage(f"post/{category_slug(fine.category)}", "post", self.post_iters,
                     fine.steps_total + self.post_iters, fine.category)

    def control_stage(self) -> Stage:
        iters = len(self.order) * self.fine_iters + self.post_iters
        return Stage("control", "control", iters, self.pre_iters + iters)

    def stage_dir(self, stage: Stage) -> Path:
        return self.pre_from if stage.kind == "pre" and self.pre_from else self.out_dir / stage.name

    def stage_config(self, stage: Stage, init: Path | None) -> Config:
        return dataclasses.replace(
            self.base, out_dir=str(self.stage_dir(stage)), max_iters=stage.iters, resume=True,
            category=f"{self.categories}/{stage.category}" if stage.kind == "fine" else "",
            init_from=str(init or ""), extra={**self.base.extra, "expert_stage": stage.name})


# --------------------------------------------------------------------------------------------------
# Checks before any training


def checkpoint_step(path: Path) -> int:
    return checkpoint_entry(path)["step"]


def final_checkpoint(run_dir: Path, iters: int) -> Path | None:
    """The run's newest checkpoint if it is the one at step `iters`, else None (not started or not finished)."""
    path = latest_checkpoint(run_dir)
    return path if path is not None and checkpoint_step(path) == iters else None


def pretrained_checkpoint(run_dir: Path, base: Config) -> Path:
    """The newest checkpoint of an existing run (--from), checked to fit the scheme's model."""
    path = latest_checkpoint(run_dir)
    saved = Path(run_dir) / "config.json"
    if path is None or not saved.is_file():
        raise SchemeError(f"--from {run_dir}: not a charlm.train run folder with a checkpoint")
    mismatched = base.model.mismatches(Config.load(saved).model)
    if mismatched:
        raise SchemeError(f"--from {run_dir}: its model does not fit this config ({'; '.join(mismatched)}); "
                          f"pass the --variant, --preset and model flags it was trained with")
    return path


def parse_order(order: str | None, names: list[str]) -> list[str]:
    """Comma-separated category names (default: all, in the categorisation's order), checked."""
    chosen = [n.strip() for n in order.split(",")] if order else list(names)
    unknown = [n for n in chosen if n not in names]
    if unknown or not chosen or len(set(chosen)) != len(chosen):
        raise SchemeError(f"--order must list distinct categories among: {', '.join(names)}; got {chosen}")
    return chosen


def check_subsets(scheme: Scheme) -> None:
    """Every category to fine-tune on holds a training window and some val text, or the scheme would stop midway."""
    data_dir, block = scheme.base.dataset_dir, scheme.base.model.block_size
    empty = []
    for name in scheme.order:
        train = category_spans(data_dir, f"{scheme.categories}/{name}", "train")
        val = category_spans(data_dir, f"{scheme.categories}/{name}", "val")
        if not (train[:, 1] > block).any() or not (val[:, 1] >= 2).any():
            empty.append(name)
    if empty:
        raise SchemeError(f"categories without a train chunk of more than block_size ({block}) tokens or without "
                          f"val text: {', '.join(empty)}; leave them out with --order")


def build_scheme(args: argparse.Namespace) -> Scheme:
    """The scheme of the command line, every argument checked before any training."""
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
    names = [c["name"] for c in read_categories(cfg.dataset_dir, args.categories)["categories"]]
    order = parse_order(args.order, names)
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


# --------------------------------------------------------------------------------------------------
# State: scheme.json


def scheme_spec(scheme: Scheme) -> dict:
    """What a re-run must share with the first run for its finished stages to be reused."""
    return {"dataset": scheme.base.dataset, "variant": scheme.base.variant, "categories": scheme.categories,
            "categories_sha256": categorisation_sha256(scheme.base.dataset_dir, scheme.categories),
            "order": scheme.order, "pre_iters": scheme.pre_iters, "fine_iters": scheme.fine_iters,
            "post_iters": scheme.post_iters, "from": str(scheme.pre_from) if scheme.pre_from else None,
            "model": dataclasses.asdict(scheme.base.model)}


def read_state(scheme_dir: Path) -> dict:
    path = Path(scheme_dir) / SCHEME_FILE
    if not path.is_file():
        raise SchemeError(f"{scheme_dir}: no {SCHEME_FILE}; run the scheme there first (python -m charlm.experts ...)")
    return json.loads(path.read_text())


def open_state(scheme: Scheme) -> dict:
    """scheme.json's state, new or checked against this run's settings."""
    spec = scheme_spec(scheme)
    if not (scheme.out_dir / SCHEME_FILE).is_file():
        return {"format": FORMAT, "spec": spec, "top_k": scheme.top_k, "stages": {}, "selected": []}
    state = read_state(scheme.out_dir)
    # A setting the first run did not record (an older charlm) is recorded now rather than compared.
    changed = [f"{k}: {state['spec'][k]!r} then, {v!r} now" for k, v in spec.items()
               if k in state["spec"] and state["spec"][k] != v]
    if changed:
        raise SchemeError(f"{scheme.out_dir} was started with other settings ({'; '.join(changed)}): run it with "
                          f"the same flags, or choose another --out-dir")
    return {**state, "spec": spec, "top_k": scheme.top_k}


def save_state(scheme: Scheme, state: dict, ctx: DistContext) -> None:
    if ctx.is_master:
        atomic_write_text(scheme.out_dir / SCHEME_FILE, json.dumps(state, indent=1) + "\n")


def checkpoint_sha256(checkpoint: Path) -> str:
    """A checkpoint's sha256, from its run's manifest (charlm.checkpoint): retraining a stage to other weights
    changes it; moving or copying the scheme's folder does not."""
    return checkpoint_entry(checkpoint)["sha256"]


# --------------------------------------------------------------------------------------------------
# Running the scheme


def run_stage(scheme: Scheme, state: dict, stage: Stage, init: Path | None, ctx: DistContext) -> Path:
    """Train a stage to its end (skipped if done, resumed if interrupted), evaluate and record it.
    Returns its final checkpoint. Under torchrun every rank runs it (training and evaluation are
    data-parallel, so every rank holds the same record); rank 0 writes and prints."""
    run_dir = scheme.stage_dir(stage)
    record = state["stages"].setdefault(stage.name, {})
    record.update(kind=stage.kind, category=stage.category, iters=stage.iters, steps_total=stage.steps_total,
                  dir=str(run_dir) if run_dir == scheme.pre_from else stage.name)
    if init is not None:
        if latest_checkpoint(run_dir) is not None and record.get("init_from") not in (None, checkpoint_sha256(init)):
            raise SchemeError(f"{run_dir} was trained from other weights than those now in {init}, which has been "
                              f"retrained since: delete {run_dir} (and the stages after it) to redo it")
        record["init_from"] = checkpoint_sha256(init)
    final = final_checkpoint(run_dir, stage.iters)
    if final is None:
        save_state(scheme, state, ctx)  # which weights the stage starts from is on disk before it trains
        ctx.print(f"\n=== {stage.name}: {stage.iters} steps" + (f" from {init}" if init else ""), flush=True)
        train(scheme.stage_config(stage, init), ctx)
        if ctx.distributed:
            dist.barrier()  # rank 0's last checkpoint is on disk for every rank
        final = final_checkpoint(run_dir, stage.iters)
        if final is None:  # stopped by a signal, its checkpoint saved
            raise SchemeError(f"{stage.name} stopped before step {stage.iters}; run the same command again "
                              f"to resume it")
    else:
        ctx.print(f"=== {stage.name}: done ({stage.iters} steps), skipped", flush=True)
    evaluate_stage(scheme, stage, record, final, ctx)
    save_state(scheme, state, ctx)
    return final


def evaluate_stage(scheme: Scheme, stage: Stage, record: dict, checkpoint: Path, ctx: DistContext) -> None:
    """Full-pass val and test BPC of the stage's final checkpoint, and for a fine-tune or a post-train, BPC
    on its category's val subset; kept in the record, and not redone while the checkpoint stays the same."""
    if record.get("evaluated") == checkpoint_sha256(checkpoint):
        return
    run_dir, device = scheme.stage_dir(stage), scheme.base.device
    save = run_dir != scheme.pre_from  # a --from run's own eval.json (another stride, say) stays as it was
    full = evaluate(run_dir, device=device, checkpoint=checkpoint, ctx=ctx, save=save)
    record.update(val_bpc=full["val_bpc"], test_bpc=full["test_bpc"], subset_val_bpc=None)
    if stage.category:
        subset = evaluate(run_dir, device=device, splits=("val",), checkpoint=checkpoint,
                          category=f"{scheme.categories}/{stage.category}", ctx=ctx, save=save)
        record["subset_val_bpc"] = subset["val_bpc"]
    record["evaluated"] = checkpoint_sha256(checkpoint)
    if ctx.is_master:
        print(f"=== {stage.name}: val bpc {full['val_bpc']:.4f}, test bpc {full['test_bpc']:.4f}"
              + (f", {stage.category} val subset bpc {record['subset_val_bpc']:.4f}" if stage.category else ""))


def select_experts(scheme: Scheme, state: dict) -> list[Stage]:
    """The top_k fine-tunes by global val BPC (ties: the earlier one)."""
    fine = scheme.fine_stages()
    return sorted(fine, key=lambda s: state["stages"][s.name]["val_bpc"])[:scheme.top_k]


def run_scheme(scheme: Scheme, ctx: DistContext = SINGLE_PROCESS) -> str:
    """Every stage in order, then the report; returns the report's Markdown (rank 0; "" on other ranks)."""
    state = open_state(scheme)
    scheme.out_dir.mkdir(parents=True, exist_ok=True)
    pretrained = run_stage(scheme, state, scheme.pre_stage(), None, ctx)
    finals, previous = {}, pretrained
    for stage in scheme.fine_stages():
        previous = finals[stage.name] = run_stage(scheme, state, stage, previous, ctx)
    experts = select_experts(scheme, state)
    state["selected"] = [s.name for s in experts]
    save_state(scheme, state, ctx)
    if scheme.post_iters > 0:
        for fine in experts:
            run_stage(scheme, state, scheme.post_stage(fine), finals[fine.name], ctx)
    run_stage(scheme, state, scheme.control_stage(), pretrained, ctx)
    return write_report(scheme.out_dir) if ctx.is_master else ""


# --------------------------------------------------------------------------------------------------
# Report


def row_label(record: dict, spec: dict) -> str:
    """A row's name, in the report's words."""
    model = spec["variant"].upper().replace(",", "+")
    if record["kind"] == "fine":
        position = spec["order"].index(record["category"]) + 1
        return f"{model} + Expert Fine-Tune : {record['category']} ({position}/{len(spec['order'])})"
    return {"pre": f"{model} (pre-trained)", "post": f"{model} + {record['category']} Post-Train",
            "control": f"{model} continued: equal-compute control"}[record["kind"]]


HEADER = ["| Experimental condition | Steps | Global val BPC | Subset val BPC | Test BPC |",
          "|---|---:|---:|---:|---:|"]
NOTE = ("Each row is a stage's final checkpoint. Global val and test: full passes over the whole split, every "
        "character scored once (charlm.eval). Subset val: a fine-tune on its own category's val subset only; that "
        "is other text, not comparable with global val (the report's table mixed the two). Experts were selected "
        "on global val; test was used for nothing. Steps: optimizer steps from scratch; the control has as many "
        "as pre-training, every fine-tune and post-training together.")


def format_bpc(value: float | None) -> str:
    return "—" if value is None else f"{value:.4f}"


def table_row(record: dict, spec: dict) -> str:
    cells = [row_label(record, spec), str(record["steps_total"]),
             *(format_bpc(record[k]) for k in ("val_bpc", "subset_val_bpc", "test_bpc"))]
    return "| " + " | ".join(cells) + " |"


def report_markdown(scheme_dir: Path, state: dict) -> str:
    """The report's table (best first), one row per evaluated stage, with what each column measures."""
    spec = state["spec"]
    done = sorted((r for r in state["stages"].values() if "val_bpc" in r), key=lambda r: r["val_bpc"])
    missing = [name for name, r in state["stages"].items() if "val_bpc" not in r]
    pre = f"{spec['pre_iters']} steps" + (f" ({spec['from']})" if spec["from"] else "")
    summary = (f"{spec['variant']} on {spec['dataset']}, categories `{spec['categories']}`: pre-training {pre}, "
               f"{len(spec['order'])} fine-tunes of {spec['fine_iters']} steps, post-training {spec['post_iters']} "
               f"steps from the top {state['top_k']} by global val BPC.")
    lines = [f"# Expert scheme: {scheme_dir}", "", summary, "", *HEADER, *(table_row(r, spec) for r in done), "", NOTE]
    if missing:
        lines += ["", f"Not finished yet: {', '.join(missing)}."]
    return "\n".join(lines) + "\n"


def plot_finetune_curves(scheme_dir: Path, state: dict) -> Path | None:
    """finetune_curves.png: train BPC (on each subset) and val BPC estimates (global val) of the fine-tunes,
    against steps from scratch, after the pre-training curve in grey."""
    plt = pyplot()
    stages = [r for r in state["stages"].values() if r["kind"] in ("pre", "fine")]
    if not any(r["kind"] == "fine" for r in stages):
        return None
    fig, (ax_train, ax_val) = plt.subplots(1, 2, figsize=(14, 5), sharex=True)
    colors = plt.get_cmap("tab20")
    for i, r in enumerate(stages):
        rows = read_metrics(Path(scheme_dir) / r["dir"])
        offset = r["steps_total"] - r["iters"]
        val = [row for row in rows if "val_bpc" in row]
        style = {"color": "grey", "label": "pre-training"} if r["kind"] == "pre" else \
            {"color": colors(i % 20), "label": r["category"]}
        ax_train.plot([offset + row["step"] for row in rows], [row["train_bpc"] for row in rows], ".-", ms=3, **style)
        ax_val.plot([offset + row["step"] for row in val], [row["val_bpc"] for row in val], "o-", ms=3, **style)
    ax_train.set_title("train BPC (fine-tunes: on their own subset)")
    ax_val.set_title("val BPC estimate (global val split)")
    for ax in (ax_train, ax_val):
        ax.set_xlabel("steps from scratch")
        ax.set_ylabel("bits per character")
        ax.grid(alpha=0.3)
    ax_val.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.suptitle(f"Sequential expert fine-tuning: {scheme_dir}")
    fig.tight_layout()
    return save_figure(fig, Path(scheme_dir) / "finetune_curves.png")


def write_report(scheme_dir: Path) -> str:
    """report.md and finetune_curves.png in the scheme's folder, from scheme.json; returns the Markdown."""
    scheme_dir = Path(scheme_dir)
    state = read_state(scheme_dir)
    text = report_markdown(scheme_dir, state)
    atomic_write_text(scheme_dir / "report.md", text)
    plot_finetune_curves(scheme_dir, state)
    return text


# --------------------------------------------------------------------------------------------------
# Command line


def scheme_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m charlm.experts", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    scheme = parser.add_argument_group("the scheme")
    scheme.add_argument("--categories", required=True,
                        help="the dataset's categorisation to use: keywords, embed, import (see charlm.categorize)")
    scheme.add_argument("--pre-iters", type=int, help="pre-training steps on the full train split")
    scheme.add_argument("--from", dest="pre_from", type=Path, metavar="RUN", help="start from this run's newest checkpoint instead")
    scheme.add_argument("--fine-iters", type=int, required=True, help="fine-tuning steps per category")
    scheme.add_argument("--post-iters", type=int, required=True, help="post-training steps per selected fine-tune")
    scheme.add_argument("--order", help="comma-separated categories to fine-tune on, in order (default: all, the "
                                        "report's order)")
    scheme.add_argument("--top-k", type=int, default=2, help="fine-tunes to post-train, by global val BPC (default 2)")
    add_config_args(parser.add_argument_group("training (charlm.train's flags)"), exclude=STAGE_FIELDS)
    return parser


def _main(argv: list[str]) -> None:
    if argv[:1] == ["report"]:
        parser = argparse.ArgumentParser(prog="python -m charlm.experts report",
                                         description="Write a scheme folder's report.md and finetune_curves.png.")
        parser.add_argument("scheme_dir", type=Path, help="the scheme's --out-dir")
        print(write_report(parser.parse_args(argv[1:]).scheme_dir))
        return
    scheme = build_scheme(scheme_parser().parse_args(argv))
    if scheme.base.plan_only:
        print(plan_only(scheme.base).describe())
        return
    with distributed(scheme.base.device) as ctx:
        report = run_scheme(scheme, ctx)
    ctx.print(report)


def main(argv=None) -> None:
    cli.run(lambda: _main(sys.argv[1:] if argv is None else list(argv)))


if __name__ == "__main__":
    main()
