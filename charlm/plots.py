"""Figures of a run: train and val BPC against steps, like the report's."""
import json
from pathlib import Path

from charlm.io import atomic_write


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_curves(run_dir: Path, title: str | None = None) -> Path | None:
    """Write run_dir/curves.png from metrics.jsonl; None when there is nothing to plot yet."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir)
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot([r["step"] for r in rows], [r["train_bpc"] for r in rows], label="train", alpha=0.8)
    val = [r for r in rows if "val_bpc" in r]
    if val:
        best = min(val, key=lambda r: r["val_bpc"])
        ax.plot([r["step"] for r in val], [r["val_bpc"] for r in val], "o-", label="val (estimate)")
        ax.annotate(f"best {best['val_bpc']:.3f}", (best["step"], best["val_bpc"]),
                    textcoords="offset points", xytext=(0, 8), ha="center")
    ax.set_xlabel("step")
    ax.set_ylabel("bits per character")
    ax.set_title(title or Path(run_dir).name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = Path(run_dir) / "curves.png"
    atomic_write(out, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)
    return out
