"""The GPT decoder of the report's conditions, in one file.

BASE: pre-norm LayerNorm blocks, causal self-attention, GELU MLP (4x), learned absolute positions,
untied input and output embeddings. ROPE: rotary q/k instead of learned positions. TIPA: an auxiliary
head predicting the reverse position (DESIGN.md) of the next token. DEEP is only a bigger config.
MODERN (modded-nanogpt's lessons): RMSNorm without biases, QK-norm, a ReLU^2 or SwiGLU MLP, zero-initialised
output projections, and Muon for the blocks' matrices (charlm.optim).

Attention and RoPE implementations are switchable (`attn`, `rope_impl`) so the Triton kernels of
charlm.kernels plug in without touching the model.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from charlm.config import Config, ModelConfig
from charlm.kernels.flash_attn import attention_reference, flash_attn
from charlm.kernels.rope import apply_rope, rope_reference
from charlm.loss import linear_cross_entropy, uses_chunked_loss
from charlm.optim import MuonAdamW, is_hidden_matrix


def sdpa_attention(q, k, v):
    """(B, T, H, D) in and out; SDPA wants heads before time, which transposed views give for free."""
    y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
    return y.transpose(1, 2)


ATTENTION = {
    "sdpa": sdpa_attention,
    "triton": flash_attn,
    "naive": attention_reference,  # explicit masked softmax, nanoGPT's fallback path
}
ROPE = {"torch": rope_reference, "triton": apply_rope}


def pick_impls(cfg: Config, device: torch.device | None = None) -> tuple[str, str]:
    """Resolve `auto` attention/RoPE choices for a device.

    Attention: SDPA, until bench/attn.py has shown the Triton kernel at least as fast on a GPU; `--attn
    triton` selects it. RoPE: fused into the Triton attention kernel when that is selected (rotated as q
    and k tiles load: no pass of its own); otherwise the Triton RoPE kernel on CUDA (one pass over q and k
    instead of several), the PyTorch reference elsewhere. `--rope-impl triton` with `--attn triton` runs
    the two kernels one after the other (bench/attn.py times both ways).
    """
    attn = "sdpa" if cfg.attn == "auto" else cfg.attn
    if cfg.rope_impl != "auto":
        return attn, cfg.rope_impl
    on_cuda = device is not None and device.type == "cuda"
    fusable = attn == "triton" and cfg.model.head_dim >= 32  # the kernel's fused RoPE needs D >= 32
    return attn, "fused" if fusable else "triton" if on_cuda else "torch"


def with_impls(cfg: Config, device: torch.device) -> Config:
    """The config with `auto` attention and RoPE resolved for the device."""
    attn, rope = pick_impls(cfg, device)
    return cfg.replace(attn=attn, rope_impl=rope)


@dataclass(frozen=True)
class Options:
    """How the model computes, beside its shape: none of these changes a parameter."""
    dropout: float = 0.0
    rope_theta: float = 10000.0
    attn: str = "sdpa"  # resolved: sdpa | triton | naive
    rope_impl: str = "torch"  # resolved: torch | triton | fused
    checkpoint_layers: int = 0  # the first blocks recompute their activations in the backward pass
    zero_init: bool = False  # output projections start at zero (only the initial weights differ)

    @classmethod
    def of(cls, cfg: Config, device: torch.device | None = None, checkpoint_layers: int = 0) -> "Options":
        attn, rope = pick_impls(cfg, device)
        return cls(dropout=cfg.dropout, rope_theta=cfg.rope_theta, attn=attn, rope_impl=rope,
                   checkpoint_layers=max(checkpoint_layers, 0), zero_init=cfg.zero_init)


def mlp_hidden(cfg: ModelConfig) -> int:
    """The MLP's hidden width: 4C, or 8C/3 for SwiGLU, whose three matrices then hold as many weights as two."""
    return 8 * cfg.n_embd // 3 if cfg.mlp == "swiglu" else 4 * cfg.n_embd


def hidden_matrix_parameters(cfg: ModelConfig) -> int:
    """The weights of the blocks' Linear layers (c_attn, c_proj, c_fc, c_proj): Muon's parameters."""
    C, H = cfg.n_embd, mlp_hidden(cfg)
    return cfg.n_layer * (4 * C * C + (3 if cfg.mlp == "swiglu" else 2) * H * C)


