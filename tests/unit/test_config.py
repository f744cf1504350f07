import argparse
import json

import pytest

from charlm.config import PRESETS, Config, add_config_args, config_from_args, resolve


def parse(argv):
    parser = argparse.ArgumentParser()
    add_config_args(parser)
    return config_from_args(parser.parse_args(argv))


def test_variants_match_the_report():
    base, deep = resolve("base"), resolve("deep")
    m = base.model
    assert (m.n_layer, m.n_head, m.n_embd, m.block_size, base.dropout) == (16, 8, 512, 256, 0.1)
    assert (deep.model.n_layer, deep.model.block_size) == (32, 512)
    assert resolve("rope").model.pos_embedding == "rope" and resolve("rope").rope_theta == 10000.0
    tipa = resolve("tipa")
    assert tipa.model.tipa and (tipa.tipa_lambda, tipa.model.tipa_max, tipa.tipa_scope) == (0.1, 16, "word")


def test_variants_combine_and_preset_then_flags_win():
    cfg = resolve("deep,rope,tipa", "tiny", n_embd=128)
    assert cfg.model.pos_embedding == "rope" and cfg.model.tipa
    assert cfg.model.n_layer == PRESETS["tiny"]["n_layer"] and cfg.model.n_embd == 128


def test_every_field_is_a_flag():
    cfg = parse(["--variant", "deep", "--n-embd", "768", "--n-head", "12", "--no-compile", "--max-iters", "7",
                 "--learning-rate", "1e-3", "--attn", "naive"])
    m = cfg.model
    assert (m.n_layer, m.n_embd, m.n_head, cfg.compile, cfg.max_iters) == (32, 768, 12, False, 7)
    assert cfg.learning_rate == 1e-3 and cfg.attn == "naive"
    assert parse([]).compile is None  # unset flags keep the defaults


@pytest.mark.parametrize("overrides, message", [
    ({"n_head": 7}, "n_head \\(7\\) must divide n_embd"),
    ({"attn": "flash"}, "attn must be"),
    ({"micro_batch_size": 5}, "must divide batch_size"),
    ({"dropout": 1.0}, "dropout"),
    ({"block_size": 0}, "must be positive"),
    ({"eval_iters": 0}, "eval_iters must be positive"),
    ({"learning_rate": -1.0}, "learning_rate must be positive \\(-1.0\\)"),
    ({"min_lr_ratio": 2.0}, "min_lr_ratio in \\[0, 1\\] \\(2.0\\)"),
    ({"beta2": 1.0}, "beta1, beta2 in"),
    ({"keep_checkpoints": 0}, "keep_checkpoints and max_bad_steps must be at least 1"),
    ({"compile_mode": "fast"}, "compile_mode must be one of"),
    ({"rope_impl": "fused", "attn": "sdpa"}, "rope_impl fused needs attn triton"),
])
def test_invalid_configs_name_the_problem(overrides, message):
    with pytest.raises(ValueError, match=message):
        resolve("base", **overrides)


def test_unknown_variant_and_preset():
    with pytest.raises(ValueError, match="unknown variant 'wide'"):
        resolve("base,wide")
    with pytest.raises(ValueError, match="unknown preset"):
        resolve("base", "huge")


def test_save_and_load_round_trip(tmp_path):
    cfg = resolve("deep,rope", "tiny", seed=3)
    cfg.save(tmp_path / "config.json")
    assert json.loads((tmp_path / "config.json").read_text())["variant"] == "deep,rope"
    assert Config.load(tmp_path / "config.json") == cfg
