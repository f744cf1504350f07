"""The modern condition: its blocks, its initialisation, Muon beside AdamW, the WSD schedule, and the
trainer's guarantees (non-finite steps skipped, exact resume) under Muon."""
import math

import pytest
import torch

from charlm.config import resolve
from charlm.job import train
from charlm.model import GPT, flops_per_token, hidden_matrix_parameters, mlp_hidden, parameter_counts
from charlm.optim import MuonAdamW, lr_at
from charlm.trainer import Trainer

SMALL = dict(vocab_size=37, n_layer=2, n_head=4, n_embd=48, block_size=16)


def modern(variant="modern", **overrides):
    return resolve(variant, **SMALL | overrides)


def test_modern_combines_with_deep_and_tipa():
    cfg = resolve("modern,deep,tipa")
    m = cfg.model
    assert (m.norm, m.mlp, m.qk_norm, m.bias, m.pos_embedding) == ("rmsnorm", "swiglu", True, False, "rope")
    assert cfg.zero_init
    assert (m.n_layer, m.block_size, m.tipa) == (32, 512, True)
    assert (cfg.optimizer, cfg.lr_schedule, cfg.dropout) == ("muon", "wsd", 0.0)
    assert resolve("base").optimizer == "adamw" and resolve("base").model.norm == "layernorm"


@pytest.mark.parametrize("mlp", ["gelu", "relu2", "swiglu"])
def test_modern_model_builds_trains_and_counts_its_parameters(mlp):
    cfg = modern(mlp=mlp, tipa=True)
    model = GPT.from_config(cfg)
    assert parameter_counts(cfg.model)[0] == sum(p.numel() for p in model.parameters())
    assert not any(isinstance(m, torch.nn.LayerNorm) for m in model.modules())
    assert all(m.bias is None for m in model.modules() if isinstance(m, torch.nn.Linear))
    idx = torch.randint(0, 37, (2, 16))
    _, lm_loss, tipa_loss = model(idx, idx, torch.zeros_like(idx))
    assert abs(lm_loss.item() - math.log(37)) < 0.5
    (lm_loss + tipa_loss).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_swiglu_has_the_parameters_of_the_4x_mlp():
    C = 96
    gelu, swiglu = modern(mlp="gelu", n_embd=C).model, modern(mlp="swiglu", n_embd=C).model
    assert mlp_hidden(swiglu) == 256 and 3 * 256 * C == 8 * C * C
    assert parameter_counts(swiglu) == parameter_counts(gelu)


def test_output_projections_start_at_zero_and_the_block_is_the_identity():
    model = GPT.from_config(modern())
    projections = [p for n, p in model.named_parameters() if n.endswith("c_proj.weight")]
    assert len(projections) == 4 and all(torch.count_nonzero(p) == 0 for p in projections)
    x = torch.randn(2, 16, 48)
    assert torch.equal(model.blocks[0](x), x)
    base = GPT.from_config(resolve("base", **SMALL))
    assert all(torch.count_nonzero(p) > 0 for n, p in base.named_parameters() if n.endswith("c_proj.weight"))


def test_qk_norm_bounds_the_attention_logits():
    """Scaling c_attn's query and key rows changes nothing with QK-norm, and changes the output without."""
    for qk_norm in (True, False):
        torch.manual_seed(0)
        model = GPT.from_config(modern(qk_norm=qk_norm, zero_init=False)).eval()
        idx = torch.randint(0, 37, (2, 16))
        before = model(idx, idx)[1]
        with torch.no_grad():
            for block in model.blocks:
                block.attn.c_attn.weight[:96] *= 7.0  # the q and k rows
        assert torch.allclose(model(idx, idx)[1], before, atol=1e-5) == qk_norm


def test_muon_takes_exactly_the_hidden_matrices():
    cfg = modern(tipa=True)
    model = GPT.from_config(cfg)
    optimizer = model.configure_optimizer(cfg)
    assert isinstance(optimizer, MuonAdamW)
    names = {id(p): n for n, p in model.named_parameters()}
    muon = {names[id(p)] for g in optimizer.muon.param_groups for p in g["params"]}
    adamw = {names[id(p)] for g in optimizer.adamw.param_groups for p in g["params"]}
    hidden = {f"blocks.{i}.{m}.weight" for i in range(2) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc",
                                                                  "mlp.c_proj")}
    assert muon == hidden and not muon & adamw and muon | adamw == set(names.values())
    assert sum(model.get_parameter(n).numel() for n in muon) == hidden_matrix_parameters(cfg.model)
    assert {"wte.weight", "lm_head.weight", "tipa_head.weight", "ln_f.weight"} <= adamw
    assert [g["peak_lr"] for g in optimizer.param_groups] == [cfg.muon_lr, cfg.learning_rate, cfg.learning_rate]
    plain = resolve("rope", **SMALL)
    assert isinstance(GPT.from_config(plain).configure_optimizer(plain), torch.optim.AdamW)


