"""A run's history: metrics.jsonl (one JSON row per logged step) and the curves drawn from it.

Rows are appended as training goes; a resumed run first drops the rows after the step it resumes from,
so the log never repeats the steps that are redone.
"""
import json
from pathlib import Path

from charlm.io import atomic_write_text, pyplot, save_figure

METRICS = "metrics.jsonl"


def _parse_row(line: str) -> dict | None:
    """A metrics line's row, or None for a line torn by a crash mid-write or not charlm's (no integer step)."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return None
    step = row.get("step") if isinstance(row, dict) else None
    return row if isinstance(step, int) and not isinstance(step, bool) else None


def read_metrics(run_dir: Path) -> list[dict]:
    """The rows of a run's metrics.jsonl; a torn or foreign line is skipped."""
    path = Path(run_dir) / METRICS
    if not path.is_file():
        return []
    return [row for line in path.read_text().splitlines() if (row := _parse_row(line)) is not None]


def append_metrics(run_dir: Path, row: dict) -> None:
    with open(Path(run_dir) / METRICS, "a") as f:
        f.write(json.dumps(row) + "\n")


def truncate_metrics(run_dir: Path, step: int) -> None:
    """Drop rows after `step` (the checkpoint resumed from, or 0 for a fresh start after a crash before
    the first checkpoint): those steps are redone, and the log must not repeat them."""
    path = Path(run_dir) / METRICS
    if path.is_file():
        # A torn or foreign line is dropped too: it counts as after every checkpoint.
        kept = [line for line in path.read_text().splitlines() if (row := _parse_row(line)) and row["step"] <= step]
        atomic_write_text(path, "".join(line + "\n" for line in kept))


def plot_curves(run_dir: Path, title: str | None = None) -> Path | None:
    """Write run_dir/curves.png: train and val BPC against steps above the learning rate, with a dashed
    line where the run was resumed; None when there is nothing to plot yet."""
    rows = [r for r in read_metrics(run_dir) if "train_bpc" in r]
    if not rows:
        return None
    fig, (ax, ax_lr) = pyplot().subplots(2, 1, figsize=(7, 6), sharex=True, height_ratios=(3, 1))
    steps = [r["step"] for r in rows]
    ax.plot(steps, [r["train_bpc"] for r in rows], label="train", alpha=0.8)
    val = [r for r in rows if "val_bpc" in r]
    if val:
        best = min(val, key=lambda r: r["val_bpc"])
        ax.plot([r["step"] for r in val], [r["val_bpc"] for r in val], "o-", label="val (estimate)")
        ax.annotate(f"best {best['val_bpc']:.3f}", (best["step"], best["val_bpc"]),
                    textcoords="offset points", xytext=(0, 8), ha="center")
    ax_lr.plot(steps, [r.get("lr", float("nan")) for r in rows], color="tab:green")
    resumes = [r["resumed_from"] for r in rows if "resumed_from" in r]
    for i, step in enumerate(resumes):
        for axis in (ax, ax_lr):
            axis.axvline(step, color="grey", linestyle="--", linewidth=1, label="resumed" if i == 0 else None)
    ax.set_ylabel("bits per character")
    ax.set_title(title or Path(run_dir).name)
    ax_lr.set_xlabel("step")
    ax_lr.set_ylabel("learning rate")
    for axis in (ax, ax_lr):
        axis.grid(alpha=0.3)
    ax.legend(loc="upper right")
    return save_figure(fig, Path(run_dir) / "curves.png")
