"""The study's results: results.md (the table, how it was computed, every run) and results.png (val BPC
against training FLOPs)."""
from pathlib import Path

import numpy as np

from charlm.io import atomic_write_text, pyplot, save_figure
from charlm.protocol import protocol_cell, protocol_notes
from charlm.runlog import read_metrics
from charlm.study.plan import format_count
from charlm.study.run import run_dir
from charlm.study.stats import CONFIDENCE, Difference, Spread, describe_statistics, summarize

Curve = tuple[list[float], list[float]]  # (training FLOPs, val BPC estimates) of one run


def _mean_pm_std(spread: Spread) -> str:
    return f"{spread.mean:.4f} ± " + ("n/a" if spread.std is None else f"{spread.std:.4f}")


def _difference(diff: Difference | None) -> str:
    if diff is None:
        return "(reference)"
    return f"{diff.diff:+.4f} [" + ("n/a" if diff.low is None else f"{diff.low:+.4f}, {diff.high:+.4f}") + "]"


def format_table(rows: list[dict], reference: str) -> str:
    """The report's table in Markdown: one row per condition, BPC as mean ± std over seeds."""
    header = ["condition", "params", "steps", "tokens", "seeds", "val BPC", "test BPC",
              f"Δ test BPC vs {reference} ({CONFIDENCE:.0%} CI)"]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for r in rows:
        cells = [r["condition"], format_count(r["params"]), f"{r['steps']:,}", format_count(r["tokens"]),
                 str(r["seeds"]), _mean_pm_std(r["val_bpc"]), _mean_pm_std(r["test_bpc"]), _difference(r["diff"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_runs(records: list[dict]) -> str:
    lines = ["| run | checkpoint | val BPC | test BPC | evaluation protocol |", "|---|---|---:|---:|---|"]
    for r in records:
        lines.append(f"| {r['condition']}-s{r['seed']} | step {r['checkpoint_step']:,} ({r['selection']}) "
                     f"| {r['val_bpc']:.4f} | {r['test_bpc']:.4f} | {protocol_cell(r.get('protocol'))} |")
    return "\n".join(lines)


def format_protocols(records: list[dict]) -> str:
    """The evaluation protocols of the runs, each with the conditions evaluated under it."""
    return "\n".join(f"  - {line}" for line in protocol_notes([(r["condition"], r.get("protocol")) for r in records]))


def results_markdown(records: list[dict], reference: str, table: str, settings: dict, command: str) -> str:
    flops = settings["budget_unit"] == "flops"
    unit = "training FLOPs (6(N − V·C) + 6·L·T·C per token, charlm.model)" if flops else "tokens"
    budget = f"{settings['budget']:.3g} {unit}"
    return f"""# {settings['name']}: results at equal {"compute" if flops else "tokens"}

`{command}`

Dataset `{settings['dataset']}` ({settings['tokenization']}); every run trained on at most {budget}.

{table}

- val and test BPC: full passes over each split (charlm.eval), every character scored once, next-character loss
  only (TIPA's auxiliary loss never counts). Test BPC is the headline: the checkpoint was selected on val.
  Evaluation protocol (context per scored character; `python -m charlm.eval RUN --stride 1` or, for rotary
  models, `--protocol full` gives every character its full context):
{format_protocols(records)}
- Checkpoints (per run below): a plain run's best.pt, the weights of its best val estimate during training (its
  final checkpoint if best.pt is missing). An experts:VARIANT run (charlm.experts) reports the final checkpoint of
  the post-training of the fine-tune the scheme chose on val; its steps are pre-training, every fine-tune and
  post-training (the scheme's own control run is not counted; see the run's report.md).
- params: parameters without position embeddings, as counted in the FLOPs per token.
{describe_statistics(reference)}

## Runs

{format_runs(records)}

![val BPC against training FLOPs](results.png)
"""


def val_curves(records: list[dict], out_dir: Path) -> dict[str, list[Curve]]:
    """Per condition, one (training FLOPs, val BPC estimate) curve per seed, from the runs' metrics.jsonl."""
    curves: dict[str, list[Curve]] = {}
    for r in records:
        x, y, flops_per_step = [], [], r["flops_per_token"] * r["tokens_per_step"]
        for folder, first_step in r["curve"]:  # [(stage folder, steps before it)]: one for a plain run
            rows = read_metrics(run_dir(out_dir, r["condition"], r["seed"]) / folder)
            x += [(first_step + m["step"]) * flops_per_step for m in rows if "val_bpc" in m]
            y += [m["val_bpc"] for m in rows if "val_bpc" in m]
        curves.setdefault(r["condition"], []).append((x, y))
    return curves


def plot_results(curves: dict[str, list[Curve]], path: Path) -> Path:
    """Mean val BPC against training FLOPs per condition, with the min-max band over seeds shaded."""
    fig, ax = pyplot().subplots(figsize=(7.5, 4.8))
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
    return save_figure(fig, path)


def write_results(records: list[dict], reference: str, settings: dict, out_dir: Path, command: str) -> str:
    """results.md and results.png in the study folder; returns the table."""
    table = format_table(summarize(records, reference), reference)
    atomic_write_text(out_dir / "results.md", results_markdown(records, reference, table, settings, command))
    plot_results(val_curves(records, out_dir), out_dir / "results.png")
    return table
