"""Evaluation and sampling of trained runs: every character scored once, BPC as computed by hand."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from charlm.eval import evaluate, load_model, scoring_windows
from charlm.sample import sample
from charlm.trainer import train
from test_train import tiny_cfg

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("n, T, stride", [(50, 8, 8), (50, 8, 3), (9, 8, 8), (5, 8, 8), (100, 16, 1)])
def test_scoring_windows_score_every_target_once(n, T, stride):
    scored = np.zeros(n, dtype=int)
    T_eff = min(T, n - 1)
    for i, (start, first) in enumerate(scoring_windows(n, T, stride)):
        assert 0 <= start and start + T_eff <= n - 1
        scored[start + 1 + first: start + 1 + T_eff] += 1
        if i > 0:
            assert first >= T_eff - stride  # each scored target sees at least T - stride of context
    assert scored[0] == 0 and (scored[1:] == 1).all()


def test_eval_equals_hand_computed_cross_entropy(tiny_dataset, tmp_path):
    run = tmp_path / "run"
    train(tiny_cfg(tiny_dataset, run, max_iters=5, eval_interval=5))
    result = evaluate(run, device="cpu")
    model, cfg, _ = load_model(run, torch.device("cpu"))
    root, name = tiny_dataset
    tokens = torch.from_numpy(np.fromfile(root / name / "val.bin", dtype=np.uint8).astype(np.int64))
    T, total = cfg.model.block_size, 0.0
    with torch.no_grad():  # non-overlapping windows, then the tail window's unscored targets
        for start in range(0, len(tokens) - 1, T):
            s = min(start, len(tokens) - 1 - T)
            logits = model.lm_head(model.hidden(tokens[s:s + T][None]))[0]
            nll = F.cross_entropy(logits, tokens[s + 1:s + T + 1], reduction="none")
            total += nll[start - s:].double().sum().item()
    assert result["val_chars"] == len(tokens) - 1
    assert result["val_bpc"] == pytest.approx(total / (len(tokens) - 1) / math.log(2), rel=1e-6)
    assert json.loads((run / "eval.json").read_text())["test_bpc"] == result["test_bpc"]


def test_sample_generates_text(tiny_dataset, tmp_path):
    run = tmp_path / "run"
    train(tiny_cfg(tiny_dataset, run, max_iters=5, eval_interval=5))
    texts = sample(run, "<page>", max_new_tokens=20, num_samples=2, device="cpu")
    assert len(texts) == 2 and all(t.startswith("<page>") and len(t) == len("<page>") + 20 for t in texts)
    # top_k=1 keeps only the most likely character: sampling is then greedy decoding, whatever the seed.
    model, _, _ = load_model(run, torch.device("cpu"))
    ids = torch.tensor([list(b"<page>")])
    with torch.no_grad():
        for _ in range(20):
            logits, _, _ = model(ids[:, -model.cfg.block_size:])
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    greedy = bytes(ids[0].tolist()).decode("utf-8", errors="replace")
    assert sample(run, "<page>", max_new_tokens=20, top_k=1, seed=1, device="cpu") == [greedy]
    assert sample(run, "<page>", max_new_tokens=20, top_k=1, seed=2, device="cpu") == [greedy]
    for bad in ({"top_k": 0}, {"max_new_tokens": -1}, {"temperature": 0.0}):
        with pytest.raises(ValueError, match="sample: max_new_tokens must be"):
            sample(run, "<page>", device="cpu", **bad)
