"""The scheme's report, from scheme.json: report.md (the report's table) and finetune_curves.png."""
from pathlib import Path

from charlm.experts.state import read_state
from charlm.io import atomic_write_text, pyplot, save_figure
from charlm.protocol import protocol_notes
from charlm.runlog import read_metrics

HEADER = ["| Experimental condition | Steps | Global val BPC | Subset val BPC | Test BPC |",
          "|---|---:|---:|---:|---:|"]
NOTE = ("Each row is a stage's final checkpoint. Global val and test: full passes over the whole split, every "
        "character scored once (charlm.eval). Subset val: a fine-tune on its own category's val subset only; that "
        "is other text, not comparable with global val (the report's table mixed the two). Experts were selected "
        "on global val; test was used for nothing. Steps: optimizer steps from scratch; the control has as many "
        "as pre-training, every fine-tune and post-training together.")


def row_label(record: dict, spec: dict) -> str:
    """A row's name, in the report's words."""
    model = spec["variant"].upper().replace(",", "+")
    if record["kind"] == "fine":
        position = spec["order"].index(record["category"]) + 1
        return f"{model} + Expert Fine-Tune : {record['category']} ({position}/{len(spec['order'])})"
    return {"pre": f"{model} (pre-trained)", "post": f"{model} + {record['category']} Post-Train",
            "control": f"{model} continued: equal-compute control"}[record["kind"]]


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
    protocols = protocol_notes([(row_label(r, spec), r.get("protocol")) for r in done])
    lines = [f"# Expert scheme: {scheme_dir}", "", summary, "", *HEADER, *(table_row(r, spec) for r in done), "", NOTE,
             "", "Evaluation protocol of global val and test (charlm.eval; subset val: the same windows, each span "
             "a document of its own):", "", *(f"- {line}" for line in protocols)]
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
