"""Data-parallel training under torchrun: 2 CPU processes with gloo match one process on the same global batch."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from charlm.checkpoint import latest_checkpoint, load_checkpoint

pytestmark = pytest.mark.integration
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


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
    run([*TORCHRUN, *args(tiny_dataset, ddp, 12), "--stop-at", "6"])
    # The 2-rank checkpoint continues in one process, on the same LR schedule.
    run([sys.executable, *args(tiny_dataset, ddp, 12), "--resume"])

    expected, got = losses(single), losses(ddp)
    assert [r[0] for r in got] == [r[0] for r in expected] == list(range(1, 13))
    for (step, a, va), (_, b, vb) in zip(expected, got):
        assert b == pytest.approx(a, rel=1e-5), step
        assert (va is None) == (vb is None) and (va is None or vb == pytest.approx(va, rel=1e-5))
    a, b = load_checkpoint(latest_checkpoint(single))["model"], load_checkpoint(latest_checkpoint(ddp))["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-5)  # Adam magnifies summation-order noise


def test_a_two_rank_run_with_dropout_resumes_exactly(tiny_dataset, tmp_path):
    """Each rank's dropout masks are a function of (seed, step, rank): an interrupted 2-rank run continues
    exactly as the uninterrupted one."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run([*TORCHRUN, *args(tiny_dataset, straight, 8), "--dropout", "0.1"])
    run([*TORCHRUN, *args(tiny_dataset, resumed, 8), "--dropout", "0.1", "--stop-at", "4"])
    run([*TORCHRUN, *args(tiny_dataset, resumed, 8), "--dropout", "0.1", "--resume"])
    # Train losses match step for step (the first invocation also evaluated at its last step, 4).
    assert [r[:2] for r in losses(resumed)] == [r[:2] for r in losses(straight)]
    a, b = (load_checkpoint(latest_checkpoint(r))["model"] for r in (straight, resumed))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_eval_under_torchrun_shares_the_windows_and_matches_one_process(tiny_dataset, tmp_path):
    run_dir = tmp_path / "run"
    run([sys.executable, *args(tiny_dataset, run_dir, 3)])
    run([sys.executable, "-m", "charlm.eval", str(run_dir), "--device", "cpu", "--stride", "40"])
    single = json.loads((run_dir / "eval.json").read_text())
    (run_dir / "eval.json").unlink()
    run([*TORCHRUN, "-m", "charlm.eval", str(run_dir), "--device", "cpu", "--stride", "40"])
    shared = json.loads((run_dir / "eval.json").read_text())
    for split in ("val", "test"):
        assert shared[f"{split}_chars"] == single[f"{split}_chars"]
        assert shared[f"{split}_bpc"] == pytest.approx(single[f"{split}_bpc"], rel=1e-6)


def test_expert_scheme_under_torchrun_matches_one_process(tmp_path):
    from charlm.categorize import categorize
    from charlm.data import prepare
    from corpora import make_topic_corpus

    order = ["Science", "Sports and Recreation"]
    prepare(make_topic_corpus(60, order)[0], tmp_path / "data" / "topics", "bytes")
    categorize(tmp_path / "data" / "topics", "keywords")

    def scheme(out_dir):
        return ["-m", "charlm.experts", "--dataset", "topics", "--data-root", str(tmp_path / "data"),
                "--categories", "keywords", "--preset", "tiny", "--batch-size", "8", "--eval-iters", "2",
                "--device", "cpu", "--dropout", "0", "--pre-iters", "3", "--fine-iters", "2", "--post-iters", "1",
                "--top-k", "1", "--order", ",".join(order), "--out-dir", str(out_dir)]

    run([sys.executable, *scheme(tmp_path / "single")])
    run([*TORCHRUN, *scheme(tmp_path / "ddp")])
    single, ddp = (json.loads((tmp_path / d / "scheme.json").read_text()) for d in ("single", "ddp"))
    assert ddp["selected"] == single["selected"] and list(ddp["stages"]) == list(single["stages"])
    for name, record in single["stages"].items():
        for key in ("val_bpc", "test_bpc", "subset_val_bpc"):
            assert (ddp["stages"][name][key] is None) == (record[key] is None), (name, key)
            if record[key] is not None:
                assert ddp["stages"][name][key] == pytest.approx(record[key], rel=1e-4), (name, key)
    assert (tmp_path / "ddp" / "report.md").is_file()


def _rank_of_two(rank: int, steps: list[int], signalled: list[bool], tiny_dataset, tmp_path) -> None:
    """One rank of a 2-process gloo group: a trainer at steps[rank], signalled or not; writes what the
    ranks' agreements told it."""
    from charlm.config import resolve
    from charlm.runtime import DistContext, destroy_process_group
    from charlm.trainer import Trainer

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=rank, world_size=2)
    root, name = tiny_dataset
    cfg = resolve("base", "tiny", dataset=name, data_root=str(root), out_dir=str(tmp_path / "run"), device="cpu",
                  compile=False, batch_size=8)
    trainer = Trainer(cfg, DistContext(rank, rank, 2), quiet=True)
    trainer.step = steps[rank]
    trainer.stop_signal = 15 if signalled[rank] else None
    try:
        trainer.check_ranks_agree_on_step()
        message = f"agreed; stop {trainer._stop_requested()}"
    except ValueError as e:
        message = str(e)
    (tmp_path / f"rank{rank}.txt").write_text(message)
    del trainer
    destroy_process_group()


@pytest.mark.parametrize("steps, signalled, expected", [
    ([6, 6], [False, False], "agreed; stop False"),
    ([6, 6], [False, True], "agreed; stop True"),  # a signal on one rank stops both, at the same step
    ([6, 0], [False, False], "ranks start from different steps"),  # a node that cannot see the run folder
])
def test_ranks_agree_on_where_to_start_and_when_to_stop(tiny_dataset, tmp_path, steps, signalled, expected):
    torch.multiprocessing.spawn(_rank_of_two, args=(steps, signalled, tiny_dataset, tmp_path), nprocs=2)
    for rank in range(2):
        assert (tmp_path / f"rank{rank}.txt").read_text().startswith(expected)
