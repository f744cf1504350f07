"""Exports of a run: charlm's weights-only safetensors, and transformers models that compute charlm's logits.

Runs are checkpoints of models with random weights drawn large enough that every tensor moves the logits
(a transposed, misordered or dropped weight is then far outside the tolerance).
"""
import json
import subprocess
import sys

import pytest
import torch
import transformers  # a dev dependency: CI has it, so these tests never skip

from charlm.checkpoint import CheckpointError, save_best, save_checkpoint
from charlm.config import Config, resolve
from charlm.data import encode_text, load_meta, prepare
from charlm.export.card import TOKENIZER
from charlm.export.command import main
from charlm.kernels import rope
from charlm.model import GPT
from charlm.weights import MODEL_CONFIG, WEIGHTS, ExportError, load_safetensors, write_safetensors

pytestmark = pytest.mark.integration

HF_FILES = {"config.json", "model.safetensors", TOKENIZER, "README.md"}
ANOTHER_DATASET = {"dataset_sha256": "0" * 64}  # the fingerprint of a dataset other than the one on disk


def random_model(cfg: Config, seed: int = 0) -> GPT:
    """GPT(cfg) in eval mode with every weight random: LayerNorm gains around 1, all else around 0."""
    torch.manual_seed(seed)
    model = GPT.from_config(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            gain = name.endswith("weight") and ("ln_" in name)
            p.copy_(torch.randn_like(p) * (0.3 if p.dim() > 1 else 0.2) + (1.0 if gain else 0.0))
    return model


def make_run(run_dir, tiny_dataset, variant="base", bias=True, step=7, seed=0, **overrides) -> tuple[GPT, Config]:
    """A run folder whose one checkpoint (step `step`) holds a random model of the tiny preset."""
    root, name = tiny_dataset
    values = dict(dataset=name, data_root=str(root), vocab_size=256, bias=bias, compile=False)
    cfg = resolve(variant, "tiny", **{**values, **overrides})
    model = random_model(cfg, seed)
    save_checkpoint(run_dir, step, {"model": model.state_dict(), "config": cfg.to_dict()})
    return model, cfg


def charlm_logits(model: GPT, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.lm_head(model.hidden(ids))


def load_hf(folder):
    model, info = transformers.AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert not any(info.values()), info  # no weight missing, unexpected or of the wrong shape
    return model.eval()


def refuses(argv, message):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    text = str(exit_info.value.code)
    assert text.startswith("error: ") and "\n" not in text.strip(), text
    assert message in text, text
    return text


def hf_rope_angles(seq_len, head_dim, theta=10000.0, offset=0, device=None, dtype=torch.float32):
    """charlm's rope_cos_sin rounded as transformers' NeoX rounds it: 1 / theta**x where charlm has
    theta**-x, and the angles in float32 whatever the model's dtype."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.arange(offset, offset + seq_len, dtype=torch.float32)[:, None] * inv_freq
    return angles.cos().to(device, dtype), angles.sin().to(device, dtype)


@pytest.mark.parametrize("variant, bias, architecture, theta", [
    ("base", True, "GPT2LMHeadModel", 1e4), ("base", False, "GPT2LMHeadModel", 1e4),
    ("rope", True, "GPTNeoXForCausalLM", 1e4), ("rope", False, "GPTNeoXForCausalLM", 1e4),
    ("rope,tipa", True, "GPTNeoXForCausalLM", 500.0), ("tipa", False, "GPT2LMHeadModel", 1e4),
])
def test_hf_model_computes_charlm_logits(tiny_dataset, tmp_path, monkeypatch, variant, bias, architecture, theta):
    model, cfg = make_run(tmp_path / "run", tiny_dataset, variant, bias, rope_theta=theta)
    main([str(tmp_path / "run"), "--to", "hf", str(tmp_path / "hf")])
    hf = load_hf(tmp_path / "hf")
    assert type(hf).__name__ == architecture
    ids = torch.randint(0, 256, (3, cfg.model.block_size), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = hf(ids).logits
    expected = charlm_logits(model, ids)
    assert expected.std() > 1.0  # logits of order 1: a wrong mapping differs by that much, not by 1e-5
    # As shipped, in float32: the attention kernels sum in other orders, and NeoX rounds its rotary angles
    # differently from charlm (a few 1e-6 rad at position 63) ...
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    # ... and in float64, with charlm's angles rounded as NeoX rounds them, the two compute the same.
    monkeypatch.setattr(rope, "rope_cos_sin", hf_rope_angles)
    with torch.no_grad():
        got = hf.double()(ids).logits
    torch.testing.assert_close(got, charlm_logits(model.double(), ids), atol=1e-12, rtol=0)


@pytest.mark.parametrize("variant", ["base", "rope"])
def test_hf_greedy_generation_with_its_cache_is_charlm_greedy_decoding(tiny_dataset, tmp_path, variant):
    model, _ = make_run(tmp_path / "run", tiny_dataset, variant)
    main([str(tmp_path / "run"), str(tmp_path / "hf")])
    prompt = torch.tensor([list(b"<page>")])
    out = load_hf(tmp_path / "hf").generate(prompt, max_new_tokens=12, do_sample=False, use_cache=True)
    ids = prompt
    for _ in range(12):
        ids = torch.cat([ids, charlm_logits(model, ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert out.tolist() == ids.tolist()


def test_safetensors_round_trip(tiny_dataset, tmp_path):
    cfg = resolve("rope,tipa", "tiny", dataset=tiny_dataset[1], vocab_size=256, bias=False, rope_theta=500.0)
    model = random_model(cfg)
    path = write_safetensors(tmp_path / "w", model, cfg)
    assert path == tmp_path / "w" / WEIGHTS and json.loads((tmp_path / "w" / MODEL_CONFIG).read_text()) == cfg.to_dict()
    loaded, loaded_cfg = load_safetensors(tmp_path / "w")
    assert loaded_cfg == cfg and not loaded.training
    state, original = loaded.state_dict(), model.state_dict()
    assert state.keys() == original.keys() and all(torch.equal(state[k], original[k]) for k in state)
    write_safetensors(tmp_path / "sd", original, cfg)  # a state dict gives the same file as its model
    assert (tmp_path / "sd" / WEIGHTS).read_bytes() == path.read_bytes()
    assert not list((tmp_path / "w").glob(".*.tmp"))


def rewrite_config(folder, **changes):
    cfg = Config.load(folder / MODEL_CONFIG).replace(**changes)
    (folder / MODEL_CONFIG).write_text(json.dumps(cfg.to_dict()))


@pytest.mark.parametrize("changes, message", [
    ({"tipa": False}, "tipa_head.weight is not in this model"),
    ({"tipa_max": 8}, "tipa_head.weight has shape (17, 64), the config needs (9, 64)"),
    ({"n_embd": 32}, "and 2"),  # every block's tensors differ: the first four are named, the rest counted
    ({"pos_embedding": "learned"}, "wpe.weight is missing"),
])
def test_safetensors_that_do_not_fit_their_config_are_refused(tiny_dataset, tmp_path, changes, message):
    cfg = resolve("rope,tipa", "tiny", dataset=tiny_dataset[1], vocab_size=256)
    write_safetensors(tmp_path, random_model(cfg), cfg)
    rewrite_config(tmp_path, **changes)
    with pytest.raises(CheckpointError) as refusal:
        load_safetensors(tmp_path)
    assert f"{tmp_path / WEIGHTS} does not fit its {MODEL_CONFIG}: " in str(refusal.value)
    assert message in str(refusal.value)


def test_unreadable_safetensors_are_refused(tiny_dataset, tmp_path):
    cfg = resolve("base", "tiny", dataset=tiny_dataset[1], vocab_size=256)
    model = random_model(cfg)
    with pytest.raises(ExportError, match=f"no {WEIGHTS}"):
        load_safetensors(tmp_path)
    write_safetensors(tmp_path, model, cfg)
    (tmp_path / MODEL_CONFIG).rename(tmp_path / "elsewhere.json")
    with pytest.raises(ExportError, match=f"no {MODEL_CONFIG}"):
        load_safetensors(tmp_path)
    (tmp_path / "elsewhere.json").rename(tmp_path / MODEL_CONFIG)
    data = (tmp_path / WEIGHTS).read_bytes()
    (tmp_path / WEIGHTS).write_bytes(data[:len(data) // 2])
    with pytest.raises(ExportError, match="not a readable safetensors file"):
        load_safetensors(tmp_path)
    with torch.no_grad():
        model.lm_head.weight[0, 0] = float("nan")
    write_safetensors(tmp_path, model, cfg)
    with pytest.raises(CheckpointError, match="non-finite"):
        load_safetensors(tmp_path)


def test_cli_writes_every_file_and_the_card_names_the_bpc(tiny_dataset, tmp_path, capsys):
    run, out = tmp_path / "run", tmp_path / "hf"
    make_run(run, tiny_dataset, "rope,tipa", bias=False)
    (run / "eval.json").write_text(json.dumps({"step": 7, "stride": 64, "val_bpc": 1.234567, "test_bpc": 1.3}))
    main([str(run), "--to", "hf", str(out)])
    assert capsys.readouterr().out.strip() == f"wrote {out}"
    assert {p.name for p in out.iterdir()} == HF_FILES
    card = (out / "README.md").read_text()
    assert "val BPC **1.2346**" in card and "test BPC **1.3000**" in card and "eval.json scored" not in card
    assert "license: mit" in card and "## License\n\nMIT" in card and "`tiny`" in card
    assert "TIPA head" in card and "is not included in this export" in card and "GPTNeoXForCausalLM" in card
    assert json.loads((out / TOKENIZER).read_text())["tokenization"] == "bytes"
    (run / "eval.json").write_text(json.dumps({"step": 5, "stride": 64, "val_bpc": 2.0, "test_bpc": 2.5}))
    main([str(run), str(out), "--overwrite"])
    assert "eval.json scored step 5; this export is step 7" in (out / "README.md").read_text()
    (run / "eval.json").unlink()
    main([str(run), str(out), "--overwrite"])
    card = (out / "README.md").read_text()
    assert "no eval.json" in card and "BPC **" not in card


def test_best_checkpoint_is_exported_when_asked(tiny_dataset, tmp_path):
    run = tmp_path / "run"
    _, cfg = make_run(run, tiny_dataset, "base", step=7)
    best = random_model(cfg, seed=3)
    save_best(run, 5, {"model": best.state_dict(), "config": cfg.to_dict()}, val_bpc=1.0)
    main([str(run), str(tmp_path / "hf"), "--checkpoint", "best"])
    assert "step 5" in (tmp_path / "hf" / "README.md").read_text()
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(load_hf(tmp_path / "hf")(ids).logits, charlm_logits(best, ids), atol=1e-5, rtol=1e-5)


def test_unicode_runs_export_their_character_table(tmp_path):
    text = "Größe und Übermaß — naïve café, ½ × π ≈ 1.57. " * 40
    meta = prepare(text.encode(), tmp_path / "data" / "uni", "unicode")
    run = tmp_path / "run"
    make_run(run, (tmp_path / "data", "uni"), "rope", vocab_size=meta["vocab_size"], block_size=32)
    main([str(run), str(tmp_path / "hf")])
    table = json.loads((tmp_path / "hf" / TOKENIZER).read_text(encoding="utf-8"))
    assert table["tokenization"] == "unicode" and table["vocab_size"] == meta["vocab_size"]
    index = {c: i for i, c in enumerate(table["id_to_char"])}  # the card's recipe
    assert [index[c] for c in text[:200]] == encode_text(text[:200], load_meta(tmp_path / "data" / "uni"))
    assert load_hf(tmp_path / "hf").config.vocab_size == meta["vocab_size"]
    # without its dataset, or with one prepared again since, the table is lost: refused, naming the dataset
    refuses([str(run), str(tmp_path / "hf2"), "--data-root", str(tmp_path / "nowhere")],
            f"the run's dataset {tmp_path / 'nowhere' / 'uni'} is not prepared, or not as the run saw it")
    make_run(run, (tmp_path / "data", "uni"), "rope", step=8, vocab_size=meta["vocab_size"], extra=ANOTHER_DATASET)
    refuses([str(run), str(tmp_path / "hf2")], f"the run's dataset {tmp_path / 'data' / 'uni'} is not prepared, or not")
    assert not (tmp_path / "hf2").exists()


@pytest.mark.parametrize("gone", ["absent", "prepared again"])
def test_byte_runs_export_without_their_dataset(tiny_dataset, tmp_path, gone):
    extra = ANOTHER_DATASET if gone == "prepared again" else {}
    make_run(tmp_path / "run", tiny_dataset, "base", extra=extra)
    data_root = tmp_path / "nowhere" if gone == "absent" else tiny_dataset[0]
    main([str(tmp_path / "run"), str(tmp_path / "hf"), "--data-root", str(data_root)])
    card = (tmp_path / "hf" / "README.md").read_text()
    assert "was not found at export time (or was prepared again since)" in card and "sha256" not in card
    table = json.loads((tmp_path / "hf" / TOKENIZER).read_text())
    assert table == {"tokenization": "bytes", "vocab_size": 256, "id_to_char": None,
                     "encode": "token id = each byte of the UTF-8 text"}


def test_bad_input_is_one_error_line(tiny_dataset, tmp_path):
    run, out = tmp_path / "run", tmp_path / "hf"
    refuses([str(run), str(out)], f"{run}: no such run folder")
    run.mkdir()
    refuses([str(run), str(out)], "no checkpoint found")
    _, cfg = make_run(run, tiny_dataset, "base")
    refuses([str(run), "--to", "onnx", str(out)], "--to 'onnx': unknown format; choose from hf")
    refuses([str(run), str(out), "--checkpoint", str(tmp_path / "nope.pt")], "no such checkpoint file")
    refuses([str(run), str(run)], "is the run folder or holds it")
    refuses([str(run), str(tmp_path)], "is the run folder or holds it")
    (run / "eval.json").write_text("{ torn")
    refuses([str(run), str(out)], "eval.json: not charlm.eval's result")
    (run / "eval.json").unlink()
    assert not out.exists()
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    refuses([str(run), str(out)], "is not empty; pass --overwrite")
    assert (out / "notes.txt").read_text() == "mine"


def test_a_checkpoint_whose_tipa_head_does_not_fit_its_config_is_refused(tiny_dataset, tmp_path):
    run = tmp_path / "run"
    model, cfg = make_run(run, tiny_dataset, "tipa", step=3)
    weights = {k: v for k, v in model.state_dict().items() if not k.startswith("tipa_head")}
    save_checkpoint(run, 4, {"model": weights, "config": cfg.to_dict()})  # says TIPA, holds no TIPA head
    text = refuses([str(run), str(tmp_path / "hf")], "its weights do not fit its config")
    assert "tipa_head.weight" in text
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize("variant, named", [("modern", "norm rmsnorm, mlp swiglu, qk_norm True"),
                                            ("rope", "qk_norm True")])
def test_a_block_transformers_cannot_compute_is_refused(tiny_dataset, tmp_path, variant, named):
    run = tmp_path / "run"
    make_run(run, tiny_dataset, variant, **({"qk_norm": True} if variant == "rope" else {}))
    refuses([str(run), "--to", "hf", str(tmp_path / "hf")], f"cannot compute this model's logits ({named};")
    assert not (tmp_path / "hf").exists()


def test_the_charlm_command_runs_the_export(tiny_dataset, tmp_path):
    run = tmp_path / "run"
    make_run(run, tiny_dataset, "rope")
    done = subprocess.run([sys.executable, "-m", "charlm", "export", str(run), "--to", "hf", str(tmp_path / "hf")],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert HF_FILES <= {p.name for p in (tmp_path / "hf").iterdir()}


def test_a_trained_and_evaluated_run_exports_both_ways(tiny_dataset, tmp_path):
    from test_train import tiny_cfg

    from charlm.checkpoint import load_model
    from charlm.eval import evaluate
    from charlm.job import train

    run = tmp_path / "run"
    trainer = train(tiny_cfg(tiny_dataset, run, "rope", max_iters=5, eval_interval=5))
    result = evaluate(run, device="cpu")
    assert (run / "model.safetensors").is_file()  # the trainer writes the final weights in the shared form
    main([str(run), "--to", "hf", str(tmp_path / "hf")])
    model, cfg, step = load_model(run, torch.device("cpu"))
    card = (tmp_path / "hf" / "README.md").read_text()
    assert f"val BPC **{result['val_bpc']:.4f}**" in card and f"step {step}" in card and "`tiny`: 200,000 bytes" in card
    ids = torch.randint(0, 256, (2, cfg.model.block_size), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(load_hf(tmp_path / "hf")(ids).logits, charlm_logits(model, ids), atol=1e-4, rtol=0)
    shared, shared_cfg = load_safetensors(run)
    assert shared_cfg == trainer.cfg and torch.equal(charlm_logits(shared, ids), charlm_logits(model, ids))
