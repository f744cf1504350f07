"""The expert scheme (charlm.experts) end to end on the CPU: a tiny model on a generated topic corpus."""
import contextlib
import json
import shutil

import numpy as np
import pytest
import torch

from charlm import experts
from charlm.checkpoint import latest_checkpoint, load_checkpoint, load_model, save_checkpoint
from charlm.eval import spans_bpc, split_bpc
from charlm.experts import run as experts_run
from charlm.experts import state as experts_state
from charlm.experts.__main__ import main
from charlm.protocol import describe_protocol
from charlm.trainer import Trainer
from corpora import THREE_TOPICS

pytestmark = pytest.mark.integration

TINY = ["--preset", "tiny", "--batch-size", "8", "--eval-iters", "2", "--log-interval", "1", "--device", "cpu",
        "--no-compile"]


def scheme_args(topic_dataset, out_dir, *extra, order=THREE_TOPICS, iters=("--pre-iters", "4")):
    root, name = topic_dataset
    return ["--dataset", name, "--data-root", str(root), "--categories", "keywords", *TINY, *iters,
            "--fine-iters", "2", "--post-iters", "2", "--order", ",".join(order), "--out-dir", str(out_dir), *extra]


@pytest.fixture(scope="module")
def finished(topic_dataset, tmp_path_factory):
    """A scheme run to the end: pre 4 steps, 3 fine-tunes of 2, post 2 from the top 2, control 8."""
    out = tmp_path_factory.mktemp("runs") / "scheme"
    main(scheme_args(topic_dataset, out))
    return out


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def step_of(run_dir):
    return experts.checkpoint_step(latest_checkpoint(run_dir))


def test_the_scheme_runs_every_stage_from_the_previous_one(finished):
    state = json.loads((finished / "scheme.json").read_text())
    fine = ["fine/01-science", "fine/02-sports-and-recreation", "fine/03-military-and-warfare"]
    assert list(state["stages"])[:4] == ["pre", *fine]
    assert step_of(finished / "pre") == 4 and all(step_of(finished / f) == 2 for f in fine)
    assert step_of(finished / "control") == 3 * 2 + 2  # the fine-tunes' and post-training's steps
    init = {}
    for name in fine:
        cfg = json.loads((finished / name / "config.json").read_text())
        init[name] = cfg["init_from"]
        assert cfg["category"] == f"keywords/{state['stages'][name]['category']}" and cfg["max_iters"] == 2
    assert init[fine[0]] == str(finished / "pre" / "ckpt_00000004.pt")
    assert init[fine[1]] == str(finished / fine[0] / "ckpt_00000002.pt")
    control = json.loads((finished / "control" / "config.json").read_text())
    assert control["category"] == "" and control["init_from"] == init[fine[0]]


def test_the_best_fine_tunes_by_global_val_are_post_trained(finished):
    state = json.loads((finished / "scheme.json").read_text())
    fine = {n: r for n, r in state["stages"].items() if r["kind"] == "fine"}
    best = sorted(fine, key=lambda n: fine[n]["val_bpc"])[:2]
    assert state["selected"] == best
    for name in best:
        post = f"post/{name.split('-', 1)[1]}"
        assert step_of(finished / post) == 2
        assert json.loads((finished / post / "config.json").read_text())["init_from"].startswith(str(finished / name))
        assert state["stages"][post]["steps_total"] == state["stages"][name]["steps_total"] + 2
    for name, record in fine.items():  # every fine-tune evaluated on global val, test and its own val subset
        eval_full = json.loads((finished / name / "eval.json").read_text())
        assert record["val_bpc"] == eval_full["val_bpc"] and record["test_bpc"] == eval_full["test_bpc"]
        subset = json.loads((finished / name / f"eval_keywords_{name.split('-', 1)[1]}.json").read_text())
        assert record["subset_val_bpc"] == subset["val_bpc"] and subset["val_chars"] < eval_full["val_chars"]


