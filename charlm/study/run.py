"""Running a study: its settings guarded in study.json, every (condition, seed) trained and evaluated in
order, each run's record in its result.json (which marks it done)."""
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch.distributed as dist

from charlm.checkpoint import best_checkpoint, latest_checkpoint
from charlm.config import Config
from charlm.eval import evaluate
from charlm.experts import Scheme, read_state, run_scheme
from charlm.io import atomic_write_text
from charlm.job import train
from charlm.runtime import DistContext
from charlm.study.plan import Condition, StudyError, expert_scheme

SETTINGS = "study.json"
RESULT = "result.json"
BEST, FINAL = "best val estimate", "final"  # how a plain run's checkpoint was chosen


class ReportedCheckpoint(NamedTuple):
    """The checkpoint a run reports, and how it was chosen (the record's `selection`)."""
    path: Path
    selection: str  # BEST or FINAL


def check_study_settings(out_dir: Path, settings: dict) -> None:
    """Refuse to mix runs of different budgets or configs in one folder: finished runs would not match."""
    path = out_dir / SETTINGS
    if path.is_file():
        saved = json.loads(path.read_text())
        differ = [f"{k}: {_show(saved.get(k))} there, {_show(settings.get(k))} now"
                  for k in sorted(set(saved) | set(settings)) if saved.get(k) != settings.get(k)]
        if differ:
            raise StudyError(f"{out_dir} holds a study with other settings ({'; '.join(differ)}); "
                             f"use another --out-dir")
    atomic_write_text(path, json.dumps(settings, indent=2) + "\n")


def _show(value) -> str:
    return "unset" if value is None else f"{value:g}" if isinstance(value, float) else repr(value)


def run_dir(out_dir: Path, condition: str, seed: int) -> Path:
    return Path(out_dir) / "runs" / f"{condition.replace(':', '-')}-s{seed}"


def run_config(c: Condition, seed: int, out_dir: Path) -> Config:
    """The charlm.train config of one run; resume=True starts it fresh or continues an interrupted one."""
    return c.cfg.replace(seed=seed, max_iters=c.steps, resume=True, out_dir=str(run_dir(out_dir, c.name, seed)))


def reported_checkpoint(run: Path) -> ReportedCheckpoint:
    """Chosen on val only: the trainer's best.pt when it is intact, else the newest (final) checkpoint."""
    best = best_checkpoint(run)
    if best is not None:
        return ReportedCheckpoint(best, BEST)
    final = latest_checkpoint(run)
    if final is None:
        raise StudyError(f"{run}: no intact checkpoint to evaluate; delete the folder to train the run again")
    return ReportedCheckpoint(final, FINAL)


def new_record(c: Condition, seed: int, **result) -> dict:
    """A run's line in the study: its plan and `result` (checkpoint_step, selection, val_bpc, test_bpc, curve)."""
    return {"condition": c.name, "seed": seed, "params": c.params, "flops_per_token": c.flops_per_token,
            "tokens_per_step": c.tokens_per_step, "steps": c.steps, "tokens": c.tokens, "flops": c.flops, **result}


def read_record(out_dir: Path, condition: str, seed: int) -> dict | None:
    path = run_dir(out_dir, condition, seed) / RESULT
    return json.loads(path.read_text()) if path.is_file() else None


def finish_run(run: Path, ctx: DistContext, make_record: Callable[[], dict]) -> dict | None:
    """Rank 0 makes the run's record and writes its result.json; every rank waits until it is on disk.
    Returns the record (None off rank 0)."""
    record = make_record() if ctx.is_master else None
    if record is not None:
        atomic_write_text(run / RESULT, json.dumps(record, indent=2) + "\n")
    if ctx.distributed:
        dist.barrier()
    return record


