"""The evaluation protocols: the full-context path (charlm.sliding) against stride-1 windows, and the
context statistics eval.json records."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from charlm.config import ModelConfig
from charlm.eval import split_bpc
from charlm.model import GPT, Options
from charlm.protocol import (
    check_protocol,
    default_stride,
    full_context_rows,
    full_contexts,
    scoring_windows,
    window_contexts,
)
from charlm.sliding import sliding_hidden

CPU = torch.device("cpu")


def tiny_model(n_layer: int, pos: str = "rope", T: int = 8, seed: int = 0, **modern) -> GPT:
    torch.manual_seed(seed)
    cfg = ModelConfig(n_layer=n_layer, n_head=2, n_embd=16, block_size=T, vocab_size=11, pos_embedding=pos, **modern)
    model = GPT(cfg, Options(attn="naive", rope_impl="torch")).double().eval()
    with torch.no_grad():  # larger weights than GPT's init, so that attention is far from uniform
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model


def stride1_nll(model: GPT, ids: torch.Tensor) -> torch.Tensor:
    """Target t predicted from the window of the block_size tokens ending at t - 1, by model.hidden."""
    T, out = model.cfg.block_size, []
    with torch.no_grad():
        for t in range(1, len(ids)):
            h = model.hidden(ids[max(0, t - T):t][None])[0, -1]
            out.append(F.cross_entropy(model.lm_head(h), ids[t]))
    return torch.stack(out)


def sliding_nll(model: GPT, ids: torch.Tensor, chunk: int) -> torch.Tensor:
    h = torch.cat([h for _, h in sliding_hidden(model, ids[None, :-1], chunk)], 1)[0]
    return F.cross_entropy(model.lm_head(h), ids[1:], reduction="none")


@pytest.mark.parametrize("chunk", [3, 8, 13])
@pytest.mark.parametrize("block", [{}, {"norm": "rmsnorm", "mlp": "swiglu", "qk_norm": True, "bias": False}],
                         ids=["base", "modern"])
def test_one_layer_sliding_path_equals_stride1_windows(chunk, block):
    model = tiny_model(n_layer=1, **block)
    ids = torch.randint(0, 11, (40,), generator=torch.Generator().manual_seed(1))
    expected = stride1_nll(model, ids)
    torch.testing.assert_close(sliding_nll(model, ids, chunk), expected, rtol=1e-10, atol=1e-10)


def test_deeper_sliding_path_is_the_banded_mask_whatever_the_chunks():
    """With the whole sequence in one chunk there is no cache: the banded mask alone. Cached chunks must
    give the same; stride-1 windows do not (they truncate the lower layers at each window's start)."""
    model = tiny_model(n_layer=3)
    ids = torch.randint(0, 11, (50,), generator=torch.Generator().manual_seed(2))
    whole = sliding_nll(model, ids, chunk=len(ids))
    for chunk in (1, 5, 8):
        torch.testing.assert_close(sliding_nll(model, ids, chunk), whole, rtol=1e-10, atol=1e-10)
    stride1 = stride1_nll(model, ids)
    torch.testing.assert_close(whole[:8], stride1[:8], rtol=1e-10, atol=1e-10)  # the first window: the same
    assert (whole[8:] - stride1[8:]).abs().max() > 1e-6


@pytest.mark.parametrize("n_layer, batch_size", [(1, 1), (1, 4), (3, 2), (3, 7)])
def test_full_protocol_bpc_is_independent_of_batching(n_layer, batch_size):
    """split_bpc cuts the split into rows with a warm-up: the rows must not change the result."""
    model = tiny_model(n_layer)
    tokens = np.random.default_rng(3).integers(0, 11, 300).astype(np.uint8)
    ids = torch.from_numpy(tokens.astype(np.int64))
    expected = (stride1_nll(model, ids) if n_layer == 1 else sliding_nll(model, ids, len(ids))).mean()
    bpc, chars = split_bpc(model, tokens, 8, None, batch_size, CPU, torch.autocast("cpu", enabled=False),
                           protocol="full")
    assert chars == len(tokens) - 1
    assert bpc == pytest.approx(expected.item() / np.log(2), rel=1e-6)


def test_full_context_rows_cover_every_input_once_after_a_warm_up():
    for n, parts in ((300, 4), (300, 1), (30, 8), (10_001, 32)):
        rows = full_context_rows(n, 8, 3, parts)
        covered = np.zeros(n - 1, dtype=int)
        for start, first, end in rows:
            covered[first:end] += 1
            assert start == max(0, first - 3 * 7)
        assert (covered == 1).all()


def test_sliding_path_refuses_learned_positions():
    model = tiny_model(1, pos="learned")
    with pytest.raises(ValueError, match="rotary"):
        next(sliding_hidden(model, torch.zeros(1, 4, dtype=torch.long)))
    with pytest.raises(ValueError, match="--protocol full needs rotary positions.*--stride"):
        check_protocol("full", 0, "", "learned")
    with pytest.raises(ValueError, match="--stride applies to --protocol windows"):
        check_protocol("full", 4, "", "rope")


@pytest.mark.parametrize("n, T, stride", [(50, 8, 2), (50, 8, 8), (9, 8, 8), (101, 16, 4), (100, 16, 1)])
def test_window_contexts_are_counted_exactly(n, T, stride):
    """Contexts from scoring_windows, against a count character by character."""
    T_eff = min(T, n - 1)
    context = {}
    for start, first in scoring_windows(n, T, stride):
        for o in range(first, T_eff):
            context[start + o + 1] = o + 1  # target start+o+1 is predicted from inputs start..start+o
    stats = window_contexts(scoring_windows(n, T, stride), T_eff).summary()
    later = [c for t, c in context.items() if t > T_eff]
    assert stats["chars"] == n - 1 == len(context)
    assert stats["mean_context"] == pytest.approx(np.mean(list(context.values())))
    assert stats["min_context_all"] == min(context.values()) == 1
    assert stats["min_context"] == (min(later) if later else None)
    if later:
        assert stats["min_context"] >= T - stride + 1


def test_default_stride_gives_three_quarters_of_the_context():
    T = 512
    stats = window_contexts(scoring_windows(100_000, T, default_stride(T)), T).summary()
    assert stats["min_context"] == 3 * T // 4 + 1
    assert 7 * T / 8 - 1 < stats["mean_context"] < T


def test_full_contexts_counted_exactly():
    for n, T in ((50, 8), (5, 8), (9, 8)):
        contexts = [min(t, T) for t in range(1, n)]
        stats = full_contexts(n, T).summary()
        assert stats["chars"] == n - 1
        assert stats["mean_context"] == pytest.approx(np.mean(contexts))
        assert stats["min_context"] == (T if n - 1 > T else None) and stats["min_context_all"] == 1
