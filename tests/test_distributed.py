"""Data-parallel training under torchrun: 2 CPU processes with gloo match one process on the same global batch."""
import json
import os
import subprocess
import sys

import pytest
import torch

from charlm.checkpoint import latest_checkpoint, load_checkpoint

pytestmark = pytest.mark.integration


def args(tiny_dataset, run_dir, max_iters):
    root, name = tiny_dataset
    return ["-m", "charlm.train", "--preset", "tiny", "--dataset", name, "--data-root", str(root),
            "--out-dir", str(run_dir), "--device", "cpu", "--batch-size", "8", "--micro-batch-size", "2",
            "--max-iters", str(max_iters), "--eval-interval", "6", "--eval-iters", "2", "--log-interval", "1"]


def run(cmd):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr


def losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["train_loss"], r.get("val_loss")) for r in rows]


def test_two_ranks_match_one_and_resume_in_one(tiny_dataset, tmp_path):
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    run([sys.executable, *args(tiny_dataset, single, 12)])
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    run([*torchrun, *args(tiny_dataset, ddp, 6)])
    # The 2-rank checkpoint continues in one process, on the same LR schedule (max_iters given again).
    run([sys.executable, *args(tiny_dataset, ddp, 12), "--resume"])

    expected, got = losses(single), losses(ddp)
    assert [r[0] for r in got] == [r[0] for r in expected] == list(range(1, 13))
    for (step, a, va), (_, b, vb) in zip(expected, got):
        assert b == pytest.approx(a, rel=1e-5), step
        assert (va is None) == (vb is None) and (va is None or vb == pytest.approx(va, rel=1e-5))
    a, b = load_checkpoint(latest_checkpoint(single))["model"], load_checkpoint(latest_checkpoint(ddp))["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-5)  # Adam magnifies summation-order noise
