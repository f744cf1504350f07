"""Checkpoints: the files (saved atomically, found, loaded without running code) and the policy of a run
(when to save, best.pt, refusing non-finite weights, shape compatibility, resume and init-from).

A run folder holds `ckpt_<step>.pt` files and `checkpoints.json`, a manifest with each file's size and
sha256. A file is written under a temporary name, fsynced and renamed before the manifest names it, so
a crash leaves either the old or the new checkpoint, never a torn one; a latest checkpoint that fails its
size or hash check is skipped with a warning and the previous one used. Checkpoints are read with
`torch.load(weights_only=True)`: tensors, numbers, strings and containers only, so a planted pickle
cannot run code.
"""
import contextlib
import hashlib
import json
import re
import warnings
from pathlib import Path

import torch

from charlm.config import Config, ModelConfig
from charlm.errors import CharlmError
from charlm.io import atomic_write, atomic_write_text, exclusive_lock, remove_stale_temporaries
from charlm.model import GPT
from charlm.runlog import METRICS, read_metrics

MANIFEST = "checkpoints.json"
FORMAT = 1  # bump when the checkpoint layout changes incompatibly
CKPT_NAME = re.compile(r"ckpt_(\d{8,})\.pt")
BEST = "best.pt"
SHA256 = re.compile(r"[0-9a-f]{64}")
LOCK = ".lock"  # held by the process training in the folder (charlm.io.exclusive_lock)
# The trainer's own files, whose temporaries (.NAME.<random>.tmp, charlm.io.atomic_write's) a killed write can
# leave; others (an eval.json that charlm.eval is writing now, say) are not the trainer's to remove.
TRAINER_TEMPORARY = re.compile(r"\.(ckpt_\d+\.pt|best\.pt|checkpoints\.json|metrics\.jsonl|config\.json|curves\.png"
                               r"|model\.safetensors|model_config\.json)\.[^.]+\.tmp")


class CheckpointError(CharlmError, ValueError):
    """A checkpoint or manifest that cannot be used (unreadable, or from an incompatible version): bad
    input, reported by the command-line tools like any other."""


