"""Share a trained run as a Hugging Face transformers model (charlm's own weights-only files are
charlm.weights: write_safetensors, load_safetensors, re-exported here).

    hf.py         the transformers model (GPT-2 or GPT-NeoX) that computes charlm's logits
    card.py       the export's character table and model card
    command.py    python -m charlm.export RUN --to hf DIR
"""
from charlm.weights import ExportError, load_safetensors, write_safetensors

__all__ = ["ExportError", "load_safetensors", "write_safetensors"]