def test_the_report_keeps_global_and_subset_val_apart(finished):
    report = (finished / "report.md").read_text()
    assert report == experts.write_report(finished)
    table = [line for line in report.splitlines() if line.startswith("|")]
    assert table[0] == "| Experimental condition | Steps | Global val BPC | Subset val BPC | Test BPC |"
    rows = {row.split(" | ")[0].lstrip("| "): row.strip("|").split(" | ") for row in table[2:]}
    assert len(rows) == 1 + 3 + 2 + 1
    control = rows["BASE continued: equal-compute control"]
    assert control[1].strip() == str(4 + 3 * 2 + 2) and control[3].strip() == "—"
    assert rows["BASE (pre-trained)"][3].strip() == "—"
    science = rows["BASE + Expert Fine-Tune : Science (1/3)"]
    recorded = json.loads((finished / "scheme.json").read_text())["stages"]["fine/01-science"]
    assert [float(cell) for cell in science[2:5]] == pytest.approx(
        [recorded[k] for k in ("val_bpc", "subset_val_bpc", "test_bpc")], abs=5e-5)  # each in its own column
    assert recorded["subset_val_bpc"] != pytest.approx(recorded["val_bpc"], abs=5e-5)  # so a swap would show
    assert recorded["protocol"] == json.loads((finished / "fine/01-science/eval.json").read_text())["protocol"]
    assert describe_protocol(recorded["protocol"]) in report  # the evaluation protocol under the table
    val = [float(r[2]) for r in rows.values()]
    assert val == sorted(val)  # the report's form: best first
    assert (finished / "finetune_curves.png").stat().st_size > 0


def test_the_fine_tuning_curves_follow_steps_from_scratch(finished, drawn):
    experts.write_report(finished)
    train_curves = drawn["plot"][0::2]  # per stage: the train panel, then the val panel
    assert len(train_curves) == 1 + 3  # pre-training and the three fine-tunes
    starts = [x[0] for x, *_ in train_curves]
    ends = [x[-1] for x, *_ in train_curves]
    assert ends == [4, 6, 8, 10] and starts[1:] == [5, 7, 9]  # each fine-tune continues the previous stage
    stages = ["pre", "fine/01-science", "fine/02-sports-and-recreation", "fine/03-military-and-warfare"]
    val_curves = drawn["plot"][1::2]
    for stage, (train_x, train_y, _), (val_x, val_y, _) in zip(stages, train_curves, val_curves):
        rows = metrics(finished / stage)
        offset = train_x[0] - rows[0]["step"]
        assert list(train_y) == [r["train_bpc"] for r in rows]  # fine-tunes: BPC on their own subset
        assert list(val_x) == [offset + r["step"] for r in rows if "val_bpc" in r]
        assert list(val_y) == [r["val_bpc"] for r in rows if "val_bpc" in r] and val_y  # the global val estimates


def test_a_finished_scheme_reruns_without_training(finished, topic_dataset, monkeypatch):
    monkeypatch.setattr(experts_run, "train", lambda cfg: pytest.fail(f"retrained {cfg.out_dir}"))
    monkeypatch.setattr(experts_run, "evaluate", lambda *a, **k: pytest.fail("re-evaluated"))
    main(scheme_args(topic_dataset, finished))


def test_an_interrupted_scheme_resumes_where_it_stopped(finished, topic_dataset, tmp_path, monkeypatch, capsys):
    out = tmp_path / "scheme"
    args = scheme_args(topic_dataset, out, "--top-k", "1", order=THREE_TOPICS[:2],
                       iters=("--from", str(finished / "pre")))
    real_train = experts_run.train
    from_eval = (finished / "pre" / "eval.json").stat().st_mtime_ns

    def interrupted(cfg, d):  # the second fine-tune stops after one of its two steps
        if cfg.out_dir.endswith("fine/02-sports-and-recreation"):
            trainer = Trainer(cfg, d)
            trainer.init_from(cfg.init_from)
            trainer.run(until=1)
            raise KeyboardInterrupt
        return real_train(cfg, d)

    monkeypatch.setattr(experts_run, "train", interrupted)
    with pytest.raises(KeyboardInterrupt):
        main(args)
    first = latest_checkpoint(out / "fine/01-science")
    mtime = first.stat().st_mtime_ns
    assert step_of(out / "fine/02-sports-and-recreation") == 1 and not (out / "control").exists()

    monkeypatch.setattr(experts_run, "train", real_train)
    capsys.readouterr()
    main(args)
    log = capsys.readouterr().out
    assert "fine/01-science: done (2 steps), skipped" in log and first.stat().st_mtime_ns == mtime
    assert "resumed" in log and step_of(out / "fine/02-sports-and-recreation") == 2
    assert step_of(out / "control") == 2 * 2 + 2
    state = json.loads((out / "scheme.json").read_text())
    assert state["spec"]["from"] == str(finished / "pre") and state["stages"]["pre"]["dir"] == str(finished / "pre")
    assert "val_bpc" in state["stages"]["pre"]  # evaluated for the scheme, without touching the --from run's files
    assert (finished / "pre" / "eval.json").stat().st_mtime_ns == from_eval


