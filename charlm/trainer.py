"""The Trainer: builds a run (model, optimizer, loaders, memory plan) and trains it step by step.

    Trainer(cfg, ctx).run()         # from self.step to cfg.max_iters (or cfg.stop_at)
    Trainer(cfg, ctx).run(until=N)  # the same loop, stopping at step N

charlm.job.train is the whole job around it (the run folder locked, resume or init-from, final weights).

Each logged step is one row of the run's metrics.jsonl (charlm.runlog); checkpoints follow the policy of
charlm.checkpoint.RunCheckpoints. The command line is charlm.train.
"""
import contextlib
import dataclasses
import math
import resource
import signal
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from charlm.checkpoint import CheckpointError, RunCheckpoints, RunStopped
from charlm.config import Config
from charlm.console import format_row, progress
from charlm.data import category_spans, dataset_fingerprint, with_dataset
from charlm.gpu import GPUMonitor, peak_bf16_flops
from charlm.loader import BatchLoader, splitmix64
from charlm.loggers import open_logger
from charlm.memory import cap_process_memory, device_capacity_bytes, plan_memory
from charlm.model import GPT, flops_per_token, with_impls
from charlm.optim import lr_at
from charlm.runlog import append_metrics, plot_curves, truncate_metrics
from charlm.runtime import SINGLE_PROCESS, DistContext, all_reduce_mean, autocast, bits_per_char, resolve_device


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def dropout_seed(seed: int, step: int, rank: int) -> int:
    """The RNG seed of one rank's dropout masks at one step: a pure function, like the batches, so that a
    resumed run (any rank of it) draws exactly the masks it would have drawn without the interruption."""
    return splitmix64(splitmix64(splitmix64(seed) ^ step) ^ rank) >> 1  # manual_seed takes < 2**63


