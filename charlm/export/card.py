"""What a transformers export says about itself: the character table (charlm_tokenizer.json) and the model
card (README.md): dataset, tokenization, architecture, the run's BPC, what is left out, the license.
"""
import json
from pathlib import Path

from charlm.config import Config
from charlm.data import DataError, dataset_fingerprint, load_meta
from charlm.eval import eval_filename
from charlm.weights import ExportError

TOKENIZER = "charlm_tokenizer.json"


def run_meta(cfg: Config, data_dir: Path) -> dict | None:
    """The meta of the dataset the run was trained on; None when it is gone (not prepared, or prepared again
    since) and the run is byte-level, which needs none: a vocabulary of 256 is the identity on bytes."""
    vocab = cfg.model.vocab_size
    try:
        meta = load_meta(data_dir)
        same = meta["vocab_size"] == vocab and cfg.extra.get("dataset_sha256") in (None, dataset_fingerprint(meta))
    except DataError:
        meta, same = None, False
    if same:
        return meta
    if vocab == 256:
        return None
    raise ExportError(f"the run's dataset {data_dir} is not prepared, or not as the run saw it, and its table of "
                      f"{vocab} characters is needed to encode text: prepare it again, or pass --data-root")


def tokenizer_table(meta: dict | None) -> dict:
    """charlm_tokenizer.json: how text becomes token ids, with the id -> character table of unicode runs."""
    if meta is None or meta["tokenization"] == "bytes":
        return {"tokenization": "bytes", "vocab_size": 256, "id_to_char": None,
                "encode": "token id = each byte of the UTF-8 text"}
    return {"tokenization": "unicode", "vocab_size": meta["vocab_size"], "id_to_char": [chr(c) for c in meta["chars"]],
            "encode": "token id = the index of each character in id_to_char"}


def read_eval(run_dir: Path) -> dict | None:
    """RUN/eval.json (charlm.eval's BPC), or None when the run was not evaluated."""
    path = Path(run_dir) / eval_filename()
    if not path.is_file():
        return None
    try:
        result = json.loads(path.read_text())
        return {**result, "val_bpc": float(result["val_bpc"]), "test_bpc": float(result["test_bpc"])}
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as e:
        raise ExportError(f"{path}: not charlm.eval's result ({e}); evaluate again or delete it") from e


ENCODE_EXAMPLE = {
    "bytes": 'ids = list(text.encode("utf-8"))  # decode: bytes(ids).decode("utf-8", errors="replace")',
    "unicode": 'table = json.load(open(f"{folder}/charlm_tokenizer.json", encoding="utf-8"))["id_to_char"]\n'
               'index = {c: i for i, c in enumerate(table)}\n'
               'ids = [index[c] for c in text]  # a character outside the table has no id\n'
               '# decode: "".join(table[i] for i in ids)',
}

ARCHITECTURE = {
    "learned": "GPT-2 (`GPT2LMHeadModel`): pre-norm blocks, learned absolute positions (`n_positions` = the "
               "training context), exact erf GELU (`activation_function: gelu`), untied LM head, LayerNorm eps "
               "1e-5. charlm's `nn.Linear` weights are transposed into GPT-2's `Conv1D` layout.",
    "rope": "GPT-NeoX (`GPTNeoXForCausalLM`): pre-norm blocks with a sequential residual "
            "(`use_parallel_residual: false`), rotary positions on every dimension (`rotary_pct: 1.0`) in the "
            "half-split convention of charlm, exact erf GELU, untied LM head, LayerNorm eps 1e-5. charlm's "
            "`[q | k | v]` attention rows are regrouped per head as NeoX's fused `query_key_value` expects.",
}


def _dataset_section(cfg: Config, meta: dict | None) -> str:
    if meta is None:
        return (f"The run's dataset (`{cfg.dataset}`) was not found at export time (or was prepared again since); "
                f"its vocabulary of 256 is taken as charlm's byte-level tokenization.")
    src = meta["source"]
    splits = ", ".join(f"{name} {n:,}" for name, n in meta["splits"].items())
    return f"`{src.get('name', cfg.dataset)}`: {src['bytes']:,} bytes (sha256 `{src['sha256']}`); tokens: {splits}."


def _eval_section(result: dict | None, step: int) -> str:
    if result is None:
        return "The run folder has no eval.json: this model's bits per character were not measured."
    text = (f"val BPC **{result['val_bpc']:.4f}**, test BPC **{result['test_bpc']:.4f}** (charlm.eval: every "
            f"character scored once, windows sliding by {result.get('stride', '?')}).")
    if result.get("step") != step:
        text += f" eval.json scored step {result.get('step')}; this export is step {step}."
    return text


def model_card(cfg: Config, step: int, tokenizer: dict, meta: dict | None, result: dict | None) -> str:
    m = cfg.model
    tipa = ("The run trained charlm's auxiliary TIPA head (reverse-position prediction); it" if m.tipa
            else "charlm's optional TIPA head (reverse-position prediction) was not part of this run and")
    bias = "" if m.bias else " The run had no biases: the biases transformers requires are zeros."
    return f"""---
license: mit
library_name: transformers
pipeline_tag: text-generation
tags: [charlm, character-level]
---

# charlm {cfg.run_name}, step {step}

A character-level GPT trained with charlm: {m.n_layer} layers, {m.n_head} heads, width {m.n_embd}, context
{m.block_size} characters, vocabulary {m.vocab_size}.

## Dataset

{_dataset_section(cfg, meta)}

## Tokenization

{tokenizer['tokenization']}: {tokenizer['encode']} (`{TOKENIZER}`). There is no transformers tokenizer;
pass token ids as `input_ids`:

```python
import json, torch
from transformers import AutoModelForCausalLM
folder = "."  # this folder
model = AutoModelForCausalLM.from_pretrained(folder)
text = "..."  # the prompt
{ENCODE_EXAMPLE[tokenizer['tokenization']]}
logits = model(torch.tensor([ids])).logits  # next-character logits; at most {m.block_size} ids
```

## Architecture

{ARCHITECTURE[m.pos_embedding]}{bias} The logits are charlm's, to float32 rounding.

## Evaluation

{_eval_section(result, step)}

## Not included

{tipa} is not included in this export: the next-character logits never depend on it.

## License

MIT
"""

