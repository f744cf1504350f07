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
import importlib

# Reading order: scheme (the stages and the checks before any training), state (scheme.json), report (report.md
# and the fine-tuning curves), run (training, evaluating and recording the stages), __main__ (the command).
# The names are loaded on first use: `python -m charlm.experts --help` should not wait for torch.
_NAMES = {"Scheme": "scheme", "SchemeError": "scheme", "Stage": "scheme", "check_subsets": "scheme",
          "checkpoint_step": "scheme", "parse_order": "scheme", "read_state": "state", "run_scheme": "run",
          "write_report": "report"}
__all__ = list(_NAMES)


def __getattr__(name: str):
    if name in _NAMES:
        return getattr(importlib.import_module(f"{__name__}.{_NAMES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
