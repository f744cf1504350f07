"""charlm.study: steps at equal compute, skip and resume, the table's statistics, TIPA's BPC, the figure.

Studies run on the generated corpus with the tiny preset on the CPU, a few steps per run.
"""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from charlm.checkpoint import load_model
from charlm.protocol import default_stride, describe_protocol, protocol_cell, scoring_windows
from charlm.study import plan, report, stats
from charlm.study.__main__ import main, parse_args
from charlm.study.command import plan_study
from charlm.study.run import check_study_settings, run_config
from charlm.tipa import reverse_positions
from charlm.trainer import Trainer

TOKENS_PER_STEP = 8 * 64  # --batch-size 8, tiny preset's block_size 64


def study_argv(tiny_dataset, out_dir, conditions, steps, *extra):
    root, name = tiny_dataset
    return ["--dataset", name, "--data-root", str(root), "--conditions", conditions, "--seeds", "1",
            "--budget", str(steps * TOKENS_PER_STEP), "--budget-unit", "tokens", "--out-dir", str(out_dir),
            "--preset", "tiny", "--batch-size", "8", "--eval-iters", "2", "--device", "cpu", "--no-compile", *extra]


def metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# --- budget to steps ------------------------------------------------------------------------------

def hand_count(n_layer, n_embd, block_size, vocab=256, tipa_classes=0):
    """(N, training FLOPs per token) counted from the parameter shapes; position embeddings excluded, and the
    token embedding (a lookup) left out of the FLOPs."""
    C = n_embd
    block = (2 * C                    # ln_1 weight and bias
             + C * 3 * C + 3 * C      # c_attn: q, k, v
             + C * C + C              # attention c_proj
             + 2 * C                  # ln_2
             + C * 4 * C + 4 * C      # mlp c_fc
             + 4 * C * C + C)         # mlp c_proj
    n = vocab * C + n_layer * block + 2 * C + C * vocab + tipa_classes * C  # wte, blocks, ln_f, lm_head, tipa head
    return n, 6 * (n - vocab * C) + 6 * n_layer * block_size * C


# condition: (N, FLOPs per token, steps in 1e16 FLOPs at batch 64), by hand for width 512 and vocab 256:
# base: 16 * (12 * 512^2 + 13 * 512) + 2 * 256 * 512 + 2 * 512 = 50,701,312;
# 6 (N - 256 * 512) + 6 * 16 * 256 * 512 = 316,004,352; floor(1e16 / (316,004,352 * 64 * 256)) = 1931.
# deep: 32 layers, context 512 -> floor(1e16 / (656,381,952 * 32,768)) = 464.
HAND_CHECKED = {
    "base": (50_701_312, 316_004_352, 1931),
    "rope": (50_701_312, 316_004_352, 1931),  # no position table at all; base's is not counted either
    "tipa": (50_701_312 + 17 * 512, 316_004_352 + 6 * 17 * 512, 1931),  # the head: R + 1 = 17 classes
    "deep": (101_139_456, 656_381_952, 464),
    "deep+rope": (101_139_456, 656_381_952, 464),
}


@pytest.mark.parametrize("name", list(HAND_CHECKED))
def test_budget_becomes_steps_from_hand_counted_flops(tiny_dataset, name):
    root, data = tiny_dataset
    c = plan.plan_condition(name, 1e16, "flops", "", {"dataset": data, "data_root": str(root)})
    deep = name.startswith("deep")
    n, flops = hand_count(32 if deep else 16, 512, 512 if deep else 256, tipa_classes=17 if name == "tipa" else 0)
    assert (n, flops) == HAND_CHECKED[name][:2]
    assert (c.params, c.flops_per_token, c.steps) == HAND_CHECKED[name]
    assert c.flops <= 1e16 < c.flops + c.tokens_per_step * c.flops_per_token  # rounded down: never over budget
    tokens = plan.plan_condition(name, 1e9, "tokens", "", {"dataset": data, "data_root": str(root)})
    assert tokens.steps == 1e9 // (64 * (512 if deep else 256))


def test_plan_says_how_many_steps_each_condition_gets(tiny_dataset):
    root, data = tiny_dataset
    overrides = {"dataset": data, "data_root": str(root)}
    plans = [plan.plan_condition(n, 1e16, "flops", "", overrides) for n in ("base", "deep")]
    assert "base gets 1,931 steps, deep gets 464 steps" in plan.describe_plan(plans, 1e16, "flops")


