"""A run as a Hugging Face transformers model folder.

    python -m charlm.export runs/NAME --to hf exports/NAME                     # the newest checkpoint
    python -m charlm.export runs/NAME --to hf exports/NAME --checkpoint best   # the lowest val estimate

The folder loads with `transformers.AutoModelForCausalLM.from_pretrained` and computes charlm's logits:
learned positions become GPT-2, rotary ones GPT-NeoX. The TIPA head is left out (the next-character
logits never depend on it). Text is encoded by the table in charlm_tokenizer.json (bytes: the UTF-8 bytes
themselves); README.md is the model card.
"""
import argparse
import json
from pathlib import Path

import torch

from charlm import cli
from charlm.checkpoint import load_model
from charlm.config import Config
from charlm.export.card import TOKENIZER, model_card, read_eval, run_meta, tokenizer_table
from charlm.export.hf import hf_model
from charlm.io import atomic_dir
from charlm.model import GPT
from charlm.weights import ExportError


def write_hf(out_dir: Path, model: GPT | dict, cfg: Config, tokenizer: dict, card: str) -> Path:
    """OUT: config.json, model.safetensors, charlm_tokenizer.json and README.md, the folder renamed into
    place when complete."""
    from safetensors.torch import save_file

    config, weights = hf_model(model, cfg)
    with atomic_dir(out_dir) as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        save_file(weights, tmp / "model.safetensors", metadata={"format": "pt"})
        (tmp / TOKENIZER).write_text(json.dumps(tokenizer, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        (tmp / "README.md").write_text(card, encoding="utf-8")
    return Path(out_dir)


def check_out_dir(run_dir: Path, out_dir: Path, overwrite: bool) -> None:
    """An export folder that replaces neither the run nor anything the user did not ask to replace."""
    run, out = Path(run_dir).resolve(), Path(out_dir).resolve()
    if out == run or out in run.parents:
        raise ExportError(f"{out_dir}: is the run folder or holds it; choose another export folder")
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out_dir}: is a file, expected an export folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"{out_dir}: is not empty; pass --overwrite to replace it")


def load_run(run_dir: Path, checkpoint: Path | None) -> tuple[GPT, Config, int]:
    """A run's model (CPU) from its newest, its best (checkpoint 'best') or the given checkpoint."""
    if not Path(run_dir).is_dir():
        raise ExportError(f"{run_dir}: no such run folder")
    return load_model(Path(run_dir), torch.device("cpu"), checkpoint)


def export_hf(run_dir: Path, out_dir: Path, checkpoint: Path | None = None, data_root: Path | None = None,
              overwrite: bool = False) -> Path:
    """A run as a transformers model folder (see the module's doc)."""
    check_out_dir(run_dir, out_dir, overwrite)
    result = read_eval(run_dir)
    model, cfg, step = load_run(run_dir, checkpoint)
    data_dir = Path(data_root) / cfg.dataset if data_root else cfg.dataset_dir
    meta = run_meta(cfg, data_dir)
    tokenizer = tokenizer_table(meta)
    card = model_card(cfg, step, tokenizer, meta, result)
    return write_hf(out_dir, model, cfg, tokenizer, card)


EXPORTERS = {"hf": export_hf}


def _main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m charlm.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="a run folder written by charlm.train")
    parser.add_argument("out_dir", type=Path, help="the folder to write")
    parser.add_argument("--to", default="hf", help=f"the format: {', '.join(EXPORTERS)} (default: hf)")
    parser.add_argument("--checkpoint", type=Path, help="a checkpoint file, or 'best' for the one with the lowest "
                                                        "val estimate (default: the newest)")
    parser.add_argument("--data-root", type=Path,
                        help="where the run's dataset is prepared (default: the run's data_root)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty export folder")
    args = parser.parse_args(argv)
    if args.to not in EXPORTERS:
        raise ExportError(f"--to {args.to!r}: unknown format; choose from {', '.join(EXPORTERS)}")
    out = EXPORTERS[args.to](args.run_dir, args.out_dir, args.checkpoint, args.data_root, args.overwrite)
    print(f"wrote {out}")


def main(argv=None) -> None:
    cli.run(lambda: _main(argv))