def test_wsd_warms_up_holds_then_decays_linearly():
    cfg = resolve("modern", max_iters=100, warmup_iters=10, decay_fraction=0.4, min_lr_ratio=0.1, learning_rate=1.0)
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(10, cfg) == lr_at(60, cfg) == 1.0  # stable until the last 40 steps
    assert lr_at(80, cfg) == pytest.approx(0.55) and lr_at(100, cfg) == pytest.approx(0.1)
    assert lr_at(500, cfg) == pytest.approx(0.1)  # an --extend'ed tail stays at the end
    assert lr_at(60, cfg, peak=0.02) == 0.02 and lr_at(80, cfg, peak=0.02) == pytest.approx(0.011)


def test_the_cosine_default_is_unchanged():
    cfg = resolve("base", max_iters=100, warmup_iters=10, learning_rate=6e-4)
    for step in (0, 5, 10, 37, 99, 100, 150):
        if step < 10:
            expected = 6e-4 * (step + 1) / 10
        else:
            ratio = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - 10) / 90)))
            expected = 6e-4 * ratio
        assert lr_at(step, cfg) == expected


def test_flops_per_token_counts_the_modern_block():
    for mlp, fc_out, hidden in (("relu2", 4 * 48, 4 * 48), ("swiglu", 2 * 128, 128)):
        m = modern(mlp=mlp).model
        C, L, T, V = 48, 2, 16, 37
        weights = L * (3 * C * C + C * C + fc_out * C + hidden * C + 2 * C) + C + V * C  # norms: a gain each
        assert flops_per_token(m) == 6 * weights + 6 * L * T * C


def trainer_cfg(tiny_dataset, run_dir, **overrides):
    root, name = tiny_dataset
    values = dict(dataset=name, data_root=str(root), out_dir=str(run_dir), device="cpu", compile=False,
                  batch_size=8, eval_interval=5, eval_iters=1, log_interval=1, n_layer=1, n_embd=32)
    return resolve("modern", "tiny", **values | overrides)


def test_a_nonfinite_step_moves_neither_optimizer(tiny_dataset, tmp_path):
    trainer = Trainer(trainer_cfg(tiny_dataset, tmp_path / "run", max_iters=6), quiet=True)
    forward = trainer.model.forward

    def nan_at_step_3(*args, **kwargs):
        logits, lm_loss, tipa_loss = forward(*args, **kwargs)
        return logits, lm_loss * (float("nan") if trainer.step == 3 else 1.0), tipa_loss

    trainer.model.forward = nan_at_step_3
    trainer.run(until=3)
    weights = {k: v.clone() for k, v in trainer.raw_model.state_dict().items()}
    momentum = [s["momentum_buffer"].clone() for s in trainer.optimizer.muon.state.values()]
    moments = [s["exp_avg"].clone() for s in trainer.optimizer.adamw.state.values()]
    trainer.run(until=4)
    assert all(torch.equal(weights[k], v) for k, v in trainer.raw_model.state_dict().items())
    assert all(torch.equal(a, s["momentum_buffer"]) for a, s in zip(momentum, trainer.optimizer.muon.state.values()))
    assert all(torch.equal(a, s["exp_avg"]) for a, s in zip(moments, trainer.optimizer.adamw.state.values()))
    assert trainer.skipped_steps.item() == 1
    trainer.run()
    assert not torch.equal(weights["blocks.0.attn.c_attn.weight"], trainer.raw_model.blocks[0].attn.c_attn.weight)


def test_resume_under_muon_continues_exactly(tiny_dataset, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    schedule = dict(max_iters=12, warmup_iters=2)  # warm-up, stable and decay all on both sides of the resume
    train(trainer_cfg(tiny_dataset, straight, **schedule))
    Trainer(trainer_cfg(tiny_dataset, resumed, **schedule), quiet=True).run(until=6)
    trainer = train(trainer_cfg(tiny_dataset, resumed, resume=True, **schedule))
    assert trainer.step == 12
    a, b = torch.load(straight / "ckpt_00000012.pt"), torch.load(resumed / "ckpt_00000012.pt")
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    assert set(a["optimizer"]) == {"muon", "adamw"}
    for kind in ("muon", "adamw"):
        for key, state in a["optimizer"][kind]["state"].items():
            for name, tensor in state.items():
                assert torch.equal(tensor, b["optimizer"][kind]["state"][key][name]), (kind, key, name)


def test_flops_to_target_interpolates_the_first_crossing():
    """results/modern/flops_to_target.py, which results.md's FLOPs-to-target column comes from."""
    import importlib.util
    from pathlib import Path
    path = Path(__file__).parents[2] / "results" / "modern" / "flops_to_target.py"
    spec = importlib.util.spec_from_file_location("flops_to_target", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    x, y = script.mean_curve([([1.0, 2.0, 3.0], [3.0, 2.0, 1.0]), ([1.0, 2.0, 3.0], [3.0, 1.0, 1.0])])
    assert list(x) == [1.0, 2.0, 3.0] and list(y) == [3.0, 1.5, 1.0]
    assert script.flops_to_reach(x, y, 2.0) == pytest.approx(1.0 + 1.0 / 1.5)
    assert script.flops_to_reach(x, y, 3.5) == 1.0 and script.flops_to_reach(x, y, 0.5) is None