def test_model_flags_apply_to_every_condition_and_are_recorded(tiny_dataset, tmp_path):
    args = parse_args(study_argv(tiny_dataset, tmp_path / "s", "base,deep", 2) + ["--n-layer", "1", "--n-embd", "32"])
    conditions, settings = plan_study(args)
    assert [(c.cfg.model.n_layer, c.cfg.model.n_embd) for c in conditions] == [(1, 32), (1, 32)]  # after the preset
    assert [c.params for c in conditions] == [hand_count(1, 32, 64)[0]] * 2
    assert (settings["n_layer"], settings["n_embd"]) == (1, 32)  # another depth in the same folder is refused
    assert not {"out_dir", "plan_only"} & set(settings)  # the study's own flags: a moved folder still resumes


@pytest.mark.parametrize("argv_extra, message", [
    (["--conditions", "base,wide"], "'wide'"),
    (["--conditions", "base,base"], "more than once"),
    (["--budget", "100", "--budget-unit", "flops"], "buys no step"),
    (["--only", "base:7"], "--only base:7"),
    (["--tokenization", "unicode"], "--tokenization unicode"),
    (["--conditions", "base,experts:base"], "python -m charlm.categorize tiny --data-root .* --method keywords"),
    (["--conditions", "base,,rope"], "has an empty name"),
])
def test_bad_input_fails_before_training(tiny_dataset, tmp_path, argv_extra, message):
    with pytest.raises(SystemExit, match=message):
        main(study_argv(tiny_dataset, tmp_path / "s", "base", 2) + argv_extra)
    assert not (tmp_path / "s" / "runs").exists()


