"""Evaluation and sampling of trained runs: every character scored once, BPC as computed by hand."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_distributed import TORCHRUN
from test_distributed import run as run_command
from test_train import tiny_cfg

from charlm.checkpoint import load_model
from charlm.eval import evaluate
from charlm.job import train
from charlm.protocol import scoring_windows
from charlm.sample import sample

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
    model, cfg, _ = load_model(run, torch.device("cpu"))
    result = evaluate(run, device="cpu", stride=cfg.model.block_size)
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


def test_default_protocol_and_its_record(tiny_dataset, tmp_path):
    """Windows sliding by block_size // 4; eval.json says so, with the contexts and the splits' sizes."""
    run = tmp_path / "run"
    train(tiny_cfg(tiny_dataset, run, max_iters=2, eval_interval=2))
    result = evaluate(run, device="cpu")
    T = result["block_size"]
    protocol = json.loads((run / "eval.json").read_text())["protocol"]
    root, name = tiny_dataset
    sizes = json.loads((root / name / "meta.json").read_text())["splits"]
    assert protocol["name"] == "windows" and protocol["stride"] == result["stride"] == T // 4
    assert protocol["min_context"] == T - T // 4 + 1 and protocol["min_context_all"] == 1
    assert T - T // 4 < protocol["mean_context"] < T
    for split in ("val", "test"):
        assert protocol["splits"][split]["tokens"] == sizes[split]
        assert protocol["splits"][split]["chars"] == result[f"{split}_chars"] == sizes[split] - 1
    assert protocol["chars"] == sizes["val"] + sizes["test"] - 2
    with pytest.raises(ValueError, match="--protocol full needs rotary positions"):
        evaluate(run, device="cpu", protocol="full")


def test_full_protocol_of_a_one_layer_rope_run_equals_stride_1(tiny_dataset, tmp_path):
    """With one layer, sliding-window attention predicts each character from exactly the block_size
    characters before it, as windows sliding by one do (at block_size times the cost)."""
    run = tmp_path / "run"
    train(tiny_cfg(tiny_dataset, run, "rope", n_layer=1, max_iters=5, eval_interval=5))
    full = evaluate(run, device="cpu", protocol="full", splits=("val",), batch_size=3)
    stride1 = evaluate(run, device="cpu", stride=1, splits=("val",), batch_size=256, save=False)
    assert full["val_chars"] == stride1["val_chars"]
    assert full["val_bpc"] == pytest.approx(stride1["val_bpc"], rel=1e-5)
    protocol = json.loads((run / "eval.json").read_text())["protocol"]
    assert protocol["name"] == "full" and protocol["stride"] is None
    assert protocol["min_context"] == full["block_size"] and protocol["receptive_field"] == full["block_size"]


def test_full_protocol_under_torchrun_matches_one_process(tiny_dataset, tmp_path):
    run = tmp_path / "run"
    train(tiny_cfg(tiny_dataset, run, "rope", max_iters=2, eval_interval=2))
    single = evaluate(run, device="cpu", protocol="full", save=False)
    run_command([*TORCHRUN, "-m", "charlm.eval", str(run), "--device", "cpu", "--protocol", "full"])
    shared = json.loads((run / "eval.json").read_text())
    assert shared["protocol"] == single["protocol"]
    for split in ("val", "test"):
        assert shared[f"{split}_chars"] == single[f"{split}_chars"]
        assert shared[f"{split}_bpc"] == pytest.approx(single[f"{split}_bpc"], rel=1e-5)


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
