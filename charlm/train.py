"""Train a character-level GPT on a prepared dataset.

One GPU, or the CPU when there is none (same code, PyTorch reference ops):
    python -m charlm.train --variant base
    python -m charlm.train --variant deep,rope --n-embd 768 --n-head 12
    python -m charlm.train --variant base --preset tiny --max-iters 50      # CPU smoke run, about a minute
    python -m charlm.train --variant deep --plan-only --max-memory-gb 40    # the memory plan, no GPU needed
    python -m charlm.train --out-dir runs/deep --resume                     # continue where it stopped

Several GPUs on one node, or several nodes (torchrun's usual rendezvous flags):
    torchrun --standalone --nproc_per_node 8 -m charlm.train --variant deep
    torchrun --nnodes 2 --node_rank R --rdzv_backend c10d --rdzv_endpoint HOST:29500 --nproc_per_node 8 \
        -m charlm.train --variant deep
`--batch-size` is the global batch whatever the number of ranks.
"""
import argparse
import contextlib
import dataclasses
import json
import math
import os
import resource
import signal
import sys
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from charlm.checkpoint import latest_checkpoint, load_checkpoint, save_best, save_checkpoint
from charlm.config import Config, add_config_args, config_from_args
from charlm.data import DataError, category_spans, load_meta
from charlm.gpu import GPUMonitor
from charlm.io import atomic_write_text
from charlm.loader import BatchLoader, splitmix64
from charlm.memory import MemoryPlan, MemoryPlanError, cap_process_memory, device_capacity_bytes, format_oom, plan_memory
from charlm.model import GPT, pick_impls
from charlm.plots import plot_curves

LN2 = math.log(2)
# Fields that fix the shape of the model's parameters: a checkpoint only resumes into the same values.
SHAPE_FIELDS = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "bias", "pos_embedding", "tipa", "tipa_max")


@dataclasses.dataclass
class Dist:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def master(self) -> bool:
        return self.rank == 0


def init_distributed(device_pref: str) -> Dist:
    """Data-parallel when launched by torchrun (RANK in the environment): NCCL on GPUs, gloo on CPUs."""
    if "RANK" not in os.environ:
        return Dist()
    d = Dist(int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"]))
    use_cuda = torch.cuda.is_available() and device_pref != "cpu"
    if use_cuda:
        torch.cuda.set_device(d.local_rank)
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return d


def pick_device(cfg: Config, d: Dist) -> torch.device:
    if cfg.device == "auto":
        return torch.device(f"cuda:{d.local_rank}" if torch.cuda.is_available() else "cpu")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {cfg.device}: no CUDA device is available")
    return torch.device(cfg.device)


def autocast(cfg: Config, device: torch.device):
    """bf16 autocast on CUDA by default; plain fp32 elsewhere."""
    wants_bf16 = cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and device.type == "cuda")
    if not wants_bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def lr_at(step: int, cfg: Config) -> float:
    """Linear warm-up to the peak, then cosine decay to min_lr_ratio of it at max_iters."""
    if step < cfg.warmup_iters:
        return cfg.learning_rate * (step + 1) / cfg.warmup_iters
    progress = min(1.0, (step - cfg.warmup_iters) / max(1, cfg.max_iters - cfg.warmup_iters))
    ratio = cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return cfg.learning_rate * ratio


def dataset_dir(cfg: Config) -> Path:
    return Path(cfg.data_root) / cfg.dataset


def attach_dataset(cfg: Config) -> tuple[Config, dict]:
    """The dataset's meta, and the config with its vocab size; errors name the preparing command."""
    meta = load_meta(dataset_dir(cfg))
    if cfg.vocab_size and cfg.vocab_size != meta["vocab_size"]:
        raise DataError(f"vocab_size {cfg.vocab_size} does not match dataset {dataset_dir(cfg)} "
                        f"(vocab {meta['vocab_size']})")
    for split, n in meta["splits"].items():
        if split != "test" and n < cfg.block_size + 1:
            raise DataError(f"block_size {cfg.block_size} is longer than the {split} split of "
                            f"{dataset_dir(cfg)} ({n} tokens)")
    return dataclasses.replace(cfg, vocab_size=meta["vocab_size"]), meta


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def dropout_seed(seed: int, step: int, rank: int) -> int:
    """The RNG seed of one rank's dropout masks at one step: a pure function, like the batches, so that a
    resumed run (any rank of it) draws exactly the masks it would have drawn without the interruption."""
    return splitmix64(splitmix64(splitmix64(seed) ^ step) ^ rank) >> 1  # manual_seed takes < 2**63


