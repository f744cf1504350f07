"""charlm.loss: the chunked linear cross-entropy against F.cross_entropy of full logits in float64."""
import pytest
import torch
import torch.nn.functional as F

from charlm import loss as loss_mod
from charlm.config import resolve
from charlm.loss import IGNORE_INDEX, linear_cross_entropy, token_nll
from charlm.model import GPT


def inputs(N, C, V, ignored=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, C, generator=g).requires_grad_()
    weight = (torch.randn(V, C, generator=g) / C**0.5).requires_grad_()
    targets = torch.randint(0, V, (N,), generator=g)
    targets[torch.randperm(N, generator=g)[:ignored]] = IGNORE_INDEX
    return x, weight, targets


def reference(x, weight, targets):
    """Loss and gradients of full float64 logits."""
    x64, w64 = (t.detach().double().requires_grad_() for t in (x, weight))
    loss = F.cross_entropy(x64 @ w64.T, targets, ignore_index=IGNORE_INDEX)
    return (loss, *torch.autograd.grad(loss, (x64, w64)))


def rel_err(a, ref):
    return ((a.double() - ref).norm() / ref.norm()).item()


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 7 rows at V = 300: many chunks, the last one short."""
    monkeypatch.setattr(loss_mod, "CHUNK_LOGITS", 7 * 300)


@pytest.mark.parametrize("N, C, V, ignored", [(1, 8, 300, 0), (50, 16, 300, 0), (64, 32, 300, 9), (23, 8, 300, 22)])
def test_matches_full_logits_in_fp32(small_chunks, N, C, V, ignored):
    x, weight, targets = inputs(N, C, V, ignored)
    got = linear_cross_entropy(x, weight, targets)
    got_grads = torch.autograd.grad(got * 3.0, (x, weight))  # a non-unit upstream gradient
    ref, *ref_grads = reference(x, weight, targets)
    assert got.dtype == torch.float32 and abs(got.item() - ref.item()) < 1e-5 * ref.item()
    for g, r in zip(got_grads, ref_grads):
        assert g.dtype == torch.float32 and rel_err(g, 3.0 * r) < 1e-5
        assert torch.isfinite(g).all()


def test_ignored_rows_get_no_gradient(small_chunks):
    x, weight, targets = inputs(30, 8, 300, ignored=10)
    grad_x, = torch.autograd.grad(linear_cross_entropy(x, weight, targets), (x,))
    assert (grad_x[targets == IGNORE_INDEX] == 0).all() and (grad_x[targets != IGNORE_INDEX] != 0).any()


def test_autocast_bf16_matches_full_logits(small_chunks):
    x, weight, targets = inputs(64, 32, 300, ignored=5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = linear_cross_entropy(x, weight, targets)
        plain = F.cross_entropy((x @ weight.T).float(), targets)  # what the unchunked model does
    got_grads = torch.autograd.grad(got, (x, weight))
    ref, *ref_grads = reference(x, weight, targets)
    assert got.dtype == torch.float32 and abs(got.item() - plain.item()) < 1e-3
    assert abs(got.item() - ref.item()) < 1e-2 * ref.item()
    for g, r in zip(got_grads, ref_grads):
        assert g.dtype == torch.float32 and rel_err(g, r) < 1e-2


def test_without_grad_only_the_loss(small_chunks):
    x, weight, targets = inputs(40, 8, 300, ignored=3)
    with torch.no_grad():
        got = linear_cross_entropy(x, weight, targets)
    assert abs(got.item() - reference(x, weight, targets)[0].item()) < 1e-5 * got.item()
    nll = token_nll(x.detach(), weight.detach(), targets)
    expected = F.cross_entropy(x.detach() @ weight.detach().T, targets, reduction="none")
    torch.testing.assert_close(nll, expected)
    assert (nll[targets == IGNORE_INDEX] == 0).all()


def test_compiles_fullgraph(small_chunks):
    x, weight, targets = inputs(20, 8, 300, ignored=2)
    eager = torch.autograd.grad(linear_cross_entropy(x, weight, targets), (x, weight))
    compiled_fn = torch.compile(linear_cross_entropy, fullgraph=True)
    compiled = torch.autograd.grad(compiled_fn(x, weight, targets), (x, weight))
    for c, e in zip(compiled, eager):
        torch.testing.assert_close(c, e)


def test_model_chunks_large_vocabularies_only(monkeypatch):
    """Above the threshold the GPT takes the chunked path (no logits), with the loss and gradients of the
    full-logits path."""
    cfg = resolve("base", n_layer=1, n_head=2, n_embd=16, block_size=12, vocab_size=2000, dropout=0.0)
    torch.manual_seed(0)
    model = GPT.from_config(cfg)
    idx, targets = torch.randint(0, cfg.model.vocab_size, (2, 3, cfg.model.block_size))

    def loss_and_grads():
        logits, lm_loss, _ = model(idx, targets)
        return logits, lm_loss, torch.autograd.grad(lm_loss, list(model.parameters()))

    logits, chunked, chunked_grads = loss_and_grads()
    assert logits is None and loss_mod.uses_chunked_loss(cfg.model.vocab_size)
    monkeypatch.setattr("charlm.model.uses_chunked_loss", lambda vocab_size: False)
    logits, full, full_grads = loss_and_grads()
    assert logits.shape == (3, cfg.model.block_size, cfg.model.vocab_size)
    torch.testing.assert_close(chunked, full)
    for c, f in zip(chunked_grads, full_grads):
        torch.testing.assert_close(c, f)
    assert not loss_mod.uses_chunked_loss(256)