def test_a_retrained_stage_makes_the_later_ones_stale(finished, topic_dataset, tmp_path):
    out = tmp_path / "scheme"
    shutil.copytree(finished, out)  # a copied scheme folder still resumes
    first = out / "fine/01-science"
    state = load_checkpoint(latest_checkpoint(first))
    state["model"] = {k: v + 0.01 for k, v in state["model"].items()}  # as if retrained to other weights
    save_checkpoint(first, state.pop("step"), state)
    with pytest.raises(SystemExit, match="fine/02-sports-and-recreation was trained from other weights"):
        main(scheme_args(topic_dataset, out))


@pytest.mark.parametrize("change, message", [
    (["--order", "Science,Astrology"], "--order must list distinct categories"),
    (["--order", "Science,Science"], "--order must list distinct categories"),
    (["--order", "History", "--top-k", "1"], "leave them out with --order"),
    (["--top-k", "4"], "--top-k must be in 1..3"),
    (["--fine-iters", "0"], "--fine-iters must be >= 1"),
    (["--from", "nowhere"], "give either --pre-iters"),
    (["--categories", "embed"], "python -m charlm.categorize topics --data-root .* --method embed"),
])
def test_bad_arguments_fail_before_training(topic_dataset, tmp_path, monkeypatch, change, message):
    monkeypatch.setattr(experts_run, "train", lambda cfg, d: pytest.fail("trained"))
    with pytest.raises(SystemExit, match=message):
        main(scheme_args(topic_dataset, tmp_path / "scheme") + change)
    assert not (tmp_path / "scheme").exists()


def test_other_settings_or_another_model_are_refused(finished, topic_dataset, tmp_path, monkeypatch):
    monkeypatch.setattr(experts_run, "train", lambda cfg, d: pytest.fail("trained"))
    with pytest.raises(SystemExit, match="fine_iters: 2 then, 3 now"):
        main(scheme_args(topic_dataset, finished) + ["--fine-iters", "3"])
    with pytest.raises(SystemExit, match="n_embd is 64 there and 32 here"):
        main(scheme_args(topic_dataset, tmp_path / "s", "--n-embd", "32", iters=("--from", str(finished / "pre"))))


def test_a_redone_categorisation_is_refused(finished, topic_dataset, monkeypatch):
    """Subsets sorted anew (another model or lexicon) under the same name would mix two schemes."""
    monkeypatch.setattr(experts_run, "train", lambda cfg, d: pytest.fail("trained"))
    monkeypatch.setattr(experts_state, "categorisation_sha256", lambda data_dir, name: "0" * 64)
    with pytest.raises(SystemExit, match=f"categories_sha256: '[0-9a-f]{{64}}' then, '{'0' * 64}' now"):
        main(scheme_args(topic_dataset, finished))


def test_subset_bpc_scores_each_span_as_a_document_of_its_own(finished, topic_dataset):
    model, cfg, _ = load_model(finished / "pre", torch.device("cpu"))
    tokens = np.fromfile(topic_dataset[0] / topic_dataset[1] / "val.bin", dtype=np.uint8)
    args = (cfg.model.block_size, cfg.model.block_size, 16, torch.device("cpu"), contextlib.nullcontext())
    whole = split_bpc(model, tokens, *args)
    assert spans_bpc(model, tokens, np.array([[0, len(tokens), 0]]), *args) == pytest.approx(whole)
    a, b = split_bpc(model, tokens[:500], *args), split_bpc(model, tokens[500:1500], *args)
    bpc, count = spans_bpc(model, tokens, np.array([[0, 500, 0], [500, 1000, 0], [1500, 1, 0]]), *args)
    assert count == 499 + 999 and bpc == pytest.approx((a[0] * 499 + b[0] * 999) / count)  # 1-token span: nothing