def _row_step(line: str) -> float:
    """The step of a metrics line; a line torn by a crash mid-write counts as after every checkpoint."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf


def shape_mismatches(saved: dict, cfg: Config) -> list[str]:
    """How a saved config's model (its SHAPE_FIELDS) differs from cfg's, one phrase per field."""
    return [f"{f} is {saved.get(f)!r} there and {getattr(cfg, f)!r} here" for f in SHAPE_FIELDS
            if saved.get(f) != getattr(cfg, f)]


class RunStopped(RuntimeError):
    """The run cannot go on without losing work; the message says why and which checkpoint to resume from."""


class Trainer:
    """Owns the model, optimizer, loaders and run folder of one training run."""

    def __init__(self, cfg: Config, d: Dist | None = None, quiet: bool = False):
        self.dist = d or Dist()
        self.device = pick_device(cfg, self.dist)
        cfg, self.meta = attach_dataset(cfg)
        attn, rope = pick_impls(cfg, self.device)
        self.cfg = cfg = dataclasses.replace(cfg, attn=attn, rope_impl=rope, extra=dict(cfg.extra))
        self.quiet = quiet or not self.dist.master
        self.run_dir = Path(cfg.out_dir or Path("runs") / cfg.run_name)
        self.plan = self._plan_memory()
        self.micro_batch = self.plan.micro_batch_size
        self.accum_steps = self.plan.accum_steps
        cfg.extra["memory_plan"] = dataclasses.asdict(self.plan)

        torch.manual_seed(cfg.seed)  # the same initial weights on every rank
        self.raw_model = GPT(dataclasses.replace(cfg, checkpoint_layers=self.plan.checkpoint_layers)).to(self.device)
        self.optimizer = self.raw_model.configure_optimizer(cfg)
        self.model = self.raw_model
        if cfg.compile if cfg.compile is not None else self.device.type == "cuda":
            # Block by block, as torchtitan does: the blocks are identical, so one compilation serves all
            # of them (seconds for DEEP's 32 layers, not minutes for one graph of the whole model).
            for block in self.raw_model.blocks:
                block.compile(mode=cfg.compile_mode)
        if self.dist.world_size > 1:
            self.model = DDP(self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                             gradient_as_bucket_view=True)  # no second copy of the gradients
        self.autocast = autocast(cfg, self.device)

        pin = self.device.type == "cuda"
        loader_args = dict(block_size=cfg.block_size, seed=cfg.seed, rank=self.dist.rank,
                           world_size=self.dist.world_size, pin_memory=pin)
        spans = category_spans(dataset_dir(cfg), cfg.category, "train") if cfg.category else None
        self.train_loader = BatchLoader(dataset_dir(cfg), "train", cfg.batch_size, tipa=cfg.tipa, spans=spans,
                                        tipa_max=cfg.tipa_max, tipa_scope=cfg.tipa_scope, **loader_args)
        self.val_loader = BatchLoader(dataset_dir(cfg), "val", cfg.batch_size, **loader_args)
        self.step = 0
        self.best_val_bpc = float("inf")
        # Counted on the device so that checking for non-finite steps needs no host sync in the step.
        self.bad_streak = torch.zeros((), device=self.device)
        self.longest_bad_streak = torch.zeros((), device=self.device)  # since the last check
        self.skipped_steps = torch.zeros((), device=self.device)
        self.stop_signal: int | None = None

    def _plan_memory(self) -> MemoryPlan:
        cap_process_memory(self.device, self.cfg.max_memory_gb)
        capacity = device_capacity_bytes(self.device, self.cfg.max_memory_gb)
        return plan_memory(self.cfg, capacity, self.dist.world_size)

    # --- the step -----------------------------------------------------------------------------------

    def _to_device(self, *tensors):
        return [None if t is None else t.to(self.device, non_blocking=True) for t in tensors]

    def train_step(self, step: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One optimizer step on the global batch of `step`. Returns this rank's mean losses, without a host sync."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(step, self.cfg)
        x, y, t = self.train_loader.batch(step)
        torch.manual_seed(dropout_seed(self.cfg.seed, step, self.dist.rank))
        lm_total = torch.zeros((), device=self.device)
        tipa_total = torch.zeros((), device=self.device) if self.cfg.tipa else None
        self.model.train()
        for micro in range(self.accum_steps):
            rows = slice(micro * self.micro_batch, (micro + 1) * self.micro_batch)
            xb, yb, tb = self._to_device(x[rows], y[rows], None if t is None else t[rows])
            sync = micro == self.accum_steps - 1
            no_sync = self.model.no_sync() if self.dist.world_size > 1 and not sync else contextlib.nullcontext()
            with no_sync, self.autocast:
                _, lm_loss, tipa_loss = self.model(xb, yb, tb)
                loss = lm_loss if tipa_loss is None else lm_loss + self.cfg.tipa_lambda * tipa_loss
            (loss / self.accum_steps).backward()
            lm_total += lm_loss.detach() / self.accum_steps
            if tipa_loss is not None:
                tipa_total += tipa_loss.detach() / self.accum_steps
        self._step_unless_nonfinite()
        return lm_total, tipa_total

    def _step_unless_nonfinite(self) -> None:
        """Clip and apply the gradients, skipping the update when they are not finite (a NaN/Inf loss).

        The fused AdamW reads `found_inf` on the device and leaves weights, moments and step count untouched
        when it is set, so a bad step costs no host sync; the streak is checked at the next log row.
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
            for micro in range(self.accum_steps):
                rows = slice(micro * self.micro_batch, (micro + 1) * self.micro_batch)
                xb, yb = self._to_device(x[rows], y[rows])
                with self.autocast:
                    _, lm_loss, _ = self.model(xb, yb)
                total += lm_loss
        return self._global_mean(total / (self.cfg.eval_iters * self.accum_steps))

    def _global_mean(self, value: torch.Tensor) -> float:
        if self.dist.world_size > 1:
            value = value.clone()
            dist.all_reduce(value)  # SUM: gloo has no AVG
            value /= self.dist.world_size
        return value.item()

    # --- run folder ---------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {"model": self.raw_model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "config": self.cfg.to_dict(), "best_val_bpc": self.best_val_bpc}

    def save(self) -> None:
        """Checkpoint the current step (rank 0). A failed write leaves the previous checkpoint intact."""
        if not self.dist.master:
            return
        if not all(torch.isfinite(p).all() for p in self.raw_model.parameters()):
            raise RunStopped(f"refusing to checkpoint non-finite weights at step {self.step}; "
                               f"the last good checkpoint is {latest_checkpoint(self.run_dir)}")
        try:
            save_checkpoint(self.run_dir, self.step, self.state_dict(), keep=self.cfg.keep_checkpoints)
        except OSError as e:
            raise RunStopped(f"could not write a checkpoint of step {self.step} to {self.run_dir} ({e}); "
                               f"the previous one, {latest_checkpoint(self.run_dir)}, is intact") from e

    def _load_compatible(self, path: Path) -> dict:
        state = load_checkpoint(path, map_location=self.device)
        mismatched = shape_mismatches(state["config"], self.cfg)
        if mismatched:
            raise ValueError(f"{path} does not fit this config: " + ", ".join(mismatched))
        return state

    def init_from(self, path: Path) -> None:
        """Start from another run's weights (fine-tuning); optimizer, schedule and step start fresh."""
        self.raw_model.load_state_dict(self._load_compatible(path)["model"])

    def resume(self) -> bool:
        """Load the run folder's newest intact checkpoint; False if there is none."""
        path = latest_checkpoint(self.run_dir)
        if path is None:
            return False
        state = self._load_compatible(path)
        self.raw_model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.best_val_bpc = state["step"], state["best_val_bpc"]
        if not self.quiet:
            print(f"resumed {self.run_dir} at step {self.step} from {path.name}")
        return True

    def check_ranks_agree_on_step(self) -> None:
        """Every rank must start from the same checkpoint: across nodes, --out-dir must be shared storage."""
        if self.dist.world_size == 1:
            return
        steps = torch.tensor([self.step, -self.step], device=self.device)
        dist.all_reduce(steps, op=dist.ReduceOp.MAX)
        if steps[0] != -steps[1]:
            raise ValueError(f"ranks start from different steps ({-steps[1].item()} to {steps[0].item()}): "
                             f"{self.run_dir} must be one folder that every node reads (shared storage)")

    def _truncate_metrics(self, step: int) -> None:
        """Drop metric rows after `step` (the checkpoint resumed from, or 0 for a fresh start after a crash
        before the first checkpoint): those steps are redone, and the log must not repeat them."""
        path = self.run_dir / "metrics.jsonl"
        if self.dist.master and path.is_file():
            kept = [line for line in path.read_text().splitlines() if _row_step(line) <= step]
            atomic_write_text(path, "".join(line + "\n" for line in kept))

    def _log(self, row: dict) -> None:
        if self.dist.master:
            with open(self.run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")

    # --- the loop -----------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _stop_on_signals(self):
        """SIGTERM/SIGINT (preemption, Ctrl-C) finish the current step, checkpoint it and stop cleanly."""
        def request_stop(signum, frame):
            self.stop_signal = signum

        handled = (signal.SIGTERM, signal.SIGINT)
        if threading.current_thread() is not threading.main_thread():
            yield  # signal handlers can only be installed from the main thread
            return
        previous = {sig: signal.signal(sig, request_stop) for sig in handled}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _describe_peak(self, measured_gb: float) -> str:
        """The measured peak of tensors beside the plan's prediction of it (less context and slack)."""
        tensors = sum(v for k, v in self.plan.breakdown.items() if k not in ("cuda_context", "fragmentation"))
        return (f"peak memory after step {self.step}: {measured_gb:.2f} GB of tensors measured "
                f"(torch.cuda.max_memory_allocated), {tensors / 2**30:.2f} GB predicted; the plan's "
                f"{self.plan.predicted_peak_bytes / 2**30:.1f} GB adds the CUDA context and fragmentation")

    def _signalled_alone(self) -> bool:
        """A signal stops a single process at the end of the current step; ranks of a distributed run
        act on it together, at the next step they all log, evaluate or checkpoint."""
        return self.dist.world_size == 1 and self.stop_signal is not None

    def _stop_requested(self) -> bool:
        """Whether any rank has received SIGTERM/SIGINT: the same answer on every rank."""
        flag = torch.tensor(float(self.stop_signal is not None), device=self.device)
        if self.dist.world_size > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def _check_bad_streak(self) -> None:
        """Stop if max_bad_steps consecutive steps were skipped at any point since the last check."""
        streak = int(self.longest_bad_streak.item())
        self.longest_bad_streak.zero_()
        if streak >= self.cfg.max_bad_steps:
            raise RunStopped(f"{streak} consecutive steps had a non-finite loss (each was skipped); stopping "
                               f"at step {self.step}. The last good checkpoint is {latest_checkpoint(self.run_dir)}: "
                               f"lower --learning-rate or check the data, then --resume")

    def run(self, until: int | None = None) -> dict:
        """Train from self.step to max_iters (or to step `until`), logging, evaluating and checkpointing.

        Returns the last metrics row. Stopping early at `until` saves a checkpoint there; the LR schedule
        still follows max_iters, so a resumed run continues exactly as if it had not stopped.
        """
        from tqdm import tqdm

        cfg = self.cfg
        ckpt_interval = cfg.ckpt_interval or cfg.eval_interval
        if self.dist.master:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            cfg.save(self.run_dir / "config.json")
        self._truncate_metrics(self.step)
        if not self.quiet:
            print(self.plan.describe())
            print(f"model: {self.raw_model.num_params() / 1e6:.2f}M parameters; attention {cfg.attn}, "
                  f"rope {cfg.rope_impl if cfg.pos_embedding == 'rope' else 'off'}, device {self.device}")
        tokens_per_step = cfg.batch_size * cfg.block_size
        row: dict = {}
        bar = tqdm(total=cfg.max_iters, initial=self.step, disable=self.quiet, unit="step", dynamic_ncols=True)
        with GPUMonitor(self.device) as monitor, self._stop_on_signals():
            t0, steps_since, peak_reported = time.perf_counter(), 0, False
            stop = min(cfg.max_iters, until if until is not None else cfg.max_iters)
            while self.step < stop:
                lm_loss, tipa_loss = self.train_step(self.step)
                self.step += 1
                steps_since += 1
                bar.update(1)
                is_last = self.step == stop
                eval_now = self.step % cfg.eval_interval == 0 or is_last
                ckpt_now = self.step % ckpt_interval == 0 or is_last
                if self.step % cfg.log_interval and not (eval_now or ckpt_now or self._signalled_alone()):
                    continue
                stopping = self._stop_requested()
                train_loss = self._global_mean(lm_loss)
                elapsed = time.perf_counter() - t0
                row = {"step": self.step, "train_loss": train_loss, "train_bpc": train_loss / LN2,
                       "lr": lr_at(self.step - 1, cfg), "tokens_per_s": tokens_per_step * steps_since / elapsed,
                       "peak_mem_gb": peak_memory_gb(self.device), **monitor.snapshot()}
                if tipa_loss is not None:
                    row["tipa_loss"] = self._global_mean(tipa_loss)
                if self.skipped_steps.item():
                    row["skipped_steps"] = int(self.skipped_steps.item())
                self._check_bad_streak()
                if eval_now:
                    val_loss = self.estimate_val_loss()
                    row.update(val_loss=val_loss, val_bpc=val_loss / LN2)
                    if row["val_bpc"] < self.best_val_bpc:
                        self.best_val_bpc = row["val_bpc"]
                        if self.dist.master and cfg.save_best:
                            save_best(self.run_dir, self.step, self.state_dict(), self.best_val_bpc)
                self._log(row)
                if not peak_reported and self.device.type == "cuda" and not self.quiet:
                    bar.write(self._describe_peak(row["peak_mem_gb"]))
                    peak_reported = True
                bar.set_postfix({k: f"{row[k]:.3f}" for k in ("train_bpc", "val_bpc") if k in row}
                                | {"tok/s": f"{row['tokens_per_s']:.0f}"})
                if ckpt_now or stopping:
                    self.save()
                if stopping:
                    if not self.quiet:
                        print(f"\nstopped by signal {self.stop_signal} at step {self.step}; checkpoint saved in "
                              f"{self.run_dir}; continue with --resume")
                    break
                if eval_now and self.dist.master:
                    plot_curves(self.run_dir)
                t0, steps_since = time.perf_counter(), 0
        bar.close()
        return row


def parse_config(argv=None) -> Config:
    parser = argparse.ArgumentParser(prog="python -m charlm.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    args = parser.parse_args(argv)
    cfg = config_from_args(args)
    saved = Path(cfg.out_dir or Path("runs") / cfg.run_name) / "config.json"
    if cfg.resume and saved.is_file():
        # A resumed run keeps its saved config; only flags given now override it.
        given = {f.name: getattr(args, f.name) for f in dataclasses.fields(Config)
                 if getattr(args, f.name, None) is not None}
        saved_cfg = Config.load(saved)
        changed = [f"--{f} {given[f]} (the run has {getattr(saved_cfg, f)!r})" for f in ("variant", "preset")
                   if f in given and set(given[f].split(",")) != set(getattr(saved_cfg, f).split(","))]
        if changed:  # their fields were resolved when the run began; a new name alone would mislabel it
            raise ValueError(f"a resumed run keeps its variant and preset: drop {', '.join(changed)}")
        cfg = dataclasses.replace(saved_cfg, **given)
        cfg.validate()
    return cfg


def train(cfg: Config, d: Dist | None = None) -> Trainer:
    trainer = Trainer(cfg, d)
    existing = latest_checkpoint(trainer.run_dir) is not None
    if cfg.resume and existing:
        trainer.resume()
    elif existing:
        raise ValueError(f"{trainer.run_dir} already holds checkpoints: pass --resume to continue it, "
                         f"or choose another --out-dir")
    elif cfg.init_from:
        trainer.init_from(Path(cfg.init_from))
    trainer.check_ranks_agree_on_step()
    try:
        trainer.run()
    except torch.cuda.OutOfMemoryError as e:
        raise SystemExit(format_oom(trainer.plan, e)) from e
    return trainer


def main(argv=None) -> None:
    try:
        cfg = parse_config(argv)
        if cfg.plan_only:
            print(plan_only(cfg).describe())
            return
        d = init_distributed(cfg.device)
        try:
            train(cfg, d)
        finally:
            if d.world_size > 1:
                dist.destroy_process_group()
    except (ValueError, DataError, MemoryPlanError, RunStopped) as e:
        sys.exit(f"error: {e}")


def plan_only(cfg: Config) -> MemoryPlan:
    """The memory plan without building the model or touching a GPU (works on a CPU-only machine)."""
    try:
        cfg, _ = attach_dataset(cfg)
    except DataError:
        cfg = cfg if cfg.vocab_size else dataclasses.replace(cfg, vocab_size=256)
    device = torch.device("cuda" if torch.cuda.is_available() and cfg.device != "cpu" else "cpu")
    attn, rope = pick_impls(cfg, device)
    cfg = dataclasses.replace(cfg, attn=attn, rope_impl=rope)
    return plan_memory(cfg, device_capacity_bytes(device, cfg.max_memory_gb))


if __name__ == "__main__":
    main()