class Trainer:
    """Owns the model, optimizer, loaders and run folder of one training run."""

    def __init__(self, cfg: Config, ctx: DistContext = SINGLE_PROCESS, quiet: bool = False):
        self.ctx = ctx
        self.device = resolve_device(cfg.device, ctx)
        cfg, self.meta = with_dataset(cfg)
        self.cfg = cfg = with_impls(cfg, self.device).replace(extra=dict(cfg.extra))
        self.quiet = quiet or not ctx.is_master
        self.run_dir = cfg.run_dir
        self.checkpoints = RunCheckpoints(self.run_dir, cfg, ctx.is_master)
        cap_process_memory(self.device, cfg.max_memory_gb)
        self.plan = plan_memory(cfg, device_capacity_bytes(self.device, cfg.max_memory_gb), ctx.world_size)
        cfg.extra["memory_plan"] = dataclasses.asdict(self.plan)
        cfg.extra["dataset_sha256"] = dataset_fingerprint(self.meta)
        self._build_model()
        self.autocast = autocast(cfg.dtype, self.device)
        self._build_loaders()
        self.flops_per_token, self.peak_flops = flops_per_token(cfg.model), peak_bf16_flops(self.device)
        self.step = 0
        self.resumed_from: int | None = None
        self.best_val_bpc = float("inf")
        # Counted on the device so that checking for non-finite steps needs no host sync in the step.
        self.bad_streak = torch.zeros((), device=self.device)
        self.longest_bad_streak = torch.zeros((), device=self.device)  # since the last check
        self.skipped_steps = torch.zeros((), device=self.device)
        self.stop_signal: int | None = None

    def _build_model(self) -> None:
        cfg = self.cfg
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank
        self.raw_model = GPT.from_config(cfg, self.device, self.plan.checkpoint_layers).to(self.device)
        self.optimizer = self.raw_model.configure_optimizer(cfg)
        self.model = self.raw_model
        if cfg.compile if cfg.compile is not None else self.device.type == "cuda":
            # Block by block, as torchtitan does: the blocks are identical, so one compilation serves all
            # of them (seconds for DEEP's 32 layers, not minutes for one graph of the whole model).
            for block in self.raw_model.blocks:
                block.compile(mode=cfg.compile_mode)
        if self.ctx.distributed:
            self.model = DDP(self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                             gradient_as_bucket_view=True)  # no second copy of the gradients

    def _build_loaders(self) -> None:
        cfg = self.cfg
        args = dict(block_size=cfg.model.block_size, seed=cfg.seed, rank=self.ctx.rank,
                    world_size=self.ctx.world_size, pin_memory=self.device.type == "cuda")
        spans = category_spans(cfg.dataset_dir, cfg.category, "train") if cfg.category else None
        self.train_loader = BatchLoader(cfg.dataset_dir, "train", cfg.batch_size, tipa=cfg.model.tipa, spans=spans,
                                        tipa_max=cfg.model.tipa_max, tipa_scope=cfg.tipa_scope, **args)
        self.val_loader = BatchLoader(cfg.dataset_dir, "val", cfg.batch_size, **args)

    # --- the step -----------------------------------------------------------------------------------

    def _micro_batches(self, *tensors):
        """This rank's batch in micro-batches of the plan's size, on the device (None stays None)."""
        size = self.plan.micro_batch_size
        for micro in range(self.plan.accum_steps):
            rows = slice(micro * size, (micro + 1) * size)
            yield [None if t is None else t[rows].to(self.device, non_blocking=True) for t in tensors]

    def train_step(self, step: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One optimizer step on the global batch of `step`. Returns this rank's mean losses, without a host sync."""
        for group in self.optimizer.param_groups:  # Muon's groups have a peak of their own
            group["lr"] = lr_at(step, self.cfg, group.get("peak_lr"))
        x, y, t = self.train_loader.batch(step)
        torch.manual_seed(dropout_seed(self.cfg.seed, step, self.ctx.rank))
        accum = self.plan.accum_steps
        lm_total = torch.zeros((), device=self.device)
        tipa_total = torch.zeros((), device=self.device) if self.cfg.model.tipa else None
        self.model.train()
        for micro, (xb, yb, tb) in enumerate(self._micro_batches(x, y, t)):
            last = micro == accum - 1
            no_sync = self.model.no_sync() if self.ctx.distributed and not last else contextlib.nullcontext()
            with no_sync, self.autocast:
                _, lm_loss, tipa_loss = self.model(xb, yb, tb)
                loss = lm_loss if tipa_loss is None else lm_loss + self.cfg.tipa_lambda * tipa_loss
            (loss / accum).backward()
            lm_total += lm_loss.detach() / accum
            if tipa_loss is not None:
                tipa_total += tipa_loss.detach() / accum
        self._step_unless_nonfinite()
        return lm_total, tipa_total

    def _step_unless_nonfinite(self) -> None:
        """Clip and apply the gradients, skipping the update when they are not finite (a NaN/Inf loss).

        The fused AdamW reads `found_inf` on the device and leaves weights, moments and step count untouched
        when it is set, so a bad step costs no host sync; the streak is checked at the next log row. (Muon
        reads it on the host: charlm.optim.MuonAdamW.)
        """
        max_norm = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(), max_norm)
        bad = (~torch.isfinite(norm)).float()
        self.optimizer.found_inf = bad
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.bad_streak = (self.bad_streak + 1) * bad
        self.longest_bad_streak = torch.maximum(self.longest_bad_streak, self.bad_streak)
        self.skipped_steps += bad

    @torch.no_grad()
    def estimate_val_loss(self) -> float:
        """Mean next-token loss (nats) over eval_iters fixed random val batches: the same windows every time,
        whatever the number of ranks or the micro-batch size."""
        self.model.eval()
        total = torch.zeros((), device=self.device)
        for i in range(self.cfg.eval_iters):
            x, y, _ = self.val_loader.batch(i)
            for xb, yb in self._micro_batches(x, y):
                with self.autocast:
                    _, lm_loss, _ = self.model(xb, yb)
                total += lm_loss
        return all_reduce_mean(total / (self.cfg.eval_iters * self.plan.accum_steps), self.ctx)

    # --- checkpoints --------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {"model": self.raw_model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "config": self.cfg.to_dict(), "best_val_bpc": self.best_val_bpc}

    def save(self) -> None:
        self.checkpoints.save(self.step, self.raw_model, self.state_dict())

    def init_from(self, path: Path) -> None:
        """Start from the weights of checkpoint `path` (fine-tuning); optimizer, schedule and step start fresh."""
        self.raw_model.load_state_dict(self.checkpoints.load(path, self.device)["model"])

    def resume(self, path: Path) -> None:
        """Continue from checkpoint `path` (the run folder's newest intact one): weights, optimizer, step."""
        state = self.checkpoints.load(path, self.device)
        self.raw_model.load_state_dict(state["model"])
        try:
            self.optimizer.load_state_dict(state["optimizer"])
        except (KeyError, ValueError) as e:
            raise CheckpointError(f"{path}: its optimizer state does not fit this model ({e})") from e
        self.step, self.best_val_bpc = state["step"], state["best_val_bpc"]
        self.resumed_from = self.step  # marked on the next metrics row (and in curves.png)
        self._check_same_dataset(path, state)
        if not self.quiet:
            print(f"resumed {self.run_dir} at step {self.step} from {path.name}")

    def _check_same_dataset(self, path: Path, state: dict) -> None:
        """A run resumes only on the data it was trained on: a dataset prepared again from other content
        under the same name is refused."""
        saved = state["config"].get("extra", {}).get("dataset_sha256")
        if saved is not None and saved != self.cfg.extra["dataset_sha256"]:
            raise RunStopped(f"{self.cfg.dataset_dir} has changed since {path} was written (dataset fingerprint "
                             f"{saved[:12]} then, {self.cfg.extra['dataset_sha256'][:12]} now): prepare the "
                             f"original data again, or start a new run with another --out-dir")

    def check_ranks_agree_on_step(self) -> None:
        """Every rank must start from the same checkpoint: across nodes, --out-dir must be shared storage."""
        if not self.ctx.distributed:
            return
        steps = torch.tensor([self.step, -self.step], device=self.device)
        dist.all_reduce(steps, op=dist.ReduceOp.MAX)
        if steps[0] != -steps[1]:
            raise ValueError(f"ranks start from different steps ({-steps[1].item()} to {steps[0].item()}): "
                             f"{self.run_dir} must be one folder that every node reads (shared storage)")

    # --- stopping -----------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _stop_on_signals(self):
        """SIGTERM/SIGINT (preemption, Ctrl-C) finish the current step, checkpoint it and stop cleanly."""
        def request_stop(signum, frame):
            self.stop_signal = signum

        if threading.current_thread() is not threading.main_thread():
            yield  # signal handlers can only be installed from the main thread
            return
        previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _signalled_single_process(self) -> bool:
        """A signal stops a single process at the end of the current step; ranks of a distributed run
        act on it together, at the next step they all log, evaluate or checkpoint."""
        return not self.ctx.distributed and self.stop_signal is not None

    def _stop_requested(self) -> bool:
        """Whether any rank has received SIGTERM/SIGINT: the same answer on every rank."""
        flag = torch.tensor(float(self.stop_signal is not None), device=self.device)
        if self.ctx.distributed:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def _check_bad_streak(self) -> None:
        """Stop if max_bad_steps consecutive steps were skipped at any point since the last check."""
        streak = int(self.longest_bad_streak.item())
        self.longest_bad_streak.zero_()
        if streak >= self.cfg.max_bad_steps:
            raise RunStopped(f"{streak} consecutive steps had a non-finite loss (each was skipped); stopping "
                             f"at step {self.step}. The last good checkpoint is {self.checkpoints.latest()}: "
                             f"lower --learning-rate or check the data, then --resume")

    # --- the loop -----------------------------------------------------------------------------------

    def _describe_peak(self, measured_gb: float) -> str:
        """The measured peak of tensors beside the plan's prediction of it (less context and slack)."""
        return (f"peak memory after step {self.step}: {measured_gb:.2f} GB of tensors measured "
                f"(torch.cuda.max_memory_allocated), {self.plan.tensor_bytes / 2**30:.2f} GB predicted; "
                f"the plan's {self.plan.predicted_peak_bytes / 2**30:.1f} GB adds the CUDA context and fragmentation")

    def _start(self) -> None:
        if self.ctx.is_master:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.cfg.save(self.run_dir / "config.json")
            truncate_metrics(self.run_dir, self.step)
        if not self.quiet:
            cfg = self.cfg
            print(self.plan.describe())
            print(f"model: {self.raw_model.num_params() / 1e6:.2f}M parameters; attention {cfg.attn}, "
                  f"rope {cfg.rope_impl if cfg.model.pos_embedding == 'rope' else 'off'}, device {self.device}")

    def _metrics_row(self, lm_loss, tipa_loss, steps: int, seconds: float, monitor: GPUMonitor) -> dict:
        """The row of the step just taken: losses averaged over the ranks, throughput since the last row."""
        train_loss = all_reduce_mean(lm_loss, self.ctx)
        tokens = self.cfg.batch_size * self.cfg.model.block_size * steps
        row = {"step": self.step, "train_loss": train_loss, "train_bpc": bits_per_char(train_loss),
               "lr": lr_at(self.step - 1, self.cfg), "tokens_per_s": tokens / seconds,
               "peak_mem_gb": peak_memory_gb(self.device), **monitor.snapshot()}
        if self.peak_flops:  # tokens of the global batch, so the peak of every rank's GPU
            row["mfu"] = self.flops_per_token * tokens / seconds / (self.peak_flops * self.ctx.world_size)
        if tipa_loss is not None:
            row["tipa_loss"] = all_reduce_mean(tipa_loss, self.ctx)
        if self.resumed_from is not None:
            row["resumed_from"], self.resumed_from = self.resumed_from, None
        if skipped := int(self.skipped_steps.item()):
            row["skipped_steps"] = skipped
        return row

    def _evaluate(self, row: dict) -> None:
        """Add the val estimate to the row; a new best is kept as best.pt."""
        val_loss = self.estimate_val_loss()
        row.update(val_loss=val_loss, val_bpc=bits_per_char(val_loss))
        if row["val_bpc"] < self.best_val_bpc:
            self.best_val_bpc = row["val_bpc"]
            self.checkpoints.save_best(self.step, self.state_dict(), self.best_val_bpc)

    def _report(self, row: dict, bar, logger) -> None:
        """A logged row: metrics.jsonl, the logger, and the terminal (the bar, with eval rows above it) or
        the log file (one plain line)."""
        if self.ctx.is_master:
            append_metrics(self.run_dir, row)
        if logger is not None:
            logger.log(row)
        if self.quiet:
            return
        line = format_row(row, self.cfg.max_iters)
        if bar.disable or "val_bpc" in row:
            self._say(bar, line)
        if bar.disable:
            return
        bar.set_postfix({k: f"{row[k]:.3f}" for k in ("train_bpc", "val_bpc") if k in row}
                        | {"tok/s": f"{row['tokens_per_s']:.0f}"})

    def _say(self, bar, line: str) -> None:
        """A line above the bar, or in the log when there is no bar; rank 0 only, unless quiet."""
        if self.quiet:
            return
        if bar.disable:
            print(line, flush=True)
        else:
            bar.write(line)

    def _summary(self) -> str:
        """What the run wrote where, its headline figures, and the command to run next."""
        lines = [f"finished step {self.step} of {self.cfg.max_iters}; run folder {self.run_dir}"]
        if math.isfinite(self.best_val_bpc):
            best = self.run_dir / "best.pt" if self.cfg.save_best else None
            lines.append(f"best val bpc (estimate) {self.best_val_bpc:.4f}" + (f", kept as {best}" if best else ""))
        latest = self.checkpoints.saved or self.checkpoints.latest()  # saved: the final step always checkpoints
        lines.append(f"latest checkpoint {latest}; curves in {self.run_dir / 'curves.png'}")
        lines.append(f"next: python -m charlm.eval {self.run_dir}   (full val and test passes)")
        return "\n".join(lines)

    def run(self, until: int | None = None) -> dict:
        """Train from self.step to max_iters (or to step `until`), logging, evaluating and checkpointing.

        Returns the last metrics row. Stopping early at `until` saves a checkpoint there; the LR schedule
        still follows max_iters, so a resumed run continues exactly as if it had not stopped.
        """
        cfg = self.cfg
        self._start()
        row: dict = {}
        bar = progress(total=cfg.max_iters, initial=self.step, disable=self.quiet, unit="step")
        stop = min(cfg.max_iters, until if until is not None else (cfg.stop_at or cfg.max_iters))
        with GPUMonitor(self.device) as monitor, self._stop_on_signals(), \
                open_logger(cfg.logger, self.run_dir, cfg, self.step, self.ctx.is_master) as logger:
            t0, steps_since, peak_reported = time.perf_counter(), 0, False
            while self.step < stop:
                lm_loss, tipa_loss = self.train_step(self.step)
                self.step += 1
                steps_since += 1
                bar.update(1)
                is_last = self.step == stop
                eval_now = self.step % cfg.eval_interval == 0 or is_last
                ckpt_now = self.checkpoints.due(self.step, is_last)
                if self.step % cfg.log_interval and not (eval_now or ckpt_now or self._signalled_single_process()):
                    continue
                stopping = self._stop_requested()
                row = self._metrics_row(lm_loss, tipa_loss, steps_since, time.perf_counter() - t0, monitor)
                self._check_bad_streak()
                if eval_now:
                    self._evaluate(row)
                self._report(row, bar, logger)
                if not peak_reported and self.device.type == "cuda":
                    self._say(bar, self._describe_peak(row["peak_mem_gb"]))
                    peak_reported = True
                if ckpt_now or stopping:
                    self.save()
                if stopping:
                    self._say(bar, f"stopped by signal {self.stop_signal} at step {self.step}; checkpoint saved "
                                   f"in {self.run_dir}; continue with --resume")
                    break
                if eval_now and self.ctx.is_master:
                    plot_curves(self.run_dir)
                t0, steps_since = time.perf_counter(), 0
        bar.close()
        if self.step == cfg.max_iters and not self.quiet:
            print(self._summary())
        return row
