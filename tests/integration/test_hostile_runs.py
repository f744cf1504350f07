"""Hostile input to runs: what is loaded from disk never runs code, nothing outside the run folder is touched,
and no run's history is wiped without the user saying so. 62 cases:

- 4 crafted pickles, through charlm.eval, charlm.sample, --resume and --init-from (none runs its payload);
- 4 damaged manifests (absolute path, ../ path, a non-integer step, not JSON): nothing outside the run folder
  is deleted, the checkpoints are found from their files;
- 3 history guards: a missing manifest with --resume, and without it; metrics without checkpoints;
- 2 --overwrite cases (starts over; excludes --resume);
- 3 resumes that must refuse or say so: every checkpoint corrupt, a folder that does not exist, another dataset;
- 3 non-finite checkpoints (resume, init-from, eval);
- 3 eval cases: --batch-size -1, --stride -1, a write that fails after the figures are printed;
- 4 path flags: --init-from missing, --out-dir a file, config.json not JSON, config.json of the wrong type;
- 27 numeric and choice flags at 0, negative, nan, inf, overflow or an unknown value (one error line each);
- a second trainer on a folder in use, temporaries of killed writes, malformed metrics lines;
- a config.json naming another folder, a torn manifest with a torn newest checkpoint;
- 4 study budgets (nan, inf, negative, zero).
Every refusal is one `error: ...` line naming the file or flag, and a non-zero exit.
"""
import json
import math
import pickle
import shutil
import subprocess
import sys
import time

import pytest
import torch

from charlm.checkpoint import best_checkpoint, latest_checkpoint, load_checkpoint, save_checkpoint
from charlm.data import prepare
from charlm.eval import main as eval_main
from charlm.sample import main as sample_main
from charlm.train import main as train_main
from runs import train_args

pytestmark = pytest.mark.integration


def run_args(tiny_dataset, run, *extra, iters=4):
    return train_args(tiny_dataset, run, *extra, iters=iters, keep_checkpoints=5)


@pytest.fixture(scope="module")
def trained_once(tiny_dataset, tmp_path_factory):
    run = tmp_path_factory.mktemp("trained") / "run"
    train_main(run_args(tiny_dataset, run))
    return run


@pytest.fixture
def trained(trained_once, tmp_path):
    """A finished 4-step run of this test's own (a copy: runs train in the folder named, wherever they moved)."""
    return shutil.copytree(trained_once, tmp_path / "run")


