"""Share a trained run: charlm's own weights-only files, or a Hugging Face transformers model.

    weights.py    model.safetensors + model_config.json: write_safetensors, load_safetensors
    hf.py         the transformers model (GPT-2 or GPT-NeoX) that computes charlm's logits
    card.py       the export's character table and model card
    command.py    python -m charlm.export RUN --to hf DIR
"""
from charlm.export.weights import ExportError, load_safetensors, write_safetensors

__all__ = ["ExportError", "load_safetensors", "write_safetensors"]
