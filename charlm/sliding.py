"""Hidden states of a rotary GPT run over a sequence of any length with sliding-window attention.

Every layer of every position attends to exactly the previous block_size positions (itself included):
key j is visible to query i iff i - block_size < j <= i, a banded causal mask. The sequence goes through
in chunks of new tokens, each with a key/value cache of the previous block_size - 1 positions per layer,
so a split is one pass of the MLPs and about two of attention (a chunk's queries see the cache and the
chunk), instead of block_size passes for windows that slide by one.

With one layer this is exactly the prediction of each character from the window of the block_size tokens
ending at it (stride-1 windows). With more layers the cached keys were themselves computed with their own
full band, so the receptive field grows to n_layer * (block_size - 1) + 1 tokens, as Transformer-XL's
memory does; stride-1 windows instead truncate every layer at the window's start. Only rotary models can
run this way: their scores depend on relative positions alone, and learned absolute positions stop at
block_size.
"""
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from charlm.kernels.rope import rope_reference
from charlm.model import GPT


def _rotate(x: torch.Tensor, theta: float, offset: int) -> torch.Tensor:
    return rope_reference(x, x, theta, offset)[0]


def _attend(attn, x: torch.Tensor, cache: tuple[torch.Tensor, torch.Tensor] | None, window: int):
    """One attention layer over a chunk x (B, C, n_embd) with the (k, v) of the previous positions;
    returns its output and the (k, v) the next chunk needs (the last window - 1 positions, unrotated)."""
    B, C, _ = x.shape
    q, k, v = attn.qkv(x)
    if cache is not None:
        k, v = torch.cat([cache[0], k], 1), torch.cat([cache[1], v], 1)
    M = k.shape[1] - C  # cached positions before the chunk
    # Positions count from the cache's start, not from the split's: only differences matter to RoPE, and
    # angles of millions of radians would lose their precision in float32.
    q, k_rot = _rotate(q, attn.rope_theta, M), _rotate(k, attn.rope_theta, 0)
    i = torch.arange(M, M + C, device=x.device)[:, None]
    j = torch.arange(M + C, device=x.device)[None, :]
    visible = (j <= i) & (j > i - window)  # (C, M + C), broadcast over batch and heads
    y = F.scaled_dot_product_attention(q.transpose(1, 2), k_rot.transpose(1, 2), v.transpose(1, 2),
                                       attn_mask=visible).transpose(1, 2)
    keep = window - 1
    return attn.c_proj(y.reshape(B, C, -1)), (k[:, -keep:], v[:, -keep:]) if keep else None


@torch.no_grad()
def sliding_hidden(model: GPT, idx: torch.Tensor, chunk: int = 0) -> Iterator[tuple[int, torch.Tensor]]:
    """(start, final hidden states (B, c, n_embd) of idx[:, start:start + c]) for consecutive chunks of a
    token array idx (B, N) of any length; chunk new tokens at a time (default block_size). The model must
    be rotary and in eval mode."""
    if model.wpe is not None:
        raise ValueError("sliding-window evaluation needs rotary positions; this model has learned positions")
    window = model.cfg.block_size
    chunk = chunk or window
    caches = [None] * len(model.blocks)
    for start in range(0, idx.shape[1], chunk):
        x = model.wte(idx[:, start:start + chunk])
        for n, block in enumerate(model.blocks):
            y, caches[n] = _attend(block.attn, block.ln_1(x), caches[n], window)
            x = x + y
            x = x + block.mlp(block.ln_2(x))
        yield start, model.ln_f(x)
