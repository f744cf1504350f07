"""Shared benchmark machinery: timing, device and version facts, and the history file (DESIGN.md format)."""
import argparse
import datetime as _dt
import functools
import json
import platform
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

HISTORY = Path(__file__).parent / "results" / "history.jsonl"

# The shapes a GPU run times, in one place: bench/precompile.py compiles their attention kernels ahead.
# Attention (bench/attn.py), (B, T, H, D): FlashAttention's benchmark shapes, B * T = 16384 tokens and
# width H * D = 2048, at the model's context of 512.
ATTN_CASES = [(16384 // 512, 512, 2048 // D, D) for D in (64, 128)]
# DEEP (bench/train.py, bench/memory.py): 32 layers, context 512, heads of 64, at these widths.
DEEP_WIDTHS = (512, 768)
DEEP_BLOCK_SIZE, DEEP_HEAD_DIM = 512, 64


def device_name(device: torch.device | str | None = None) -> str:
    """The GPU's name, or the CPU's model name when there is no GPU."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return "CPU: " + line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "CPU: " + (platform.processor() or platform.machine())


def versions() -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"torch": torch.__version__, "triton": triton_version, "cuda": torch.version.cuda}


@functools.cache
def git_commit() -> str | None:
    """HEAD's short sha, with "-dirty" when tracked files differ from it (the figures are not HEAD's)."""
    def git(*args):
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=Path(__file__).parent, check=True)
    try:
        sha = git("rev-parse", "--short=12", "HEAD").stdout.strip()
        dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def card_gb(text: str) -> float:
    """--max-memory-gb's type: GB of an emulated card, >= 0 (0: the whole card)."""
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0 (0: the whole card), got {text}")
    return value


def bench_parser(description: str, history: bool = True) -> argparse.ArgumentParser:
    """The flags every benchmark takes: --dry-run, and (with history) where its rows go."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true",
                        help="tiny shapes on the CPU: checks that the script works, measures nothing worth keeping")
    if not history:
        return parser
    parser.add_argument("--history", type=Path, action="append",
                        help=f"append each row to this file, the moment it is measured; may be given several "
                             f"times (default: {HISTORY.relative_to(Path(__file__).parents[1])})")
    parser.add_argument("--no-history", action="store_true", help="print only; append nothing")
    parser.add_argument("--run-id", help="a label stored in every row (bench/run_all.py: one per run)")
    return parser


def kernel_device(script: str, args: argparse.Namespace) -> torch.device | None:
    """The device a kernel benchmark measures on: the GPU, or with --dry-run the CPU (through Triton's
    interpreter, tiny shapes); None, said aloud, when there is no GPU and no --dry-run."""
    if args.dry_run:
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    print(f"{script}: no CUDA GPU, nothing measured (--dry-run runs it on the CPU with tiny shapes)")
    return None


class History:
    """Where a benchmark's rows go: each is appended to every history file as soon as it is measured, so
    a run that is killed keeps what it measured."""

    def __init__(self, args: argparse.Namespace):
        self.paths = [] if args.no_history else (args.history or [HISTORY])
        self.run_id = args.run_id
        self.rows: list[dict] = []

    def add(self, row: dict) -> dict:
        row = {**row, "run": self.run_id} if self.run_id else row
        self.rows.append(row)
        for path in self.paths:
            append_history([row], path)
        return row


QUANTILES = (0.0, 0.5, 0.8)  # min, median, p80


@dataclass(frozen=True)
class Timing:
    """Milliseconds per call: the fastest, the median and the 80th percentile of the repetitions."""
    min: float
    median: float
    p80: float

    @classmethod
    def of(cls, times_ms: list[float]) -> "Timing":
        low, mid, high = np.quantile(np.asarray(times_ms, dtype=float), QUANTILES)
        return cls(float(low), float(mid), float(high))

    def fields(self) -> dict:
        return {"ms": self.median, "ms_min": self.min, "ms_p80": self.p80}


def time_ms(fn: Callable[[], object], warmup: int = 1, rep: int = 3, device=None) -> Timing:
    """Time fn(). On a GPU, triton.testing.do_bench: CUDA events around each call, L2 flushed before each
    (a 256 MB buffer is zeroed), as many calls as fit in 100 ms after 25 ms of warm-up. On the CPU (dry
    runs: the plumbing, not the figures) warmup untimed and rep timed calls of perf_counter."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        import triton.testing
        with torch.cuda.device(device):
            return Timing(*triton.testing.do_bench(fn, quantiles=list(QUANTILES)))
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(rep):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return Timing.of(times)


def record(bench: str, impl: str, case: dict, ms: "float | Timing | None", *, baseline: bool = False,
           tflops=None, gbps=None, tokens_per_s=None, peak_mem_gb=None, device=None, **extra) -> dict:
    """One history row in DESIGN.md's format; ms is the median (None: not timed, e.g. out of memory), and a
    Timing adds ms_min and ms_p80. Extra keys (e.g. speedup, baseline_ms) are appended."""
    times = ms.fields() if isinstance(ms, Timing) else {"ms": ms}
    return {
        "bench": bench, "impl": impl, "baseline": baseline, "case": case, **times,
        "tflops": tflops, "gbps": gbps, "tokens_per_s": tokens_per_s, "peak_mem_gb": peak_mem_gb,
        "device": device_name(device), "commit": git_commit(),
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "versions": versions(), **extra,
    }


def append_history(rows: list[dict], path: Path = HISTORY) -> None:
    """Append rows as JSON lines; one write call so a crash leaves whole lines only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))


def text_table(header: list[str], cells: list[list[str]]) -> str:
    """An aligned plain-text table: the header, then one line per row of cells."""
    widths = [max([len(h), *(len(row[i]) for row in cells)]) for i, h in enumerate(header)]
    lines = [header, *cells]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines)


def print_table(rows: list[dict], columns: list[str]) -> None:
    """Print rows (dicts) as an aligned plain-text table with the given columns."""
    print(text_table(columns, [[format_cell(r.get(c)) for c in columns] for r in rows]))


def format_cell(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.3e}"
    return str(v)