class RunStopped(CharlmError):
    """The run cannot go on without losing work; the message says why and which checkpoint to resume from."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _valid_entry(entry, best: bool = False) -> bool:
    """A manifest entry that names a checkpoint file of this folder (a plain name: never a path), by the
    step in its name, with its size and hash."""
    if not isinstance(entry, dict) or not isinstance(entry.get("file"), str) or not _is_count(entry.get("step")):
        return False
    name = CKPT_NAME.fullmatch(entry["file"])
    right_name = entry["file"] == BEST if best else (name is not None and int(name[1]) == entry["step"])
    return (right_name and _is_count(entry.get("bytes")) and isinstance(entry.get("sha256"), str)
            and SHA256.fullmatch(entry["sha256"]) is not None)


def _read_manifest_file(run_dir: Path) -> dict | None:
    """checkpoints.json if it is whole and every entry is valid; None (with a warning) if it is damaged."""
    path = Path(run_dir) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
        entries, best = manifest["checkpoints"], manifest.get("best")
        if not isinstance(entries, list) or not all(_valid_entry(e) for e in entries) or \
                (best is not None and not _valid_entry(best, best=True)):
            raise ValueError("an entry is not {file: ckpt_<step>.pt, step, bytes, sha256}")
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as e:
        warnings.warn(f"{path} is damaged ({e}); finding the checkpoints from their files instead", stacklevel=2)
        return None
    return {"checkpoints": sorted(entries, key=lambda e: e["step"]), "best": best}


def _discovered_entries(run_dir: Path) -> list[dict]:
    """Entries for the ckpt_<step>.pt files of a folder whose manifest is missing or damaged: their size
    and hash are unknown, so each is checked by loading it."""
    found = [(int(m[1]), p.name) for p in Path(run_dir).glob("ckpt_*.pt") if (m := CKPT_NAME.fullmatch(p.name))]
    return [{"file": name, "step": step, "bytes": None, "sha256": None} for step, name in sorted(found)]


def _read_manifest(run_dir: Path) -> list[dict]:
    manifest = _read_manifest_file(run_dir)
    return manifest["checkpoints"] if manifest is not None else _discovered_entries(run_dir)


def _hashed(path: Path, step: int) -> dict:
    return {"file": path.name, "step": step, "bytes": path.stat().st_size, "sha256": _sha256(path)}


def checkpoint_entry(path: Path) -> dict:
    """A checkpoint's manifest entry: file, step, bytes and sha256 (from the file itself when the manifest
    does not list it)."""
    path = Path(path)
    for entry in _read_manifest(path.parent):
        if entry["file"] == path.name and entry["sha256"] is not None:
            return entry
    name = CKPT_NAME.fullmatch(path.name)
    if name is None or not path.is_file():
        raise CheckpointError(f"{path}: not a checkpoint of {path.parent} (ckpt_<step>.pt)")
    return _hashed(path, int(name[1]))


def _recorded(run_dir: Path) -> tuple[list[dict], dict | None]:
    """The manifest's checkpoints and best entry, to write back with a change: from checkpoints.json, or,
    when it is missing or damaged, from the files that load (a corrupt one is left out, so that a later
    --resume falls back past it; a recovered best.pt's val BPC is unknown)."""
    manifest = _read_manifest_file(run_dir)
    if manifest is not None:
        return manifest["checkpoints"], manifest["best"]
    entries = [_hashed(run_dir / e["file"], e["step"]) for e in _discovered_entries(run_dir) if _is_intact(run_dir, e)]
    best = None
    with contextlib.suppress(CheckpointError):
        best = {**_hashed(run_dir / BEST, load_checkpoint(run_dir / BEST)["step"]), "val_bpc": None}
    return entries, best


def _write_manifest(run_dir: Path, entries: list[dict], best: dict | None) -> None:
    manifest = {"checkpoints": entries, "best": best}
    atomic_write_text(Path(run_dir) / MANIFEST, json.dumps(manifest, indent=1) + "\n")


def _write(path: Path, step: int, state: dict) -> dict:
    atomic_write(path, lambda f: torch.save({"format": FORMAT, "step": step, **state}, f))
    return _hashed(path, step)


def save_checkpoint(run_dir: Path, step: int, state: dict, keep: int = 3) -> Path:
    """Write ckpt_<step>.pt atomically, record it in the manifest, and delete all but the newest `keep`
    (only files the manifest names, which are plain names inside run_dir)."""
    run_dir = Path(run_dir)
    path = run_dir / f"ckpt_{step:08d}.pt"
    entries, best = _recorded(run_dir)
    entries = sorted([e for e in entries if e["step"] != step] + [_write(path, step, state)], key=lambda e: e["step"])
    stale, entries = entries[:-keep], entries[-keep:]
    _write_manifest(run_dir, entries, best)
    for e in stale:
        (run_dir / e["file"]).unlink(missing_ok=True)
    return path


def save_best(run_dir: Path, step: int, state: dict, val_bpc: float) -> Path:
    """Write best.pt: the weights with the lowest val estimate so far (checkpoints are selected on val)."""
    run_dir = Path(run_dir)
    entries, _ = _recorded(run_dir)
    _write_manifest(run_dir, entries, {**_write(run_dir / BEST, step, state), "val_bpc": val_bpc})
    return run_dir / BEST


def best_checkpoint(run_dir: Path) -> Path | None:
    """best.pt if it is intact (by the manifest's size and hash, or, without a manifest, if it loads)."""
    manifest = _read_manifest_file(run_dir)
    entry = manifest["best"] if manifest is not None else {"file": BEST, "sha256": None}
    return Path(run_dir) / BEST if entry and _is_intact(run_dir, entry) else None


def _is_intact(run_dir: Path, entry: dict) -> bool:
    path = Path(run_dir) / entry["file"]
    if not path.is_file():
        return False
    if entry["sha256"] is None:  # found without a manifest: intact if it loads
        try:
            load_checkpoint(path)
            return True
        except CheckpointError:
            return False
    return path.stat().st_size == entry["bytes"] and _sha256(path) == entry["sha256"]


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint that passes its size and hash check, or None if the run has none."""
    for entry in reversed(_read_manifest(run_dir)):
        if _is_intact(run_dir, entry):
            return Path(run_dir) / entry["file"]
        warnings.warn(f"checkpoint {Path(run_dir) / entry['file']} is missing or corrupt; trying an older one",
                      stacklevel=2)
    return None


def checkpoint_files(run_dir: Path) -> list[Path]:
    """Every checkpoint file in a run folder, intact or not: the training history a new run must not overwrite."""
    best = Path(run_dir) / BEST
    return sorted(Path(run_dir).glob("ckpt_*.pt")) + ([best] if best.is_file() else [])


def load_checkpoint(path: Path, map_location="cpu") -> dict:
    """A checkpoint's contents, read without running code (weights_only); a bad file is a CheckpointError."""
    if not Path(path).is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch's weights-only unpickler raises many kinds on a torn or foreign file
        if isinstance(e, (torch.OutOfMemoryError, OSError)) or "CUDA" in str(e):  # the device's or disk's problem
            raise
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CheckpointError(f"{path}: not a readable charlm checkpoint ({type(e).__name__}: {first_line})") from e
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{path}: checkpoint format {found} is not supported "
                              f"(this charlm reads format {FORMAT})")
    if not isinstance(state.get("model"), dict) or not _is_count(state.get("step")):
        raise CheckpointError(f"{path}: not a charlm checkpoint (expected model weights and a step)")
    return state