def refuses(main, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    text = str(exit_info.value.code)
    assert text.startswith("error: ") and "\n" not in text.strip() or "out of memory" in text, text
    assert message in text, text
    return text


class Payload:
    """A pickle that, loaded with pickle's full powers, creates a file (a stand-in for a shell command)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def plant_pickle(path, marker):
    with open(path, "wb") as f:
        pickle.dump({"format": 1, "step": 4, "model": Payload(marker)}, f)


@pytest.mark.parametrize("entry", ["eval", "sample", "resume", "init_from"])
def test_a_planted_pickle_never_runs(trained, tiny_dataset, tmp_path, entry):
    marker = tmp_path / "pwned"
    ckpt = latest_checkpoint(trained)
    plant_pickle(ckpt, marker)
    if entry == "eval":
        refuses(eval_main, [str(trained), "--checkpoint", str(ckpt)], "not a readable charlm checkpoint")
    elif entry == "sample":
        (trained / "checkpoints.json").unlink()  # found from the files, each checked by loading it
        for other in trained.glob("ckpt_*.pt"):
            plant_pickle(other, marker)
        refuses(sample_main, [str(trained)], "no checkpoint found")
    elif entry == "resume":
        (trained / "checkpoints.json").unlink()
        for other in trained.glob("ckpt_*.pt"):
            plant_pickle(other, marker)
        refuses(train_main, run_args(tiny_dataset, trained, "--resume", "--extend", iters=6), "no checkpoint in")
    else:
        refuses(train_main, run_args(tiny_dataset, tmp_path / "fine", "--init-from", str(ckpt)),
                "not a readable charlm checkpoint")
    assert not marker.exists()


@pytest.mark.parametrize("bad_file", ["ABSOLUTE", "../../victim", "STEP", "NOT-JSON"])
def test_a_damaged_manifest_touches_nothing_outside_and_is_rebuilt(trained, tiny_dataset, tmp_path, bad_file):
    victim = tmp_path / "victim"
    victim.write_text("the user's file")
    manifest_path = trained / "checkpoints.json"
    if bad_file == "NOT-JSON":
        manifest_path.write_text("{ torn")
    else:
        manifest = json.loads(manifest_path.read_text())
        entry = manifest["checkpoints"][0]
        if bad_file == "STEP":
            entry["step"] = "two"
        else:
            entry["file"] = str(victim) if bad_file == "ABSOLUTE" else bad_file
        manifest_path.write_text(json.dumps(manifest))
    with pytest.warns(UserWarning, match="damaged"):
        train_main(run_args(tiny_dataset, trained, "--resume", "--extend", "--keep-checkpoints", "1", iters=6))
    assert victim.read_text() == "the user's file"
    assert [p.name for p in trained.glob("ckpt_*.pt")] == ["ckpt_00000006.pt"]
    assert json.loads(manifest_path.read_text())["checkpoints"][0]["file"] == "ckpt_00000006.pt"
    steps = [json.loads(line)["step"] for line in (trained / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]  # resumed at 4 from the files, not restarted at 0


def test_a_missing_manifest_still_guards_and_resumes(trained, tiny_dataset):
    (trained / "checkpoints.json").unlink()
    refuses(train_main, run_args(tiny_dataset, trained), "already holds checkpoints")
    train_main(run_args(tiny_dataset, trained, "--resume", "--extend", iters=6))
    assert load_checkpoint(latest_checkpoint(trained))["step"] == 6
    rows = (trained / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in rows][:4] == [1, 2, 3, 4]


def test_metrics_without_checkpoints_are_history_too(tiny_dataset, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    rows = "".join(json.dumps({"step": s, "train_loss": 1.0, "train_bpc": 1.4}) + "\n" for s in (1, 2))
    (run / "metrics.jsonl").write_text(rows)
    refuses(train_main, run_args(tiny_dataset, run), "already holds a training history (metrics.jsonl)")
    assert (run / "metrics.jsonl").read_text() == rows


def test_overwrite_starts_over_and_excludes_resume(trained, tiny_dataset):
    refuses(train_main, run_args(tiny_dataset, trained, "--overwrite", "--resume"), "exclude each other")
    train_main(run_args(tiny_dataset, trained, "--overwrite", iters=2))
    assert sorted(p.name for p in trained.glob("ckpt_*.pt")) == ["ckpt_00000002.pt"]
    assert [json.loads(line)["step"] for line in (trained / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_resume_with_every_checkpoint_corrupt_refuses_and_keeps_the_history(trained, tiny_dataset):
    history = (trained / "metrics.jsonl").read_text()
    for ckpt in trained.glob("ckpt_*.pt"):
        ckpt.write_bytes(b"torn")
    refuses(train_main, run_args(tiny_dataset, trained, "--resume", "--extend", iters=6),
            "refusing to start over its history")
    assert (trained / "metrics.jsonl").read_text() == history


def test_resume_of_a_folder_that_does_not_exist_says_so(tiny_dataset, tmp_path, capsys):
    train_main(run_args(tiny_dataset, tmp_path / "new", "--resume", iters=2))
    assert "holds no run yet; starting it at step 0" in capsys.readouterr().out


def test_resume_on_a_dataset_prepared_again_from_other_content_refuses(tiny_dataset, tmp_path):
    root, _ = tiny_dataset
    data = bytes(range(32, 127)) * 300
    prepare(data, root / "swapped", "bytes", {"name": "swapped"})
    run = tmp_path / "run"
    train_main(run_args((root, "swapped"), run))
    prepare(data[::-1], root / "swapped", "bytes", {"name": "swapped"})
    refuses(train_main, run_args((root, "swapped"), run, "--resume", "--extend", iters=6), "has changed since")


def poison(run):
    path = latest_checkpoint(run)
    state = load_checkpoint(path)
    name = next(iter(state["model"]))
    state["model"][name] = torch.full_like(state["model"][name], math.nan)
    save_checkpoint(run, state.pop("step"), state, keep=5)
    return path


@pytest.mark.parametrize("entry", ["resume", "init_from", "eval"])
def test_non_finite_weights_are_refused_on_load(trained, tiny_dataset, tmp_path, entry):
    path = poison(trained)
    if entry == "resume":
        refuses(train_main, run_args(tiny_dataset, trained, "--resume", "--extend", iters=6), "non-finite weights")
    elif entry == "init_from":
        refuses(train_main, run_args(tiny_dataset, tmp_path / "fine", "--init-from", str(path)), "non-finite weights")
    else:
        refuses(eval_main, [str(trained)], "non-finite weights")
        assert not (trained / "eval.json").exists()


@pytest.mark.parametrize("flag, value, message", [("--batch-size", "-1", "--batch-size must be at least 1"),
                                                  ("--stride", "-1", "--stride 0")])
def test_eval_refuses_bad_flags_before_scoring(trained, flag, value, message):
    refuses(eval_main, [str(trained), flag, value], message)
    assert not (trained / "eval.json").exists()


def test_eval_prints_its_figures_before_a_failed_write(trained, monkeypatch, capsys):
    import charlm.eval

    def full_disk(path, text):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(charlm.eval, "atomic_write_text", full_disk)
    refuses(eval_main, [str(trained)], f"could not write {trained / 'eval.json'}")
    out = capsys.readouterr().out
    assert "val bpc" in out and "test bpc" in out


def test_path_flags_and_config_files_are_named(trained, tiny_dataset, tmp_path):
    refuses(train_main, run_args(tiny_dataset, tmp_path / "a", "--init-from", str(tmp_path / "nope.pt")),
            f"--init-from {tmp_path / 'nope.pt'}: no such checkpoint file")
    (tmp_path / "file").write_text("x")
    refuses(train_main, run_args(tiny_dataset, tmp_path / "file"), "is a file, expected a run folder")
    config = trained / "config.json"
    config.write_text("{ torn")
    refuses(train_main, run_args(tiny_dataset, trained, "--resume"), f"{config}: not a JSON config")
    config.write_text("[1, 2]")
    refuses(train_main, run_args(tiny_dataset, trained, "--resume"), f"{config}: expected a JSON object")


@pytest.mark.parametrize("flag, value, field", [
    ("--n-head", "0", "n_head"), ("--n-embd", "0", "n_embd"), ("--n-embd", "-64", "n_embd"),
    ("--n-layer", "0", "n_layer"), ("--block-size", "-1", "block_size"), ("--tipa-max", "0", "tipa_max"),
    ("--rope-theta", "0", "rope_theta"), ("--rope-theta", "-1", "rope_theta"), ("--rope-theta", "nan", "rope_theta"),
    ("--tipa-lambda", "nan", "tipa_lambda"), ("--tipa-lambda", "-0.5", "tipa_lambda"),
    ("--learning-rate", "inf", "learning_rate"), ("--learning-rate", "nan", "learning_rate"),
    ("--learning-rate", "0", "learning_rate"), ("--micro-batch-size", "-1", "micro_batch_size"),
    ("--eval-iters", "100000000", "eval_iters"), ("--eval-iters", "0", "eval_iters"),
    ("--seed", str(2**64), "seed"), ("--seed", "-1", "seed"), ("--dropout", "nan", "dropout"),
    ("--dropout", "1", "dropout"), ("--max-memory-gb", "-1", "max_memory_gb"),
    ("--max-memory-gb", "nan", "max_memory_gb"), ("--grad-clip", "inf", "grad_clip"),
    ("--checkpoint-layers", "-2", "checkpoint_layers"), ("--keep-checkpoints", "0", "keep_checkpoints"),
    ("--device", "foo", "device must be auto, cpu, cuda or cuda:N, got 'foo'"),
])
def test_bad_numbers_and_choices_are_one_line_naming_the_flag(tiny_dataset, tmp_path, flag, value, field):
    run = tmp_path / "run"
    refuses(train_main, run_args(tiny_dataset, run, flag, value), field)
    assert not run.exists()  # refused before the run folder was made


def test_a_second_trainer_on_a_running_folder_says_who_holds_it(tiny_dataset, tmp_path):
    run = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "charlm.train", *run_args(tiny_dataset, run, iters=100000)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (run / "metrics.jsonl").is_file():  # the first trainer holds the lock and has logged a step
            assert first.poll() is None and time.monotonic() < deadline, first.stderr.read() if first.poll() else "slow"
            time.sleep(0.2)
        rows = (run / "metrics.jsonl").read_text()
        refuses(train_main, run_args(tiny_dataset, run, "--resume", iters=100000), f"is in use by pid {first.pid}")
        assert (run / "metrics.jsonl").read_text().startswith(rows)  # the second one wrote nothing
    finally:
        first.kill()
        first.wait()


def test_temporaries_of_killed_writes_are_removed_by_the_next_run(trained, tiny_dataset):
    stale = [trained / ".ckpt_00000006.pt.k1ll3d.tmp", trained / ".checkpoints.json.x9.tmp"]
    for path in stale:
        path.write_bytes(b"half a write")
    keep = trained / ".notes.tmp"  # not a charlm temporary
    keep.write_text("the user's")
    evaluating = trained / ".eval.json.x1.tmp"  # charlm.eval's, perhaps being written now: not the trainer's
    evaluating.write_text("{")
    train_main(run_args(tiny_dataset, trained, "--resume", "--extend", iters=6))
    assert not any(p.exists() for p in stale) and keep.read_text() == "the user's" and evaluating.exists()


def test_malformed_metrics_lines_neither_stop_a_resume_nor_the_plot(trained, tiny_dataset):
    with open(trained / "metrics.jsonl", "a") as f:
        f.write('{"step": "x"}\n[1, 2]\n{torn\n')
    train_main(run_args(tiny_dataset, trained, "--resume", "--extend", iters=6))
    steps = [json.loads(line)["step"] for line in (trained / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert (trained / "curves.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("budget", ["nan", "inf", "-1", "0"])
def test_a_study_budget_that_is_not_a_positive_number_is_one_line(budget, capsys):
    from charlm.study.__main__ import main as study_main

    with pytest.raises(SystemExit) as exit_info:
        study_main(["--budget", budget, "--plan-only"])
    assert exit_info.value.code == 2
    assert f"--budget a positive finite number ({float(budget)})" in capsys.readouterr().err


def test_resume_trains_in_the_folder_named_not_the_one_its_config_json_names(trained, tiny_dataset, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    config = json.loads((trained / "config.json").read_text())
    (trained / "config.json").write_text(json.dumps({**config, "out_dir": str(elsewhere)}))
    train_main(run_args(tiny_dataset, trained, "--resume", "--extend", iters=6))
    assert not elsewhere.exists() and load_checkpoint(latest_checkpoint(trained))["step"] == 6


def test_a_rebuilt_manifest_keeps_best_and_leaves_out_a_corrupt_checkpoint(trained, tiny_dataset):
    (trained / "checkpoints.json").write_text("{ torn")
    (trained / "ckpt_00000004.pt").write_bytes(b"torn")  # the newest, found from the files, does not load
    with pytest.warns(UserWarning, match="damaged"):
        train_main(run_args(tiny_dataset, trained, "--resume", "--extend", "--eval-interval", "100", iters=6))
    manifest = json.loads((trained / "checkpoints.json").read_text())
    assert [e["step"] for e in manifest["checkpoints"]] == [2, 6]  # resumed from 2; the torn 4 left out
    assert manifest["best"]["file"] == "best.pt" and manifest["best"]["sha256"]
    assert best_checkpoint(trained) == trained / "best.pt"