def parameter_counts(cfg: ModelConfig) -> tuple[int, int]:
    """(all parameters, those in Linear layers) of GPT(cfg), counted without building it."""
    C, V, L, H = cfg.n_embd, cfg.vocab_size, cfg.n_layer, mlp_hidden(cfg)
    bias = 1 if cfg.bias else 0
    layer_norm = C + (bias * C if cfg.norm == "layernorm" else 0)  # RMSNorm: a gain only
    fc_out = 2 * H if cfg.mlp == "swiglu" else H  # SwiGLU's c_fc makes the gate and the value
    block_biases = bias * (3 * C + C + fc_out + C)  # c_attn, attn c_proj, c_fc, mlp c_proj
    head_linear = V * C + ((cfg.tipa_max + 1) * C if cfg.tipa else 0)  # lm_head, tipa_head: no bias
    linear = hidden_matrix_parameters(cfg) + L * block_biases + head_linear
    return V * C + position_parameters(cfg) + L * 2 * layer_norm + layer_norm + linear, linear


def position_parameters(cfg: ModelConfig) -> int:
    """The learned position table's size (nanoGPT leaves it out of the count it reports)."""
    return cfg.block_size * cfg.n_embd if cfg.pos_embedding == "learned" else 0


def flops_per_token(cfg: ModelConfig) -> float:
    """Training FLOPs per token: 6 (N - V C) for the matmuls of the weights (the token embedding is a
    lookup, not a matmul; the LM head is not tied to it and counts; positions are a lookup too) plus
    6 * L * T * C for causal attention. Every block counts alike (norms, gains and biases as weights, as
    nanoGPT's 6N does; pointwise ops such as SwiGLU's product or QK-norm are left out, being no matmul).

    Attention scores and values cost 2 * 2 * T * C per token and layer forward for full attention;
    causal masking halves it, and backward is twice forward: 3 * 2 * T * C * L = 6 * L * T * C.
    """
    matmul_params = parameter_counts(cfg)[0] - position_parameters(cfg) - cfg.vocab_size * cfg.n_embd
    return 6 * matmul_params + 6 * cfg.n_layer * cfg.block_size * cfg.n_embd


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, opts: Options):
        super().__init__()
        self.n_head, self.head_dim = cfg.n_head, cfg.head_dim
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.resid_dropout = nn.Dropout(opts.dropout)
        self.qk_norm = cfg.qk_norm
        self.rope_theta = opts.rope_theta if cfg.pos_embedding == "rope" else None
        # fused: the Triton attention kernel rotates q and k as it loads them, with no RoPE pass of its own.
        self.fused_rope = opts.rope_impl == "fused" and self.rope_theta is not None
        self.attend, self.rotate = ATTENTION[opts.attn], ROPE.get(opts.rope_impl)

    def qkv(self, x):
        """q, k, v of x (B, T, C), each (B, T, H, D) (strided views when not normalised), before RoPE."""
        B, T, _ = x.shape
        q, k, v = self.c_attn(x).view(B, T, 3, self.n_head, self.head_dim).unbind(2)
        if self.qk_norm:  # bounded logits: attention cannot saturate however large q and k grow
            q, k = F.rms_norm(q, (self.head_dim,)), F.rms_norm(k, (self.head_dim,))
        return q, k, v

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(x)
        if self.fused_rope:
            y = flash_attn(q, k, v, causal=True, rope_theta=self.rope_theta)
        else:
            if self.rope_theta is not None:
                q, k = self.rotate(q, k, self.rope_theta)
            y = self.attend(q, k, v)
        return self.resid_dropout(self.c_proj(y.reshape(B, T, C)))