def finite(tensors) -> bool:
    """Whether every element of every tensor is finite, at the cost of one host sync."""
    flags = [torch.isfinite(t).all() for t in tensors]
    return not flags or bool(torch.stack(flags).all())


def check_finite(state: dict, path: Path) -> dict:
    """A loaded checkpoint whose weights are all finite tensors; else a CheckpointError naming the file."""
    weights = list(state["model"].values())
    if not (all(map(torch.is_tensor, weights)) and finite(weights)):
        raise CheckpointError(f"{path}: holds non-finite weights (NaN or Inf); use an earlier checkpoint")
    return state


def check_weights_fit(weights: dict, model: torch.nn.Module, what: str) -> None:
    """Weights that are exactly the tensors `model` needs, else a CheckpointError starting with `what` and
    naming each tensor that is missing, extra or of another shape."""
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    found = {name: tuple(t.shape) for name, t in weights.items()}
    problems = [f"{n} is missing" for n in expected if n not in found]
    problems += [f"{n} is not in this model" for n in found if n not in expected]
    problems += [f"{n} has shape {found[n]}, the config needs {expected[n]}"
                 for n in expected if n in found and found[n] != expected[n]]
    if problems:
        shown = "; ".join(problems[:4]) + (f"; and {len(problems) - 4} more" if len(problems) > 4 else "")
        raise CheckpointError(f"{what}: {shown}")


def checkpoint_model_config(state: dict, path: Path) -> ModelConfig:
    """The model shape a loaded checkpoint was saved with."""
    try:
        return Config.from_dict(state["config"], source=str(path)).model
    except KeyError as e:
        raise CheckpointError(f"{path}: checkpoint has no config") from e


def load_compatible(path: Path, model: ModelConfig, map_location="cpu") -> dict:
    """A checkpoint whose model has `model`'s shape (else a CheckpointError naming each difference) and
    whose weights are all finite."""
    state = check_finite(load_checkpoint(path, map_location), path)
    mismatched = model.mismatches(checkpoint_model_config(state, path))
    if mismatched:
        raise CheckpointError(f"{path} does not fit this config: " + ", ".join(mismatched))
    return state


