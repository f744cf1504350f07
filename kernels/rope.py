"""Rotary position embeddings (RoPE), half-split convention: dimension i pairs with i + D/2.

For a row at position p and pair index i < D/2, with angle a = p * theta ** (-2i / D):
    out[i]       = x[i] * cos(a) - x[i + D/2] * sin(a)
    out[i + D/2] = x[i + D/2] * cos(a) + x[i] * sin(a)
"""
import torch


def rope_cos_sin(seq_len: int, head_dim: int, theta: float = 10000.0, offset: int = 0,
                 device=None, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables of shape (seq_len, head_dim // 2) for positions offset .. offset + seq_len - 1."""
    if head_dim % 2:
        raise ValueError(f"rope: head_dim must be even, got {head_dim}")
    inv_freq = theta ** (-torch.arange(0, head_dim // 2, device=device, dtype=dtype) * 2 / head_dim)
    pos = torch.arange(offset, offset + seq_len, device=device, dtype=dtype)
    angles = torch.outer(pos, inv_freq)  # (T, D/2)
    return angles.cos(), angles.sin()


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos[:, None, :], sin[:, None, :]  # broadcast over heads of (B, T, H, D/2)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def rope_reference(q: torch.Tensor, k: torch.Tensor, theta: float = 10000.0,
                   offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-PyTorch RoPE of q and k, each (B, T, H, D); computed in at least float32, returned in the input dtype."""
    compute = torch.promote_types(q.dtype, torch.float32)
    cos, sin = rope_cos_sin(q.shape[1], q.shape[-1], theta, offset, device=q.device, dtype=compute)
    return (_rotate(q.to(compute), cos, sin).to(q.dtype),
            _rotate(k.to(compute), cos, sin).to(k.dtype))