def relu_squared(x):
    return F.relu(x).square()


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, opts: Options):
        super().__init__()
        hidden = mlp_hidden(cfg)
        self.gated = cfg.mlp == "swiglu"
        self.c_fc = nn.Linear(cfg.n_embd, 2 * hidden if self.gated else hidden, bias=cfg.bias)
        self.c_proj = nn.Linear(hidden, cfg.n_embd, bias=cfg.bias)
        self.act = relu_squared if cfg.mlp == "relu2" else F.gelu
        self.dropout = nn.Dropout(opts.dropout)

    def forward(self, x):
        if self.gated:
            gate, value = self.c_fc(x).chunk(2, dim=-1)
            return self.dropout(self.c_proj(F.silu(gate) * value))
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(cfg.n_embd)
    return nn.LayerNorm(cfg.n_embd, bias=cfg.bias)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, opts: Options):
        super().__init__()
        self.ln_1 = make_norm(cfg)
        self.attn = CausalSelfAttention(cfg, opts)
        self.ln_2 = make_norm(cfg)
        self.mlp = MLP(cfg, opts)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig, opts: Options = Options()):
        super().__init__()
        if cfg.vocab_size <= 0:
            raise ValueError("GPT: vocab_size must be set (it comes from the dataset's meta.json)")
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd) if cfg.pos_embedding == "learned" else None
        self.drop = nn.Dropout(opts.dropout)
        self.blocks = nn.ModuleList(Block(cfg, opts) for _ in range(cfg.n_layer))
        self.ln_f = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.tipa_head = nn.Linear(cfg.n_embd, cfg.tipa_max + 1, bias=False) if cfg.tipa else None
        self.checkpoint_layers = opts.checkpoint_layers
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: scale residual projections by depth
            if name.endswith("c_proj.weight"):
                if opts.zero_init:  # each block starts as the identity; Muon's first update is full rank
                    nn.init.zeros_(p)
                else:
                    nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @classmethod
    def from_config(cls, cfg: Config, device: torch.device | None = None,
                    checkpoint_layers: int | None = None) -> "GPT":
        """The model of a run's config, with its implementation choices resolved for `device` (and
        cfg.checkpoint_layers unless the memory plan's number is given)."""
        layers = cfg.checkpoint_layers if checkpoint_layers is None else checkpoint_layers
        return cls(cfg.model, Options.of(cfg, device, layers))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; position embeddings excluded by default, as in nanoGPT."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.wpe.weight.numel() if non_embedding and self.wpe is not None else n

    def hidden(self, idx):
        """Final hidden states (B, T, C), after the last LayerNorm, of token ids idx (B, T)."""
        T = idx.shape[1]
        if T > self.cfg.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {self.cfg.block_size}")
        x = self.wte(idx)
        if self.wpe is not None:
            x = x + self.wpe(torch.arange(T, device=idx.device))
        x = self.drop(x)
        for i, block in enumerate(self.blocks):
            use_ckpt = i < self.checkpoint_layers and self.training
            x = checkpoint(block, x, use_reentrant=False) if use_ckpt else block(x)
        return self.ln_f(x)

    def forward(self, idx, targets=None, tipa_targets=None):
        """idx, targets, tipa_targets: (B, T) int64. Returns (logits, lm_loss, tipa_loss).

        Without targets only the last position's logits are computed (generation). lm_loss is the mean
        next-token cross-entropy in nats (with a vocabulary too large for full logits, charlm.loss computes
        it in chunks and logits is None); tipa_loss is None unless the model has a TIPA head and targets.
        """
        x = self.hidden(idx)  # (B, T, C)
        if targets is None:
            return self.lm_head(x[:, [-1], :]), None, None
        if uses_chunked_loss(self.cfg.vocab_size):  # unicode vocabularies: logits never materialised
            logits = None
            lm_loss = linear_cross_entropy(x.flatten(0, 1), self.lm_head.weight, targets.flatten())
        else:
            logits = self.lm_head(x)
            lm_loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.view(-1))
        tipa_loss = None
        if self.tipa_head is not None and tipa_targets is not None:
            tipa_logits = self.tipa_head(x).float()
            tipa_loss = F.cross_entropy(tipa_logits.view(-1, tipa_logits.size(-1)), tipa_targets.view(-1))
        return logits, lm_loss, tipa_loss

    def configure_optimizer(self, cfg: Config) -> torch.optim.AdamW | MuonAdamW:
        """AdamW with weight decay on matrices only (embeddings and linear weights); with --optimizer muon,
        the blocks' weight matrices go to Muon instead (charlm.optim.MuonAdamW).

        Fused on every device: besides being fastest, the fused step takes a `found_inf` flag, which lets
        the trainer skip a non-finite step without a host sync.
        """
        named = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        to_muon = cfg.optimizer == "muon"
        muon = [p for n, p in named if to_muon and is_hidden_matrix(n, p)]
        rest = [p for n, p in named if not (to_muon and is_hidden_matrix(n, p))]
        groups = [
            {"params": [p for p in rest if p.dim() >= 2], "weight_decay": cfg.weight_decay},
            {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0},
        ]
        if not to_muon:
            return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), fused=True)
        return MuonAdamW(muon, groups, muon_lr=cfg.muon_lr, muon_momentum=cfg.muon_momentum,
                         weight_decay=cfg.weight_decay, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2))

    @torch.no_grad()
    def generate(self, idx, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None):
        """Sample max_new_tokens tokens after idx (B, T), cropping the context to block_size."""
        for _ in range(max_new_tokens):
            context = idx[:, -self.cfg.block_size:]
            logits, _, _ = self(context)
            logits = logits[:, -1, :] / max(temperature, 1e-6)
            if top_k is not None:
                kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            next_token = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)
            idx = torch.cat((idx, next_token), dim=1)
        return idx
