"""End-to-end runs of the trainer, evaluation and sampling on a generated corpus (CPU, tiny preset)."""
import json
import math

import pytest
import torch

from charlm.checkpoint import load_model
from charlm.config import resolve
from charlm.job import train
from charlm.optim import lr_at
from charlm.train import main
from charlm.trainer import Trainer

pytestmark = pytest.mark.integration


def tiny_cfg(tiny_dataset, out_dir, variant="base", **overrides):
    root, name = tiny_dataset
    values = dict(dataset=name, data_root=str(root), out_dir=str(out_dir), device="cpu", compile=False, batch_size=16,
                  max_iters=40, eval_interval=20, eval_iters=4, log_interval=5)
    return resolve(variant, "tiny", **{**values, **overrides})


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_training_learns_and_writes_its_run_folder(tiny_dataset, tmp_path):
    run = tmp_path / "run"
    train(tiny_cfg(tiny_dataset, run, max_iters=80, eval_interval=40))
    rows = metrics(run)
    assert [r["step"] for r in rows] == list(range(5, 81, 5))
    assert all(math.isclose(r["train_bpc"], r["train_loss"] / math.log(2)) for r in rows)
    val = [r for r in rows if "val_bpc" in r]
    assert [r["step"] for r in val] == [40, 80]
    assert rows[-1]["train_bpc"] < 3.5 and val[-1]["val_bpc"] < 3.5  # uniform is 8 bits
    saved = json.loads((run / "config.json").read_text())
    assert saved["model"]["n_layer"] == 2 and saved["attn"] == "sdpa" and saved["model"]["vocab_size"] == 256
    assert (run / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert (run / "checkpoints.json").is_file()


@pytest.mark.parametrize("variant", ["rope,tipa"])
def test_tipa_logs_its_auxiliary_loss_apart(tiny_dataset, tmp_path, variant):
    run = tmp_path / "run"
    train(tiny_cfg(tiny_dataset, run, variant, max_iters=10, eval_interval=10, log_interval=1))
    row = metrics(run)[-1]
    assert "tipa_loss" in row and row["tipa_loss"] > 0
    assert math.isclose(row["train_bpc"], row["train_loss"] / math.log(2))
    # The first row's losses are those of step 0's batch under the initial weights (dropout is off in the
    # tiny preset): train_loss is the next-character loss alone, TIPA's term is logged apart.
    first = metrics(run)[0]
    fresh = Trainer(tiny_cfg(tiny_dataset, tmp_path / "fresh", variant, max_iters=10), quiet=True)
    x, y, t = fresh.train_loader.batch(0)
    with torch.no_grad():
        _, lm_loss, tipa_loss = fresh.model(x, y, t)
    assert first["step"] == 1 and first["train_loss"] == pytest.approx(lm_loss.item(), rel=1e-5)
    assert first["tipa_loss"] == pytest.approx(tipa_loss.item(), rel=1e-5)
    assert abs(first["train_loss"] - (lm_loss + fresh.cfg.tipa_lambda * tipa_loss).item()) > 1e-3


def test_resume_continues_exactly(tiny_dataset, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(tiny_cfg(tiny_dataset, straight, max_iters=20, eval_interval=10, dropout=0.1))
    Trainer(tiny_cfg(tiny_dataset, resumed, max_iters=20, eval_interval=10, dropout=0.1)).run(until=10)
    train(tiny_cfg(tiny_dataset, resumed, max_iters=20, eval_interval=10, dropout=0.1, resume=True))
    a, b = torch.load(straight / "ckpt_00000020.pt"), torch.load(resumed / "ckpt_00000020.pt")
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    keys = ("step", "train_loss", "val_loss", "lr")
    rows = [[{k: r.get(k) for k in keys} for r in metrics(run)] for run in (straight, resumed)]
    assert rows[0] == rows[1]


def test_existing_run_needs_resume(tiny_dataset, tmp_path):
    run = tmp_path / "run"
    train(tiny_cfg(tiny_dataset, run, max_iters=5, eval_interval=5))
    with pytest.raises(ValueError, match="--resume"):
        train(tiny_cfg(tiny_dataset, run, max_iters=5, eval_interval=5))


def test_compiled_training_matches_eager_and_saves_plain_weights(tiny_dataset, tmp_path):
    """--compile compiles the blocks one by one: same losses as eager, and checkpoints keep the plain
    parameter names, so eval, sampling and resuming need not know."""
    losses, keys = {}, {}
    for compiled in (False, True):
        run = tmp_path / f"compiled-{compiled}"
        train(tiny_cfg(tiny_dataset, run, "rope", compile=compiled, max_iters=4, eval_interval=4, log_interval=1))
        losses[compiled] = [r["train_loss"] for r in metrics(run)]
        keys[compiled] = set(load_model(run, torch.device("cpu"))[0].state_dict())
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)
    assert keys[True] == keys[False]


def test_a_resumed_run_keeps_its_variant(tiny_dataset, tmp_path):
    root, name = tiny_dataset
    run = tmp_path / "run"
    train(tiny_cfg(tiny_dataset, run, max_iters=2, eval_interval=2))
    argv = ["--dataset", name, "--data-root", str(root), "--out-dir", str(run), "--device", "cpu", "--resume"]
    with pytest.raises(SystemExit, match=r"keeps its variant and preset: drop --variant rope \(the run has 'base'\)"):
        main(argv + ["--variant", "rope"])


def test_missing_dataset_says_which_command_prepares_it(tmp_path):
    with pytest.raises(SystemExit, match="python -m charlm.data enwik8"):
        main(["--preset", "tiny", "--data-root", str(tmp_path), "--device", "cpu"])


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    cfg = resolve("base", warmup_iters=10, max_iters=110, learning_rate=1.0, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.55)
    assert lr_at(110, cfg) == pytest.approx(0.1)


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["base", "rope", "deep,rope,tipa"])
def test_gpu_training_with_the_triton_kernels_follows_sdpa(tiny_dataset, tmp_path, variant):
    """On a GPU, compiled and in bf16: the Triton kernels (RoPE alone, flash attention with RoPE fused)
    train the model along the same loss curve as SDPA with PyTorch's RoPE."""
    sizes = dict(n_layer=2, n_head=2, n_embd=128, block_size=128, device="cuda", compile=True, max_iters=30,
                 eval_interval=30, log_interval=5)
    curves = {}
    for attn, rope in (("sdpa", "torch"), ("sdpa", "triton"), ("triton", "triton"), ("triton", "fused")):
        run = tmp_path / f"{attn}-{rope}"
        train(tiny_cfg(tiny_dataset, run, variant, attn=attn, rope_impl=rope, **sizes))
        curves[attn, rope] = [r["train_loss"] for r in metrics(run)]
    reference = curves["sdpa", "torch"]
    assert reference[-1] < reference[0] - 0.5  # it learns
    for impls, curve in curves.items():
        assert curve == pytest.approx(reference, rel=3e-2), impls  # bf16 sums differ in order