def test_a_split_over_the_whole_run_is_refused(tiny_dataset, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(study_argv(tiny_dataset, tmp_path / "s", "base", 2) + ["--experts-split", "0.5,0.6,0.1"])
    assert "--experts-split 0.5,0.6,0.1: expected PRE,FINE,POST shares" in capsys.readouterr().err


def test_missing_unicode_enwik8_names_the_command(tmp_path):
    with pytest.raises(plan.StudyError, match="python -m charlm.data enwik8 --tokenization unicode"):
        plan.study_dataset("enwik8", str(tmp_path), "unicode")


def test_a_study_folder_refuses_other_settings(tmp_path):
    settings = {"budget": 1e16, "budget_unit": "flops"}
    check_study_settings(tmp_path, settings)
    check_study_settings(tmp_path, settings)  # the same settings again: fine
    with pytest.raises(plan.StudyError, match="batch_size: unset there, 32 now; budget: 1e\\+16 there, 2e\\+16 now"):
        check_study_settings(tmp_path, {**settings, "budget": 2e16, "batch_size": 32})


# --- statistics and the table ---------------------------------------------------------------------

def test_welch_interval_matches_r_on_the_sleep_data():
    """R's `t.test(extra ~ group, data = sleep)` (Welch by default): t = -1.8608, df = 17.776,
    95 percent confidence interval -3.3654832 0.2054832, means 0.75 and 2.33."""
    group1 = [0.7, -1.6, -0.2, -1.2, -0.1, 3.4, 3.7, 0.8, 0.0, 2.0]
    group2 = [1.9, 0.8, 1.1, 0.1, -0.1, 4.4, 5.5, 1.6, 4.6, 3.4]
    assert stats.welch_interval(group1, group2) == pytest.approx((0.75 - 2.33, -3.3654832, 0.2054832), abs=1e-7)
    d, lo, hi = stats.welch_interval(group1, group2, level=0.99)
    assert lo < -3.3654832 and hi > 0.2054832 and (lo + hi) / 2 == pytest.approx(d)  # wider, same centre


def test_welch_interval_needs_two_seeds_a_side_and_collapses_without_spread():
    assert stats.welch_interval([1.0, 2.0], [1.5]) == (pytest.approx(0.0), None, None)
    assert stats.welch_interval([1.2, 1.2], [1.0, 1.0, 1.0]) == pytest.approx((0.2, 0.2, 0.2))


def record(condition, seed, val, test):
    return {"condition": condition, "seed": seed, "params": 132_864, "steps": 20, "tokens": 10_240, "flops": 8.7e9,
            "val_bpc": val, "test_bpc": test, "checkpoint_step": 20, "selection": "final"}


def test_table_reports_mean_std_and_welch_interval():
    records = ([record("base", s, v, t) for s, (v, t) in enumerate([(1.1, 1.0), (1.3, 1.2), (1.5, 1.4)])]
               + [record("rope", s, v, t) for s, (v, t) in enumerate([(1.0, 0.9), (1.0, 1.0), (1.0, 1.1)])]
               + [record("tipa", 0, 1.35, 1.3)])
    rows = stats.summarize(records, "base")
    assert rows[0]["test_bpc"] == pytest.approx((1.2, 0.2))  # sample std of 1.0, 1.2, 1.4
    assert rows[1]["val_bpc"] == pytest.approx((1.0, 0.0))
    # rope - base: -0.2; se = sqrt(0.2^2/3 + 0.1^2/3) = 0.129099; Welch df = 2.9412; t(0.975, 2.9412) = 3.21887
    d, lo, hi = rows[1]["diff"]
    assert (d, lo, hi) == pytest.approx((-0.2, -0.2 - 3.21887 * 0.129099, -0.2 + 3.21887 * 0.129099), abs=1e-4)
    table = report.format_table(rows, "base").splitlines()
    assert table[0] == ("| condition | params | steps | tokens | seeds | val BPC | test BPC | "
                        "Δ test BPC vs base (95% CI) |")
    assert table[2] == "| base | 132.9k | 20 | 10.2k | 3 | 1.3000 ± 0.2000 | 1.2000 ± 0.2000 | (reference) |"
    assert table[3] == ("| rope | 132.9k | 20 | 10.2k | 3 | 1.0000 ± 0.0000 | 1.0000 ± 0.1000 "
                        "| -0.2000 [-0.6155, +0.2155] |")
    assert table[4] == "| tipa | 132.9k | 20 | 10.2k | 1 | 1.3500 ± n/a | 1.3000 ± n/a | +0.1000 [n/a] |"


def test_plot_draws_mean_and_band(tmp_path, drawn):
    curves = {"base": [([1e9, 2e9, 3e9], [4.0, 3.5, 3.2]), ([1e9, 2e9, 3e9], [4.1, 3.4, 3.3])],
              "deep": [([2e9, 3e9], [3.9, 3.1])]}
    path = report.plot_results(curves, tmp_path / "results.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (base_x, base_mean, _), (deep_x, deep_mean, _) = drawn["plot"]
    assert list(base_x) == [1e9, 2e9, 3e9] and list(base_mean) == pytest.approx([4.05, 3.45, 3.25])
    assert list(deep_x) == [2e9, 3e9] and list(deep_mean) == pytest.approx([3.9, 3.1])
    (band_x, low, high), = drawn["fill_between"]  # one band: deep has a single seed
    assert list(low) == pytest.approx([4.0, 3.4, 3.2]) and list(high) == pytest.approx([4.1, 3.5, 3.3])


# --- whole studies --------------------------------------------------------------------------------

@pytest.mark.integration
def test_rerun_skips_finished_runs_and_resumes_interrupted_ones(tiny_dataset, tmp_path, capsys, drawn):
    out = tmp_path / "study"
    argv = study_argv(tiny_dataset, out, "base,rope", 8, "--eval-interval", "4")
    main(argv + ["--only", "base:0"])  # one job of a multi-GPU user
    base = out / "runs" / "base-s0"
    done = {p.name: p.stat().st_mtime_ns for p in base.iterdir()}
    assert "result.json" in done and not (out / "results.md").exists()

    # rope-s0 is interrupted at step 4: exactly the run the study would launch, stopped half way
    root, name = tiny_dataset
    overrides = {"dataset": name, "data_root": str(root), "batch_size": 8, "eval_iters": 2, "eval_interval": 4,
                 "device": "cpu", "compile": False}
    rope = plan.plan_condition("rope", 8 * TOKENS_PER_STEP, "tokens", "tiny", overrides)
    Trainer(run_config(rope, 0, out)).run(until=4)
    capsys.readouterr()

    main(argv)
    printed = capsys.readouterr().out
    assert "base seed 0: done before, skipped" in printed
    assert "resumed" in printed and "at step 4" in printed
    assert {p.name: p.stat().st_mtime_ns for p in base.iterdir() if p.name in done} == done  # not retrained
    assert [r["step"] for r in metrics(out / "runs" / "rope-s0") if "val_bpc" in r] == [4, 8]
    assert json.loads((out / "runs" / "rope-s0" / "result.json").read_text())["checkpoint_step"] in (4, 8)
    assert "| base | 132.9k | 8 | 4.1k | 1 |" in printed and "| rope | 132.9k | 8 | 4.1k | 1 |" in printed
    assert (out / "results.md").read_text().count("| rope-s0 |") == 1
    assert (out / "results.png").read_bytes()[:4] == b"\x89PNG"
    *_, (base_x, base_y, _), (rope_x, rope_y, _) = drawn["plot"]  # the figure is drawn last: one line per condition
    for run, (x, y) in (("base-s0", (base_x, base_y)), ("rope-s0", (rope_x, rope_y))):
        result = json.loads((out / "runs" / run / "result.json").read_text())
        flops_per_step = result["flops_per_token"] * result["tokens_per_step"]
        val = [r for r in metrics(out / "runs" / run) if "val_bpc" in r]
        assert list(x) == pytest.approx([r["step"] * flops_per_step for r in val])  # steps 4 and 8, in FLOPs
        assert list(y) == pytest.approx([r["val_bpc"] for r in val])  # one seed: its curve is the mean
        assert f"| {run} | step {result['checkpoint_step']} ({result['selection']}) | {result['val_bpc']:.4f} " \
               f"| {result['test_bpc']:.4f} | {protocol_cell(result['protocol'])} |" in (out / "results.md").read_text()
        assert describe_protocol(result["protocol"]) in (out / "results.md").read_text()


@pytest.mark.integration
def test_tipa_bpc_counts_next_character_loss_only(tiny_dataset, tmp_path):
    out, lam = tmp_path / "study", 10.0
    main(study_argv(tiny_dataset, out, "tipa", 6, "--tipa-lambda", str(lam)))
    run = out / "runs" / "tipa-s0"
    result = json.loads((run / "result.json").read_text())

    # by hand: both losses of the evaluated checkpoint over the whole val split, each target scored once
    model, cfg, step = load_model(run, torch.device("cpu"), run / "best.pt")
    assert step == result["checkpoint_step"]
    protocol = result["protocol"]
    assert protocol["name"] == "windows" and protocol["stride"] == default_stride(cfg.model.block_size)
    root, name = tiny_dataset
    tokens = np.fromfile(root / name / "val.bin", dtype=np.uint8)
    reverse = torch.from_numpy(reverse_positions(tokens, cfg.model.tipa_max).astype(np.int64))
    data, T = torch.from_numpy(tokens.astype(np.int64)), cfg.model.block_size
    lm_total = tipa_total = 0.0
    with torch.no_grad():
        for start, first in scoring_windows(len(tokens), T, result["protocol"]["stride"]):
            h = model.hidden(data[start:start + T][None])[0]
            lm = F.cross_entropy(model.lm_head(h), data[start + 1:start + T + 1], reduction="none")
            aux = F.cross_entropy(model.tipa_head(h), reverse[start + 1:start + T + 1], reduction="none")
            lm_total += lm[first:].double().sum().item()
            tipa_total += aux[first:].double().sum().item()
    n = len(tokens) - 1
    next_char_only = lm_total / n / math.log(2)
    with_auxiliary = (lm_total + lam * tipa_total) / n / math.log(2)
    assert result["val_bpc"] == pytest.approx(next_char_only, rel=1e-5)
    assert with_auxiliary - next_char_only > 1.0  # so the check above would fail if the auxiliary loss counted
    assert f"{result['val_bpc']:.4f} ± n/a" in (out / "results.md").read_text()
    assert stats.describe_statistics("tipa") in (out / "results.md").read_text()  # the one reference: tipa


@pytest.mark.integration
def test_experts_rows_come_from_the_scheme_at_equal_compute(topic_dataset, tmp_path, capsys):
    out = tmp_path / "study"
    order = "Science,Sports and Recreation,Military and Warfare"
    main(study_argv(topic_dataset, out, "base,experts:base", 20, "--experts-order", order))
    assert "experts:base: pre-training 10 + 3 fine-tunes x 2 + post-training 2 steps" in capsys.readouterr().out
    run = out / "runs" / "experts-base-s0"
    result = json.loads((run / "result.json").read_text())
    state = json.loads((run / "scheme.json").read_text())
    chosen = state["selected"][0]  # e.g. "fine/02-sports-and-recreation": the best fine-tune on val
    post = state["stages"]["post/" + chosen.split("-", 1)[1]]
    assert result["steps"] == 10 + 3 * 2 + 2 <= 20  # what the scheme spends to produce its model
    assert (result["val_bpc"], result["test_bpc"]) == (post["val_bpc"], post["test_bpc"])
    assert result["checkpoint_step"] == post["steps_total"]
    assert [stage for stage, _ in result["curve"]][0] == "pre" and result["curve"][-1][1] == post["steps_total"] - 2
    fine = [name for name, r in state["stages"].items() if r["kind"] == "fine"]
    lineage = ["pre", *fine[:fine.index(chosen) + 1], "post/" + chosen.split("-", 1)[1]]
    assert result["curve"] == [[name, state["stages"][name]["steps_total"] - state["stages"][name]["iters"]]
                               for name in lineage]  # the chosen expert's path, each stage after the one before
    row, = [line for line in (out / "results.md").read_text().splitlines() if line.startswith("| experts:base |")]
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert cells[2] == "18" and cells[4] == "1"
    assert cells[5:7] == [f"{result['val_bpc']:.4f} ± n/a", f"{result['test_bpc']:.4f} ± n/a"]
