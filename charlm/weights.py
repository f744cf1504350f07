"""charlm's weights-only sharing format: model.safetensors (the model's state dict) and model_config.json
(the run's resolved config). Safetensors files hold tensors and nothing else, so loading one cannot run
code, unlike a pickled checkpoint.

    write_safetensors(run_dir, model, cfg)        # the trainer, at the end of a run
    model, cfg = load_safetensors(run_dir)        # the GPT on the CPU, in eval mode
"""
from pathlib import Path

import torch

from charlm.checkpoint import check_finite, check_weights_fit
from charlm.config import Config
from charlm.errors import CharlmError
from charlm.io import atomic_write
from charlm.model import GPT

WEIGHTS, MODEL_CONFIG = "model.safetensors", "model_config.json"


class ExportError(CharlmError, ValueError):
    """A run, checkpoint or weights folder that cannot be exported or loaded as asked."""


def cpu_state_dict(model: GPT | dict) -> dict[str, torch.Tensor]:
    """A model's (or a state dict's) tensors on the CPU, each contiguous, as safetensors stores them."""
    weights = model.state_dict() if isinstance(model, torch.nn.Module) else model
    return {name: t.detach().cpu().contiguous() for name, t in weights.items()}


def write_safetensors(out_dir: Path, model: GPT | dict, cfg: Config) -> Path:
    """OUT/model.safetensors (the state dict) and OUT/model_config.json (cfg), each written atomically."""
    from safetensors.torch import save

    out_dir = Path(out_dir)
    atomic_write(out_dir / WEIGHTS, lambda f: f.write(save(cpu_state_dict(model), metadata={"format": "pt"})))
    cfg.save(out_dir / MODEL_CONFIG)
    return out_dir / WEIGHTS


def load_safetensors(folder: Path) -> tuple[GPT, Config]:
    """The model (CPU, eval mode) and config that write_safetensors wrote to `folder`."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    for name in (WEIGHTS, MODEL_CONFIG):
        if not (folder / name).is_file():
            raise ExportError(f"{folder}: no {name} (charlm's weights-only folder holds {WEIGHTS} and {MODEL_CONFIG})")
    cfg = Config.load(folder / MODEL_CONFIG)
    try:
        weights = load_file(folder / WEIGHTS)
    except SafetensorError as e:
        raise ExportError(f"{folder / WEIGHTS}: not a readable safetensors file ({e})") from e
    check_finite({"model": weights}, folder / WEIGHTS)
    model = GPT.from_config(cfg)
    check_weights_fit(weights, model, f"{folder / WEIGHTS} does not fit its {MODEL_CONFIG}")
    model.load_state_dict(weights)
    return model.eval(), cfg

