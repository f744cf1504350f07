"""The trainer survives faults: SIGKILL at any moment, SIGTERM/SIGINT, non-finite losses, bad input."""
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from charlm.checkpoint import RunStopped, latest_checkpoint, load_checkpoint
from charlm.config import resolve
from charlm.data import prepare
from charlm.eval import main as eval_main
from charlm.job import train
from charlm.train import main as train_main
from charlm.trainer import Trainer

pytestmark = pytest.mark.integration


def train_cmd(tiny_dataset, run_dir, *extra):
    root, name = tiny_dataset
    return [sys.executable, "-m", "charlm.train", "--preset", "tiny", "--dataset", name, "--data-root", str(root),
            "--out-dir", str(run_dir), "--device", "cpu", "--batch-size", "8", "--dropout", "0.1",
            "--max-iters", "24", "--eval-interval", "12", "--eval-iters", "2", "--log-interval", "1",
            "--ckpt-interval", "2", "--keep-checkpoints", "2", *extra]


def trajectory(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["train_loss"], r.get("val_loss")) for r in rows]


def final_weights(run_dir):
    return load_checkpoint(latest_checkpoint(run_dir))["model"]


def run_env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def wait_for_step(run_dir, step, proc, timeout=90):
    deadline = time.time() + timeout
    while True:
        rows = trajectory(run_dir) if (run_dir / "metrics.jsonl").is_file() else []
        if rows and rows[-1][0] >= step:
            return
        assert time.time() < deadline and proc.poll() is None, f"training did not reach step {step}"
        time.sleep(0.01)


