"""The scheme's stages and their folders, and the checks made before any training."""
import dataclasses
from dataclasses import dataclass
from pathlib import Path

from charlm.categorize import category_slug
from charlm.checkpoint import checkpoint_entry, latest_checkpoint
from charlm.config import Config
from charlm.data import category_spans
from charlm.errors import CharlmError


class SchemeError(CharlmError, ValueError):
    """The scheme's arguments or folder do not allow it to run."""


@dataclass(frozen=True)
class Stage:
    name: str  # folder under the scheme's, e.g. "fine/02-science"
    kind: str  # pre | fine | post | control
    iters: int  # optimizer steps of this stage
    steps_total: int  # optimizer steps from scratch to this stage's final checkpoint
    category: str = ""  # fine: the subset it trains on; post: the fine-tune it starts from


@dataclass(frozen=True)
class Scheme:
    base: Config  # shared by every stage; each sets out_dir, max_iters, category and init_from
    out_dir: Path
    categories: str  # a categorisation of the dataset: a folder under <dataset>/categories/ (charlm.categorize)
    order: list[str]  # the categories to fine-tune on, in order
    pre_iters: int  # with pre_from: the step of that run's checkpoint
    fine_iters: int
    post_iters: int
    top_k: int  # fine-tunes to post-train
    pre_from: Path | None = None  # an existing run to start from instead of pre-training

    def pre_stage(self) -> Stage:
        return Stage("pre", "pre", self.pre_iters, self.pre_iters)

    def fine_stages(self) -> list[Stage]:
        return [Stage(f"fine/{i:02d}-{category_slug(name)}", "fine", self.fine_iters,
                      self.pre_iters + i * self.fine_iters, name) for i, name in enumerate(self.order, start=1)]

    def post_stage(self, fine: Stage) -> Stage:
        return Stage(f"post/{category_slug(fine.category)}", "post", self.post_iters,
                     fine.steps_total + self.post_iters, fine.category)

    def control_stage(self) -> Stage:
        iters = len(self.order) * self.fine_iters + self.post_iters
        return Stage("control", "control", iters, self.pre_iters + iters)

    def stage_dir(self, stage: Stage) -> Path:
        return self.pre_from if stage.kind == "pre" and self.pre_from else self.out_dir / stage.name

    def stage_config(self, stage: Stage, init: Path | None) -> Config:
        return dataclasses.replace(
            self.base, out_dir=str(self.stage_dir(stage)), max_iters=stage.iters, resume=True,
            category=f"{self.categories}/{stage.category}" if stage.kind == "fine" else "",
            init_from=str(init or ""), extra={**self.base.extra, "expert_stage": stage.name})


def checkpoint_step(path: Path) -> int:
    return checkpoint_entry(path)["step"]


def final_checkpoint(run_dir: Path, iters: int) -> Path | None:
    """The run's newest checkpoint if it is the one at step `iters`, else None (not started or not finished)."""
    path = latest_checkpoint(run_dir)
    return path if path is not None and checkpoint_step(path) == iters else None


def pretrained_checkpoint(run_dir: Path, base: Config) -> Path:
    """The newest checkpoint of an existing run (--from), checked to fit the scheme's model."""
    path = latest_checkpoint(run_dir)
    saved = Path(run_dir) / "config.json"
    if path is None or not saved.is_file():
        raise SchemeError(f"--from {run_dir}: not a charlm.train run folder with a checkpoint")
    mismatched = base.model.mismatches(Config.load(saved).model)
    if mismatched:
        raise SchemeError(f"--from {run_dir}: its model does not fit this config ({'; '.join(mismatched)}); "
                          f"pass the --variant, --preset and model flags it was trained with")
    return path


def parse_order(order: str | None, names: list[str]) -> list[str]:
    """Comma-separated category names (default: all, in the categorisation's order), checked."""
    chosen = [n.strip() for n in order.split(",")] if order else list(names)
    unknown = [n for n in chosen if n not in names]
    if unknown or not chosen or len(set(chosen)) != len(chosen):
        raise SchemeError(f"--order must list distinct categories among: {', '.join(names)}; got {chosen}")
    return chosen


def check_subsets(scheme: Scheme) -> None:
    """Every category to fine-tune on holds a training window and some val text, or the scheme would stop midway."""
    data_dir, block = scheme.base.dataset_dir, scheme.base.model.block_size
    empty = []
    for name in scheme.order:
        train = category_spans(data_dir, f"{scheme.categories}/{name}", "train")
        val = category_spans(data_dir, f"{scheme.categories}/{name}", "val")
        if not (train[:, 1] > block).any() or not (val[:, 1] >= 2).any():
            empty.append(name)
    if empty:
        raise SchemeError(f"categories without a train chunk of more than block_size ({block}) tokens or without "
                          f"val text: {', '.join(empty)}; leave them out with --order")
