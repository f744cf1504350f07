"""A training job from start to finish: the run folder checked and locked, its history guarded, the run
resumed (or started from --init-from's weights, or from scratch), trained to the end, and its final
weights written in the shared form (model.safetensors). charlm.train, charlm.experts and charlm.study run
their training through `train`.
"""
import contextlib
from pathlib import Path

import torch
import torch.distributed as dist

from charlm.checkpoint import CheckpointError, RunCheckpoints, RunStopped
from charlm.config import Config
from charlm.memory import format_oom
from charlm.optim import lr_at
from charlm.runtime import SINGLE_PROCESS, DistContext
from charlm.trainer import Trainer
from charlm.weights import write_safetensors


def check_paths(cfg: Config) -> None:
    """The run folder and --init-from checked before any expensive work."""
    if cfg.run_dir.exists() and not cfg.run_dir.is_dir():
        raise ValueError(f"--out-dir {cfg.run_dir}: is a file, expected a run folder")
    if cfg.init_from and not Path(cfg.init_from).is_file():
        raise CheckpointError(f"--init-from {cfg.init_from}: no such checkpoint file")


def train(cfg: Config, ctx: DistContext = SINGLE_PROCESS) -> Trainer:
    """Train a run to the end: resumed with cfg.resume, from cfg.init_from's weights, or from scratch."""
    check_paths(cfg)
    checkpoints = RunCheckpoints(cfg.run_dir, cfg, ctx.is_master)
    with checkpoints.locked() if ctx.is_master else contextlib.nullcontext():
        start = checkpoints.starting_point()
        trainer = Trainer(cfg, ctx)
        if start is not None:
            trainer.resume(start)
        elif cfg.init_from:
            trainer.init_from(Path(cfg.init_from))
        trainer.check_ranks_agree_on_step()
        if start is not None and trainer.step >= cfg.max_iters:
            ctx.print(f"{cfg.run_dir} is finished (step {trainer.step} of --max-iters {cfg.max_iters}): nothing to "
                      f"train. Evaluate it with python -m charlm.eval {cfg.run_dir}, or train it further with "
                      f"--resume --max-iters N --extend")
            return trainer
        if cfg.extend:
            ctx.print(f"extending {cfg.run_dir} to step {cfg.max_iters}: the LR stays at "
                      f"{lr_at(cfg.max_iters, cfg):.2e} after step {cfg.lr_decay_iters}")
        try:
            trainer.run()
        except torch.cuda.OutOfMemoryError as e:
            raise RunStopped(format_oom(trainer.plan, e)) from e
        if ctx.is_master and trainer.step == cfg.max_iters:  # the final weights, not a signal's stop
            write_safetensors(trainer.run_dir, trainer.raw_model, trainer.cfg)
        if ctx.distributed:
            dist.barrier()  # rank 0's checkpoints and weights are on disk before any rank reads them
    return trainer
