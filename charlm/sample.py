"""Generate text from a trained run.

    python -m charlm.sample runs/NAME --prompt "The history of " --max-new-tokens 500
"""
import argparse
from pathlib import Path

import torch

from charlm import cli
from charlm.checkpoint import load_model
from charlm.data import decode_tokens, encode_text, load_meta
from charlm.runtime import autocast, resolve_device


def sample(run_dir: Path, prompt: str, max_new_tokens: int = 500, temperature: float = 0.8,
           top_k: int | None = None, num_samples: int = 1, seed: int = 0, device: str = "auto") -> list[str]:
    if max_new_tokens < 0 or num_samples < 1 or (top_k is not None and top_k < 1) or not temperature > 0:
        raise ValueError(f"sample: max_new_tokens must be >= 0 ({max_new_tokens}), num_samples >= 1 "
                         f"({num_samples}), top_k >= 1 or unset ({top_k}) and temperature > 0 ({temperature})")
    dev = resolve_device(device)
    model, cfg, _ = load_model(Path(run_dir), dev)
    meta = load_meta(cfg.dataset_dir)
    ids = encode_text(prompt, meta) or [0]
    torch.manual_seed(seed)
    idx = torch.tensor([ids] * num_samples, dtype=torch.long, device=dev)
    with autocast(cfg.dtype, dev):
        out = model.generate(idx, max_new_tokens, temperature=temperature, top_k=top_k)
    return [decode_tokens(row.cpu().numpy(), meta) for row in out]


def _main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m charlm.sample", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--prompt", default="\n")
    parser.add_argument("--max-new-tokens", type=int, default=500)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--num-samples", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    texts = sample(args.run_dir, args.prompt, args.max_new_tokens, args.temperature, args.top_k,
                   args.num_samples, args.seed, args.device)
    for text in texts:
        print(text)
        print("-" * 40)


def main(argv=None) -> None:
    cli.run(lambda: _main(argv))


if __name__ == "__main__":
    main()
