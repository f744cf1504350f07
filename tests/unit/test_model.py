import math

import pytest
import torch

from charlm.config import resolve
from charlm.model import GPT, flops_per_token

VARIANTS = ["base", "rope", "tipa", "deep", "deep,rope", "rope,tipa", "deep,rope,tipa", "modern", "modern,deep,tipa"]


def tiny(variant="base", **overrides):
    overrides = {"vocab_size": 37, "n_layer": 2, "n_embd": 32, "n_head": 4, "block_size": 16, **overrides}
    return resolve(variant, "tiny", **overrides)


def batch(cfg, B=3, T=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    T = T or cfg.model.block_size
    x = torch.randint(cfg.model.vocab_size, (B, T), generator=g)
    y = torch.randint(cfg.model.vocab_size, (B, T), generator=g)
    t = torch.randint(cfg.model.tipa_max + 1, (B, T), generator=g)
    return x, y, t


@pytest.mark.parametrize("variant", VARIANTS)
def test_forward_backward_shapes(variant):
    cfg = tiny(variant)
    model = GPT.from_config(cfg)
    x, y, t = batch(cfg)
    logits, lm_loss, tipa_loss = model(x, y, t)
    assert logits.shape == (3, cfg.model.block_size, cfg.model.vocab_size)
    assert (tipa_loss is not None) == cfg.model.tipa
    loss = lm_loss + (tipa_loss if tipa_loss is not None else 0)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    # a fresh model predicts about uniformly
    assert abs(lm_loss.item() - math.log(cfg.model.vocab_size)) < 0.5
    assert (model.wpe is None) == (cfg.model.pos_embedding == "rope")


# (attn, rope_impl): the references, the RoPE kernel, and flash attention with RoPE fused in.
IMPLS = [("sdpa", "torch"), ("naive", "torch"), ("sdpa", "triton"), ("triton", "triton"), ("triton", "fused")]


@pytest.mark.parametrize("variant", ["base", "rope", "modern"])  # modern: QK-norm before the (fused) RoPE
def test_attention_and_rope_implementations_agree(variant, kernel_device):
    """Logits and gradients of every implementation choice match (Triton through its interpreter on the CPU)."""
    x, y, _ = (t.to(kernel_device) for t in batch(tiny(variant)))
    results = []
    for attn, rope in IMPLS:
        torch.manual_seed(0)
        cfg = tiny(variant, attn=attn, rope_impl=rope, n_embd=64, n_head=2)  # head dim 32
        model = GPT.from_config(cfg).to(kernel_device)
        logits, loss, _ = model(x, y)
        results.append((logits, torch.autograd.grad(loss, list(model.parameters()))))
    (ref_logits, ref_grads), *others = results
    for (attn, rope), (logits, grads) in zip(IMPLS[1:], others):
        torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5, msg=f"{attn}/{rope}")
        for g, r in zip(grads, ref_grads):
            torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6, msg=f"{attn}/{rope}")


def test_model_is_causal():
    cfg = tiny("rope")
    model = GPT.from_config(cfg).eval()
    x, _, _ = batch(cfg)
    x2 = x.clone()
    x2[:, 10:] = (x2[:, 10:] + 1) % cfg.model.vocab_size
    h1, h2 = model.hidden(x), model.hidden(x2)
    torch.testing.assert_close(h1[:, :10], h2[:, :10])
    assert not torch.allclose(h1[:, 10:], h2[:, 10:])


def test_activation_checkpointing_gives_the_same_gradients():
    x, y, _ = batch(tiny())
    grads = []
    for layers in (0, 2):
        torch.manual_seed(0)
        model = GPT.from_config(tiny(checkpoint_layers=layers, dropout=0.0))
        model(x, y)[1].backward()
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_flops_per_token_formula():
    cfg = tiny()
    model = GPT.from_config(cfg)
    n = sum(p.numel() for p in model.parameters()) - cfg.model.block_size * cfg.model.n_embd  # without wpe
    assert model.num_params() == n
    matmul_params = n - cfg.model.vocab_size * cfg.model.n_embd  # the token embedding is a lookup
    m = cfg.model
    assert flops_per_token(m) == 6 * matmul_params + 6 * m.n_layer * m.block_size * m.n_embd


def test_generate_appends_tokens_and_crops_context():
    cfg = tiny()
    model = GPT.from_config(cfg).eval()
    out = model.generate(torch.zeros(2, 3, dtype=torch.long), max_new_tokens=cfg.model.block_size + 5, top_k=5)
    assert out.shape == (2, 3 + cfg.model.block_size + 5)
    assert int(out.max()) < cfg.model.vocab_size


def test_rejects_too_long_sequences_and_missing_vocab():
    cfg = tiny()
    with pytest.raises(ValueError, match="exceeds block_size"):
        GPT.from_config(cfg)(torch.zeros(1, cfg.model.block_size + 1, dtype=torch.long))
    with pytest.raises(ValueError, match="vocab_size must be set"):
        GPT.from_config(resolve("base", "tiny"))


def test_weight_decay_only_on_matrices():
    model = GPT.from_config(tiny())
    opt = model.configure_optimizer(tiny())
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and all(p.dim() >= 2 for p in decay["params"])
    assert no_decay["weight_decay"] == 0.0 and all(p.dim() < 2 for p in no_decay["params"])
