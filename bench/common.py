"""Shared benchmark machinery: timing, device and version facts, and the history file (DESIGN.md format)."""
import argparse
import datetime as _dt
import json
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable

import torch

HISTORY = Path(__file__).parent / "results" / "history.jsonl"


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


def kernel_bench_args(script: str, description: str) -> tuple[argparse.Namespace, torch.device | None]:
    """The flags every kernel benchmark takes (--cpu, --no-history), and the device to measure on: the GPU,
    or with --cpu the CPU through Triton's interpreter (a smoke test); None, said aloud, when there is none."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true",
                        help="without a CUDA GPU, time one tiny case through Triton's interpreter")
    parser.add_argument("--no-history", action="store_true", help="print only; append nothing")
    args = parser.parse_args()
    if torch.cuda.is_available():
        return args, torch.device("cuda")
    if args.cpu:
        return args, torch.device("cpu")
    print(f"{script}: no CUDA GPU, nothing measured (--cpu smoke-tests the script through Triton's interpreter)")
    return args, None


def time_ms(fn: Callable[[], object], warmup: int = 5, rep: int = 20, device=None) -> float:
    """Median wall time of fn() in milliseconds: CUDA events on a GPU, perf_counter on the CPU."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(rep):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(rep):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def peak_memory_gb(device=None) -> float | None:
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30


def record(bench: str, impl: str, case: dict, ms: float, *, baseline: bool = False, tflops=None, gbps=None,
           tokens_per_s=None, peak_mem_gb=None, device=None, **extra) -> dict:
    """One history row in DESIGN.md's format; extra keys (e.g. speedup, baseline_ms) are appended."""
    return {
        "bench": bench, "impl": impl, "baseline": baseline, "case": case, "ms": ms,
        "tflops": tflops, "gbps": gbps, "tokens_per_s": tokens_per_s, "peak_mem_gb": peak_mem_gb,
        "device": device_name(device), "commit": git_commit(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(), **extra,
    }


def append_history(rows: list[dict], path: Path = HISTORY) -> None:
    """Append rows as JSON lines; one write call so a crash leaves whole lines only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))


def print_table(rows: list[dict], columns: list[str]) -> None:
    """Print rows (dicts) as an aligned plain-text table with the given columns."""
    cells = [[_fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.3e}"
    return str(v)