def test_sigkill_at_random_moments_loses_nothing(tiny_dataset, tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    subprocess.run(train_cmd(tiny_dataset, straight), check=True, env=run_env(), capture_output=True)
    seed = int(os.environ.get("CHARLM_TEST_SEED", random.randrange(2**32)))
    print(f"kill moments drawn with CHARLM_TEST_SEED={seed}")  # shown by pytest when the test fails
    rng = random.Random(seed)
    resumed_from = []
    for target in sorted(rng.sample(range(1, 20), 3)):
        ckpt = latest_checkpoint(killed)
        resumed_from.append(load_checkpoint(ckpt)["step"] if ckpt else 0)
        if resumed_from[-1] >= target:
            continue
        proc = subprocess.Popen(train_cmd(tiny_dataset, killed, "--resume"), env=run_env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_step(killed, target, proc)
        time.sleep(rng.uniform(0, 0.05))  # land anywhere in a step, a metrics write or a checkpoint write
        proc.kill()
        proc.wait()
    assert load_checkpoint(latest_checkpoint(killed))["step"] < 24  # the kills did interrupt the run
    subprocess.run(train_cmd(tiny_dataset, killed, "--resume"), check=True, env=run_env(), capture_output=True)
    assert trajectory(killed) == trajectory(straight)
    a, b = final_weights(straight), final_weights(killed)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_sigint_checkpoint_and_exit_cleanly(tiny_dataset, tmp_path, sig):
    run = tmp_path / "run"
    proc = subprocess.Popen(train_cmd(tiny_dataset, run, "--max-iters", "100000", "--ckpt-interval", "100000"),
                            env=run_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 60
    while not (run / "metrics.jsonl").is_file() or len(trajectory(run)) < 3:
        assert time.time() < deadline and proc.poll() is None, "training did not start"
        time.sleep(0.2)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert "continue with --resume" in out
    step = load_checkpoint(latest_checkpoint(run))["step"]
    assert step == trajectory(run)[-1][0] >= 3  # the checkpoint is the step it stopped at


def poisoned(trainer: Trainer, bad_steps: set[int]):
    """Make the loss NaN on the given steps, as a fp overflow would."""
    forward = trainer.model.forward

    def forward_with_nan(*args, **kwargs):
        logits, lm_loss, tipa_loss = forward(*args, **kwargs)
        if trainer.step in bad_steps:
            lm_loss = lm_loss * float("nan")
        return logits, lm_loss, tipa_loss

    trainer.model.forward = forward_with_nan


def tiny_trainer(tiny_dataset, run_dir, **overrides):
    root, name = tiny_dataset
    values = dict(dataset=name, data_root=str(root), out_dir=str(run_dir), device="cpu", compile=False, batch_size=8,
                  eval_interval=5, eval_iters=2, log_interval=1)
    cfg = resolve("base", "tiny", **values | overrides)
    return Trainer(cfg, quiet=True)


def test_nonfinite_loss_skips_the_update_and_is_logged(tiny_dataset, tmp_path):
    trainer = tiny_trainer(tiny_dataset, tmp_path / "run", max_iters=8)
    poisoned(trainer, {3, 4})
    trainer.run(until=3)
    before = {k: v.clone() for k, v in trainer.raw_model.state_dict().items()}
    moments = [s["exp_avg"].clone() for s in trainer.optimizer.state.values()]
    trainer.run(until=5)  # steps 3 and 4 are poisoned
    after = trainer.raw_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(torch.equal(m, s["exp_avg"]) for m, s in zip(moments, trainer.optimizer.state.values()))
    trainer.run()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["skipped_steps"] == 2 and rows[-1]["train_loss"] == rows[-1]["train_loss"]  # finite again
    assert not any(torch.equal(before[k], v) for k, v in trainer.raw_model.state_dict().items() if v.dim() >= 2)


def test_a_run_of_bad_steps_stops_and_points_at_the_last_good_checkpoint(tiny_dataset, tmp_path):
    trainer = tiny_trainer(tiny_dataset, tmp_path / "run", max_iters=30, max_bad_steps=3)
    poisoned(trainer, set(range(5, 30)))
    with pytest.raises(RunStopped, match="3 consecutive steps.*ckpt_00000005.pt"):
        trainer.run()
    state = load_checkpoint(latest_checkpoint(tmp_path / "run"))
    assert state["step"] == 5 and all(torch.isfinite(v).all() for v in state["model"].values())


def test_a_run_of_bad_steps_between_log_rows_still_stops(tiny_dataset, tmp_path):
    trainer = tiny_trainer(tiny_dataset, tmp_path / "run", max_iters=20, max_bad_steps=3, log_interval=10,
                           eval_interval=10)
    poisoned(trainer, {2, 3, 4})  # good again from step 5 on, long before the log row of step 10
    with pytest.raises(RunStopped, match="3 consecutive steps"):
        trainer.run()
    assert trainer.step == 10


def test_checkpoints_follow_ckpt_interval_between_log_rows(tiny_dataset, tmp_path):
    trainer = tiny_trainer(tiny_dataset, tmp_path / "run", max_iters=9, log_interval=10, eval_interval=100,
                           ckpt_interval=3, keep_checkpoints=5)
    trainer.run()
    manifest = json.loads((tmp_path / "run" / "checkpoints.json").read_text())
    assert [e["step"] for e in manifest["checkpoints"]] == [3, 6, 9]


def test_nonfinite_weights_are_never_checkpointed(tiny_dataset, tmp_path):
    trainer = tiny_trainer(tiny_dataset, tmp_path / "run", max_iters=4)
    trainer.run(until=2)
    good = latest_checkpoint(tmp_path / "run")
    with torch.no_grad():
        next(trainer.raw_model.parameters()).fill_(float("nan"))
    with pytest.raises(RunStopped, match=f"refusing to checkpoint non-finite weights.*{good.name}"):
        trainer.save()
    assert latest_checkpoint(tmp_path / "run") == good


def test_a_full_disk_keeps_the_previous_checkpoint(tiny_dataset, tmp_path, monkeypatch):
    trainer = tiny_trainer(tiny_dataset, tmp_path / "run", max_iters=4)
    trainer.run(until=2)
    good = latest_checkpoint(tmp_path / "run")

    def disk_full(obj, f):  # the device fills up part-way through the write
        f.write(b"partial checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    trainer.step = 3
    with pytest.raises(RunStopped, match=f"could not write a checkpoint of step 3.*{good.name}, is intact"):
        trainer.save()
    monkeypatch.undo()
    assert latest_checkpoint(tmp_path / "run") == good and load_checkpoint(good)["step"] == 2


def test_cli_rejects_a_foreign_checkpoint_and_another_vocabulary(tiny_dataset, tmp_path, capsys):
    root, name = tiny_dataset
    run = tmp_path / "run"
    args = ["--preset", "tiny", "--data-root", str(root), "--out-dir", str(run), "--device", "cpu",
            "--batch-size", "8", "--max-iters", "2", "--eval-interval", "2", "--eval-iters", "1"]
    train_main(["--dataset", name, *args])
    prepare(b"ab ba aab bba " * 400, root / "two-letters", "unicode", {"name": "two-letters"})
    with pytest.raises(SystemExit, match="vocab_size 256 does not match dataset .*two-letters"):
        train_main(["--dataset", "two-letters", "--resume", *args])
    latest = latest_checkpoint(run)
    latest.write_bytes(b"garbage, not a checkpoint")
    with pytest.raises(SystemExit, match=f"{latest}: not a readable charlm checkpoint"):
        eval_main([str(run), "--checkpoint", str(latest)])


def test_checkpoint_from_another_model_is_rejected(tiny_dataset, tmp_path):
    run = tmp_path / "run"
    root, name = tiny_dataset
    common = dict(dataset=name, data_root=str(root), out_dir=str(run), device="cpu", batch_size=8,
                  max_iters=2, eval_interval=2, eval_iters=1)
    train(resolve("base", "tiny", **common))
    with pytest.raises(ValueError, match="n_embd is 64 there and 32 here"):
        train(resolve("base", "tiny", n_embd=32, resume=True, **common))
