"""The transformers model that computes charlm's logits: learned positions become GPT-2, rotary ones GPT-NeoX.

Each architecture has one table from charlm's weight names to transformers' and one config.json. The
TIPA head has no place in either: the next-character logits never depend on it.
"""
import itertools

import torch

from charlm.config import Config, ModelConfig
from charlm.weights import ExportError, cpu_state_dict

LAYER_NORM_EPS = 1e-5  # torch's nn.LayerNorm default, which charlm uses


def conv1d(t: torch.Tensor, m: ModelConfig) -> torch.Tensor:
    """nn.Linear keeps (out, in); GPT-2's Conv1D keeps (in, out). A bias is the same either way."""
    return t.t() if t.dim() == 2 else t


def qkv_per_head(t: torch.Tensor, m: ModelConfig) -> torch.Tensor:
    """charlm's c_attn rows are [q | k | v], each (head, head_dim); NeoX's are per head [q_h, k_h, v_h]."""
    return t.unflatten(0, (3, m.n_head, m.head_dim)).transpose(0, 1).reshape(t.shape)


# (transformers name, charlm name, rearrangement): {i} runs over the blocks, {p} over weight and bias.
GPT2_TABLE = [
    ("transformer.wte.weight", "wte.weight", None),
    ("transformer.wpe.weight", "wpe.weight", None),
    ("transformer.h.{i}.ln_1.{p}", "blocks.{i}.ln_1.{p}", None),
    ("transformer.h.{i}.attn.c_attn.{p}", "blocks.{i}.attn.c_attn.{p}", conv1d),
    ("transformer.h.{i}.attn.c_proj.{p}", "blocks.{i}.attn.c_proj.{p}", conv1d),
    ("transformer.h.{i}.ln_2.{p}", "blocks.{i}.ln_2.{p}", None),
    ("transformer.h.{i}.mlp.c_fc.{p}", "blocks.{i}.mlp.c_fc.{p}", conv1d),
    ("transformer.h.{i}.mlp.c_proj.{p}", "blocks.{i}.mlp.c_proj.{p}", conv1d),
    ("transformer.ln_f.{p}", "ln_f.{p}", None),
    ("lm_head.weight", "lm_head.weight", None),
]
NEOX_TABLE = [
    ("gpt_neox.embed_in.weight", "wte.weight", None),
    ("gpt_neox.layers.{i}.input_layernorm.{p}", "blocks.{i}.ln_1.{p}", None),
    ("gpt_neox.layers.{i}.attention.query_key_value.{p}", "blocks.{i}.attn.c_attn.{p}", qkv_per_head),
    ("gpt_neox.layers.{i}.attention.dense.{p}", "blocks.{i}.attn.c_proj.{p}", None),
    ("gpt_neox.layers.{i}.post_attention_layernorm.{p}", "blocks.{i}.ln_2.{p}", None),
    ("gpt_neox.layers.{i}.mlp.dense_h_to_4h.{p}", "blocks.{i}.mlp.c_fc.{p}", None),
    ("gpt_neox.layers.{i}.mlp.dense_4h_to_h.{p}", "blocks.{i}.mlp.c_proj.{p}", None),
    ("gpt_neox.final_layer_norm.{p}", "ln_f.{p}", None),
    ("embed_out.weight", "lm_head.weight", None),  # the Hub's name; transformers 5 loads it as lm_head
]
NEOX_ATTENTION_BIASES = (".attention.query_key_value.bias", ".attention.dense.bias")  # attention_bias=False drops them


def gpt2_config(cfg: Config) -> dict:
    m = cfg.model
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": m.vocab_size,
            "n_positions": m.block_size, "n_embd": m.n_embd, "n_layer": m.n_layer, "n_head": m.n_head,
            "n_inner": 4 * m.n_embd, "activation_function": "gelu",  # exact erf GELU, as F.gelu (not gelu_new)
            "layer_norm_epsilon": LAYER_NORM_EPS, "scale_attn_weights": True, "tie_word_embeddings": False,
            "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "bos_token_id": None, "eos_token_id": None}


def neox_config(cfg: Config) -> dict:
    m = cfg.model
    return {"architectures": ["GPTNeoXForCausalLM"], "model_type": "gpt_neox", "vocab_size": m.vocab_size,
            "hidden_size": m.n_embd, "num_hidden_layers": m.n_layer, "num_attention_heads": m.n_head,
            "intermediate_size": 4 * m.n_embd, "hidden_act": "gelu", "max_position_embeddings": m.block_size,
            "rotary_pct": 1.0, "rotary_emb_base": cfg.rope_theta,  # transformers 4's names, which 5 converts
            "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta, "partial_rotary_factor": 1.0},
            "use_parallel_residual": False, "attention_bias": m.bias, "layer_norm_eps": LAYER_NORM_EPS,
            "tie_word_embeddings": False, "attention_dropout": 0.0, "hidden_dropout": 0.0,
            "bos_token_id": None, "eos_token_id": None}


def _charlm_tensor(weights: dict, name: str) -> torch.Tensor:
    """A charlm weight; a bias the model was built without (bias=False) is zeros, which computes the same."""
    if name not in weights and name.endswith(".bias"):
        weight = weights[name.removesuffix("bias") + "weight"]
        return torch.zeros(weight.shape[0], dtype=weight.dtype)
    return weights[name]


def hf_weights(weights: dict[str, torch.Tensor], m: ModelConfig, table: list, dropped: tuple = ()) -> dict:
    """charlm's weights under the transformers names of `table`, leaving out names that end with `dropped`."""
    out = {}
    for hf, ours, rearrange in table:
        layers = range(m.n_layer) if "{i}" in hf else [0]
        for i, p in itertools.product(layers, ("weight", "bias") if "{p}" in hf else [""]):
            name = hf.format(i=i, p=p)
            if not name.endswith(dropped):
                t = _charlm_tensor(weights, ours.format(i=i, p=p))
                out[name] = (rearrange(t, m) if rearrange else t).contiguous()
    return out


def check_exportable(m: ModelConfig) -> None:
    """GPT-2 and GPT-NeoX have LayerNorm, a GELU MLP and no QK-norm: other blocks (--variant modern) have no
    transformers architecture that computes the same logits, so they are refused, not exported wrong."""
    other = [f"{name} {value}" for name, value, theirs in (("norm", m.norm, "layernorm"), ("mlp", m.mlp, "gelu"),
                                                           ("qk_norm", m.qk_norm, False)) if value != theirs]
    if other:
        raise ExportError(f"--to hf: GPT-2 and GPT-NeoX cannot compute this model's logits ({', '.join(other)}; "
                          f"they need norm layernorm, mlp gelu, no qk_norm); share its model.safetensors instead")


def hf_model(weights: dict[str, torch.Tensor], cfg: Config) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config.json, weights) of the transformers model that computes what charlm's does."""
    check_exportable(cfg.model)
    weights = cpu_state_dict(weights)
    if cfg.model.pos_embedding == "learned":
        return gpt2_config(cfg), hf_weights(weights, cfg.model, GPT2_TABLE)
    dropped = () if cfg.model.bias else NEOX_ATTENTION_BIASES
    return neox_config(cfg), hf_weights(weights, cfg.model, NEOX_TABLE, dropped)

