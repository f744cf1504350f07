"""Where a run's scalars go besides metrics.jsonl: TensorBoard or Weights & Biases (`--logger`).

Each logger receives exactly the rows written to metrics.jsonl (rank 0 only) and the resolved config as
hyperparameters. TensorBoard needs the `tensorboard` package (`pip install -e ".[tensorboard]"`), W&B the
`wandb` package; `WANDB_MODE=offline` keeps W&B's files in the run folder without a network.
"""
import contextlib
import importlib
import numbers
from pathlib import Path

from charlm.config import Config, flat_fields


def scalars(row: dict) -> dict[str, float]:
    """The numeric entries of a metrics row, but its step."""
    return {k: float(v) for k, v in row.items()
            if k != "step" and isinstance(v, numbers.Real) and not isinstance(v, bool)}


def hyperparameters(cfg: Config) -> dict:
    """The config as flat name -> number/string/bool pairs (model fields by their flat names)."""
    flat = {k: v for k, v in flat_fields(cfg.to_dict(), "config").items() if k != "extra"}
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in flat.items()}


def _require(module: str, flag: str, install: str):
    """An optional package's module, or a one-line error saying how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ValueError(f"--logger {flag} needs the {flag} package: {install}") from e


class TensorBoardLogger:
    def __init__(self, run_dir: Path, cfg: Config, start_step: int):
        tensorboard = _require("torch.utils.tensorboard", "tensorboard", "pip install -e \".[tensorboard]\"")
        from torch.utils.tensorboard.summary import hparams
        SummaryWriter = tensorboard.SummaryWriter
        # purge_step: a resumed run drops the events after the checkpoint it resumes from, as metrics.jsonl does
        self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"), purge_step=start_step or None)
        for summary in hparams(hyperparameters(cfg), {}):
            self.writer.file_writer.add_summary(summary)

    def log(self, row: dict) -> None:
        for key, value in scalars(row).items():
            self.writer.add_scalar(key, value, row["step"])
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbLogger:
    def __init__(self, run_dir: Path, cfg: Config, start_step: int):
        wandb = _require("wandb", "wandb", "pip install wandb (WANDB_MODE=offline works without a network)")
        self.run = wandb.init(project="charlm", name=Path(run_dir).name, dir=str(run_dir),
                              config=hyperparameters(cfg), resume="allow")

    def log(self, row: dict) -> None:
        self.run.log(scalars(row), step=row["step"])

    def close(self) -> None:
        self.run.finish()


LOGGERS = {"tensorboard": TensorBoardLogger, "wandb": WandbLogger}


@contextlib.contextmanager
def open_logger(kind: str, run_dir: Path, cfg: Config, start_step: int, enabled: bool = True):
    """The logger of --logger (None for `none`, or on ranks other than 0), closed when the block ends."""
    logger = LOGGERS[kind](run_dir, cfg, start_step) if enabled and kind in LOGGERS else None
    try:
        yield logger
    finally:
        if logger is not None:
            logger.close()