class RunCheckpoints:
    """A training run's checkpoint policy: what is saved when, what is refused, and where a run restarts."""

    def __init__(self, run_dir: Path, cfg: Config, is_master: bool):
        self.run_dir, self.cfg, self.is_master = Path(run_dir), cfg, is_master
        self.interval = cfg.ckpt_interval or cfg.eval_interval
        self.saved: Path | None = None  # the checkpoint this process wrote last (rank 0)

    def due(self, step: int, is_last: bool) -> bool:
        return step % self.interval == 0 or is_last

    def latest(self) -> Path | None:
        return latest_checkpoint(self.run_dir)

    def save(self, step: int, model: torch.nn.Module, state: dict) -> None:
        """Checkpoint `step` (rank 0). Non-finite weights are refused; a failed write (a full disk) stops the
        run and leaves the previous checkpoint intact."""
        if not self.is_master:
            return
        if not finite(model.parameters()):
            raise RunStopped(f"refusing to checkpoint non-finite weights at step {step}; "
                             f"the last good checkpoint is {self.latest()}")
        try:
            self.saved = save_checkpoint(self.run_dir, step, state, keep=self.cfg.keep_checkpoints)
        except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
            raise RunStopped(f"could not write a checkpoint of step {step} to {self.run_dir} "
                             f"({str(e).splitlines()[0]}); the previous one, {self.latest()}, is intact") from e

    def save_best(self, step: int, state: dict, val_bpc: float) -> None:
        if self.is_master and self.cfg.save_best:
            save_best(self.run_dir, step, state, val_bpc)

    def starting_point(self) -> Path | None:
        """The checkpoint this run resumes from, or None to start at step 0. A folder that holds training
        history (checkpoints, metrics) is never started over unless cfg.overwrite says so, and --resume
        never starts over a run whose checkpoints all fail their checks."""
        files = checkpoint_files(self.run_dir)
        if self.cfg.resume:
            latest = self.latest()
            if latest is None and files:
                raise RunStopped(f"--resume: no checkpoint in {self.run_dir} is intact "
                                 f"({', '.join(p.name for p in files)}); refusing to start over its history: "
                                 f"restore a checkpoint, or pass --overwrite instead of --resume to start over")
            return latest
        history = [p.name for p in files] + ([METRICS] if read_metrics(self.run_dir) else [])
        if history and not self.cfg.overwrite:
            what = "checkpoints" if files else "a training history"
            raise CheckpointError(f"{self.run_dir} already holds {what} ({', '.join(history[:4])}): pass --resume "
                                  f"to continue it, --overwrite to start it over, or choose another --out-dir")
        if history and self.is_master:
            self._clear(files)
        return None

    @contextlib.contextmanager
    def locked(self):
        """The run folder, locked while this process trains in it (rank 0): a second trainer started on it
        fails at once, naming the process that holds it. Temporaries that killed writes left are removed."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        lock = exclusive_lock(self.run_dir / LOCK, f"run folder {self.run_dir}", blocking=False)
        with lock:
            names = {m[1] for p in self.run_dir.glob(".*.tmp") if (m := TRAINER_TEMPORARY.fullmatch(p.name))}
            for name in sorted(names):
                remove_stale_temporaries(self.run_dir, name)
            yield

    def _clear(self, files: list[Path]) -> None:
        """Delete a run's checkpoints, manifest and metrics (--overwrite)."""
        for path in [*files, self.run_dir / MANIFEST, self.run_dir / METRICS]:
            path.unlink(missing_ok=True)

    def load(self, path: Path, device: torch.device) -> dict:
        """The state of checkpoint `path` (the one resumed from, or --init-from's), checked to fit the run."""
        return load_compatible(Path(path), self.cfg.model, device)


def load_model(run_dir: Path, device: torch.device, checkpoint: Path | None = None) -> tuple[GPT, Config, int]:
    """The run's model from its newest intact (or the given) checkpoint, in eval mode."""
    if str(checkpoint) == "best":
        path = best_checkpoint(run_dir)
        if path is None:
            raise FileNotFoundError(f"{run_dir}: no intact best.pt (the run kept none: --no-save-best, or it is "
                                    f"corrupt); give --checkpoint PATH or leave it out for the newest")
    else:
        path = checkpoint or latest_checkpoint(run_dir)
    if path is None:
        raise FileNotFoundError(f"{run_dir}: no checkpoint found (train it first with python -m charlm.train)")
    state = check_finite(load_checkpoint(path, map_location=device), path)
    cfg = Config.from_dict(state["config"], source=str(path))
    model = GPT.from_config(cfg).to(device)
    check_weights_fit(state["model"], model, f"{path}: its weights do not fit its config")
    model.load_state_dict(state["model"])
    return model.eval(), cfg, state["step"]