def train_and_evaluate(c: Condition, seed: int, out_dir: Path, ctx: DistContext, eval_batch_size: int) -> dict | None:
    """Train one run to its step count (or finish it) and evaluate it (data-parallel under torchrun);
    returns its record (None off rank 0)."""
    run = run_dir(out_dir, c.name, seed)
    trainer = train(run_config(c, seed, out_dir), ctx)  # a finished run returns at once
    if trainer.step < c.steps:  # stopped by a signal; its checkpoint is saved
        raise StudyError(f"{run} stopped at step {trainer.step} of {c.steps}; run the same command again to resume")
    checkpoint = reported_checkpoint(run)
    result = evaluate(run, batch_size=eval_batch_size, device=c.cfg.device, checkpoint=checkpoint.path, ctx=ctx)
    if checkpoint.selection == FINAL and result["step"] != c.steps:
        raise StudyError(f"{run}: the newest checkpoint is at step {result['step']}, not {c.steps}")
    return finish_run(run, ctx, lambda: new_record(
        c, seed, checkpoint_step=result["step"], selection=checkpoint.selection, val_bpc=result["val_bpc"],
        test_bpc=result["test_bpc"], protocol=result["protocol"], curve=[[".", 0]]))


def experts_record(c: Condition, seed: int, scheme: Scheme, state: dict) -> dict:
    """The record of a finished scheme: the post-training of the fine-tune with the best val BPC (the scheme
    selects on val); its curve follows its lineage: pre-training, the fine-tunes up to the chosen one,
    post-training."""
    fine = scheme.fine_stages()
    chosen = next(i for i, stage in enumerate(fine) if stage.name == state["selected"][0])
    lineage = [scheme.pre_stage(), *fine[:chosen + 1]]
    if scheme.post_iters > 0:
        lineage.append(scheme.post_stage(fine[chosen]))
    final = state["stages"][lineage[-1].name]
    return new_record(c, seed, checkpoint_step=lineage[-1].steps_total,
                      selection=f"final; expert {fine[chosen].category!r} chosen on val",
                      val_bpc=final["val_bpc"], test_bpc=final["test_bpc"], protocol=final.get("protocol"),
                      curve=[[stage.name, stage.steps_total - stage.iters] for stage in lineage])


def run_experts_condition(c: Condition, seed: int, out_dir: Path, ctx: DistContext) -> dict | None:
    """An experts:VARIANT run: charlm.experts' scheme in the run folder (it skips and resumes its own stages).
    Returns its record (None off rank 0)."""
    run = run_dir(out_dir, c.name, seed)
    scheme = expert_scheme(c.cfg.replace(seed=seed), c.scheme, run)
    run_scheme(scheme, ctx)
    return finish_run(run, ctx, lambda: experts_record(c, seed, scheme, read_state(run)))


def run_all(conditions: list[Condition], seeds: list[int], out_dir: Path, ctx: DistContext,
            eval_batch_size: int) -> list[dict]:
    """Every (condition, seed) in order, skipping done runs; prints progress and a time estimate."""
    todo = [(c, s) for c in conditions for s in seeds]
    records, durations = [], []
    for i, (c, seed) in enumerate(todo, 1):
        label = f"[{i}/{len(todo)}] {c.name} seed {seed}"
        record = read_record(out_dir, c.name, seed)
        if record is not None:
            ctx.print(f"{label}: done before, skipped ({run_dir(out_dir, c.name, seed)})")
        else:
            ctx.print(f"{label}: {c.steps:,} steps -> {run_dir(out_dir, c.name, seed)}")
            start = time.perf_counter()
            if c.scheme is not None:
                record = run_experts_condition(c, seed, out_dir, ctx)
            else:
                record = train_and_evaluate(c, seed, out_dir, ctx, eval_batch_size)
            durations.append(time.perf_counter() - start)
            left = sum(read_record(out_dir, c2.name, s2) is None for c2, s2 in todo[i:])
            ctx.print(f"{label}: {format_duration(durations[-1])}"
                      + (f"; about {format_duration(left * sum(durations) / len(durations))} left "
                         f"for {left} runs (equal budgets take about equal time)" if left else ""))
        records.append(record)
    return records


def format_duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"
