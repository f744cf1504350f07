"""Every benchmark on a bare GPU machine in one call, inside a time budget, with a report however it ends.

On a GPU machine, from the repository's root, in one call that may run 10 minutes (it ends within its
--budget, 480 s by default, report included; no network needed: the machine's own torch, Triton,
pybind11, CMake and ninja are used):

    bash bench/run_all.sh --out OUT
    bash bench/run_all.sh --out OUT --budget 300 --full --max-memory-gb 80
    bash bench/run_all.sh --dry-run --out DIR    # no GPU: every stage on the CPU, tiny shapes, < 3 minutes

What comes back, in OUT (default bench/results/):
    report.md      the one-screen summary: each claim, its figure, its baseline measured in the same run,
                   the ratio and PASS/FAIL against the claim's goal; how each stage ended; the memory
                   planner's predictions beside the measured memory; every row of the run
    run.log        everything the stages printed, with the driver's lines
    run.jsonl      this run's history rows
    history.jsonl  the history, with this run's rows appended
The summary is printed last, too. Rows are appended the moment each is measured, and report.md and
run.log are written whether the run finishes, a stage times out or crashes, the budget runs out, or the
run is interrupted (SIGTERM, SIGINT).

Stages, in priority order, each under a timeout cut to what is left of the budget; a stage that no longer
fits is skipped with a line saying so:
  install      pip install --no-build-isolation --no-index --no-deps -e . (the image's packages, no index);
               if it fails (the C++ loader does not build), the rest runs from the source tree with the
               NumPy loader, and the log and report say so. A dry run asks pip with --dry-run: nothing
               is installed.
  precompile   Triton's autotune candidates for every shape timed below, compiled in parallel into the
               disk cache (the autotuner would compile them one at a time)
  train        DEEP tokens/s and peak memory, charlm vs the nanoGPT-style baseline, in one process
  memory       the planner's prediction beside allocated, reserved and outside-the-allocator memory for
               DEEP at widths 512 and 768, eager and compiled
  attn         attention at T=512, D=64 and 128, bf16, fwd and fwd+bwd, vs every SDPA backend that runs
               (FlexAttention and naive attention with --full)
  rope         RoPE at the model's shapes and at shapes too large for L2, vs torch.compile and Liger-Kernel
  loader       the data loaders, and the trainer's share of the DEEP step measured above
  kernel-test  one GPU kernel test (fused RoPE flash attention against its float64 reference)
--max-memory-gb N (default 40, an A100 40GB) emulates a card of N GB in train and memory: what is outside
PyTorch's allocator counts against N.
"""
import time

STARTED = time.monotonic()  # the budget counts from here: imports included

import argparse  # noqa: E402
import datetime as dt  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# This driver runs before charlm is installed: its own imports (charlm.io, through report.py too) then come
# from the source tree, last on the path so that an installed charlm comes first. The stages get only what
# the install stage sets up.
sys.path.append(str(ROOT))

from charlm.io import atomic_write_text  # noqa: E402
from common import HISTORY, card_gb, device_name  # noqa: E402
from report import read_history  # noqa: E402
from summary import STAGE_HEADER, claims, markdown_table, report_markdown, screen  # noqa: E402

REPORT_SECONDS = 15  # kept back from the budget for the summary and report
GPU_TEST = "tests/kernels/test_flash_attn.py::test_gpu_deep_shape_with_fused_rope"
DRY_RUN_TEST = "tests/kernels/test_flash_attn.py::test_fused_rope_equals_apply_rope_then_attention"


class Interrupted(Exception):
    """SIGTERM or SIGINT: stop the stage, write the report."""


@dataclass
class Stage:
    name: str
    min_seconds: int  # on a GPU: less left than this, and it is skipped
    max_seconds: int  # on a GPU: its timeout when the budget allows
    ended: str = "not reached"
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


class Run:
    """One run: its options, output files, log, stages and the clock."""

    def __init__(self, args: argparse.Namespace):
        self.args, self.out = args, args.out
        self.started = STARTED
        self.run_id = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ") + f"-{os.getpid()}"
        self.rows_path, self.history_path = self.out / "run.jsonl", self.out / "history.jsonl"
        self.out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.rows_path, "")
        self.log_lines: list[str] = []
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.shim: Path | None = None  # the import folder used when the install fails

    def left(self) -> float:
        return self.args.budget - REPORT_SECONDS - (time.monotonic() - self.started)

    def say(self, line: str) -> None:
        stamp = f"[{time.monotonic() - self.started:6.1f}s] "
        for part in line.splitlines() or [""]:
            self.log_lines.append(stamp + part)
            print(stamp + part, flush=True)

    def history_args(self) -> list[str]:
        return ["--history", str(self.rows_path), "--history", str(self.history_path), "--run-id", self.run_id]

    def command(self, stage: Stage, argv: list[str], timeout: float, env: dict | None = None,
                cwd: Path = ROOT) -> int | None:
        """Run argv (from the repository root), its output into the log as it comes; the exit status, or None
        when it was stopped at its timeout (its whole process group is ended)."""
        self.say(f"$ {' '.join(argv)}")
        proc = subprocess.Popen(argv, cwd=cwd, env={**self.env, **(env or {})}, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
        reader = threading.Thread(target=lambda: [self.say(f"  {line.rstrip()}") for line in proc.stdout],
                                  daemon=True)
        reader.start()
        try:
            return proc.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            stage.notes.append(f"stopped at its {timeout:.0f} s timeout")
            return None
        finally:  # however the stage ended (a timeout, Interrupted), no process of it outlives it
            _end_group(proc)
            reader.join(timeout=10)


def _end_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the process group this driver started for a stage (its children included), then, once the
    stage's process has ended or 5 s have passed, SIGKILL to whatever is left of the group."""
    for sig, grace in ((signal.SIGTERM, 5), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:  # the whole group is gone
            return
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass


# --- stages -----------------------------------------------------------------------------------------------

def install(run: Run, stage: Stage, timeout: float) -> int | None:
    """The package, offline, without build isolation; a source-tree import folder if that fails."""
    pip = [sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-index", "--no-deps"]
    if run.args.dry_run:
        pip.append("--dry-run")
        stage.notes.append("dry run: pip resolved and built the metadata offline; nothing installed")
    status = run.command(stage, [*pip, "-e", "."], timeout)
    if status != 0:
        stage.notes.append("pip install failed: running from the source tree")
    if not imports(run, stage):
        run.shim = source_tree_imports(ROOT)
        run.env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(run.shim), run.env.get("PYTHONPATH")]))
        if not imports(run, stage):
            stage.notes.append("charlm does not import: the stages will fail")
            return 1
    return status


def imports(run: Run, stage: Stage) -> bool:
    """Whether charlm and its kernels import in the stages' environment; notes whether the C++ loader does."""
    probe = ("import importlib.util, charlm.kernels.flash_attn, charlm.loader; "
             "print('c++' if importlib.util.find_spec('charlm._loader') else 'numpy')")
    done = subprocess.run([sys.executable, "-c", probe], cwd=tempfile.gettempdir(), env=run.env,
                          capture_output=True, text=True)
    if done.returncode:
        run.say(f"  charlm does not import here: {done.stderr.strip().splitlines()[-1:]}")
        return False
    if done.stdout.strip() == "numpy":
        stage.notes.append("the C++ loader is not built: the NumPy loader runs")
    return True


def source_tree_imports(root: Path) -> Path:
    """A folder to put on PYTHONPATH that imports charlm from the source tree, with kernels/ as
    charlm.kernels as setup.py maps it: links to charlm's files and to kernels/."""
    folder = Path(tempfile.mkdtemp(prefix="charlm-src-")) / "charlm"
    folder.mkdir()
    for entry in (root / "charlm").iterdir():
        if entry.name != "kernels":
            (folder / entry.name).symlink_to(entry)
    (folder / "kernels").symlink_to(root / "kernels")
    return folder.parent


def script_argv(run: Run, name: str) -> tuple[list[str], dict]:
    """The command of a measuring stage and its extra environment."""
    args, dry = run.args, ["--dry-run"] if run.args.dry_run else []
    python = [sys.executable]
    memory = ["--max-memory-gb", str(args.max_memory_gb)]
    interpreter = {"TRITON_INTERPRET": "1"} if args.dry_run else {}  # tiny shapes through Triton's interpreter
    return {
        "precompile": ([*python, "bench/precompile.py", *dry], {}),
        "train": ([*python, "bench/train.py", "--cases", "deep", *memory, *dry, *run.history_args()], {}),
        "memory": ([*python, "bench/memory.py", *memory, *dry, *run.history_args()], {}),
        "attn": ([*python, "bench/attn.py", *(["--full"] if args.full else []), *dry, *run.history_args()],
                 interpreter),
        "rope": ([*python, "bench/rope.py", *dry, *run.history_args()], interpreter),
        "loader": ([*python, "bench/loader.py", *dry, *run.history_args()], {}),
        # Absolute, and run from elsewhere: `python -m` would put the source tree's charlm/ (without
        # charlm/kernels) ahead of the installed package.
        "kernel-test": ([*python, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", f"--rootdir={ROOT}",
                         str(ROOT / (DRY_RUN_TEST if args.dry_run else GPU_TEST))], interpreter),
    }[name]


# (name, least seconds worth starting on a GPU, timeout on a GPU when the budget allows): estimates for a
# cold H100 or H200 (compilation included), to be replaced by what run.log shows.
STAGES = [("install", 5, 150), ("precompile", 20, 90), ("train", 90, 200), ("memory", 60, 150), ("attn", 30, 90),
          ("rope", 20, 90), ("loader", 10, 40), ("kernel-test", 15, 60)]


def run_stage(run: Run, stage: Stage) -> None:
    left = run.left()
    # A dry run's stages take seconds: only the budget bounds them.
    needed, cap = (1, left) if run.args.dry_run else (stage.min_seconds, stage.max_seconds)
    if left < needed:
        stage.ended = "skipped"
        stage.notes.append(f"needs at least {needed} s, {max(left, 0):.0f} s left")
        run.say(f"== {stage.name}: skipped, needs at least {needed} s and {max(left, 0):.0f} s are left")
        return
    timeout = min(cap, left)
    run.say(f"== {stage.name} (timeout {timeout:.0f} s)")
    stage.ended, start = "running", time.monotonic()
    try:
        if stage.name == "install":
            status = install(run, stage, timeout)
        else:
            argv, env = script_argv(run, stage.name)
            status = run.command(stage, argv, timeout, env, cwd=tempfile.gettempdir() if "pytest" in argv else ROOT)
    finally:
        stage.seconds = time.monotonic() - start
    stage.ended = "timed out" if status is None else "ok" if status == 0 else f"failed (exit {status})"
    run.say(f"== {stage.name}: {stage.ended} in {stage.seconds:.0f} s")


# --- the report -------------------------------------------------------------------------------------------

def finish(run: Run, stages: list[Stage]) -> None:
    """report.md, run.log and the printed summary, from this run's rows. Should the summary itself fail,
    report.md still says how each stage ended, and why there is no summary."""
    stage_cells = [[s.name, s.ended, f"{s.seconds:.0f}", "; ".join(s.notes)] for s in stages]
    kind = "DRY RUN (CPU, tiny shapes, reference paths)" if run.args.dry_run else "GPU run"
    try:
        rows = read_history(run.rows_path) if run.rows_path.is_file() else []
        title = f"charlm benchmarks, {kind}: {rows[0]['device'] if rows else device_name()}, run {run.run_id}"
        notes = [f"budget {run.args.budget:.0f} s, used {time.monotonic() - run.started:.0f} s; "
                 f"--max-memory-gb {run.args.max_memory_gb:g}; {len(rows)} rows in run.jsonl"]
        if run.args.dry_run:
            notes.append("a dry run checks that every stage works: its figures are not measurements of the claims")
        lines = claims(rows)
        markdown, text = report_markdown(title, notes, lines, stage_cells, rows), screen(title, lines, stage_cells)
    except Exception as e:  # a bug in the summary must not cost the run its report
        title = f"charlm benchmarks, {kind}, run {run.run_id}: no summary ({type(e).__name__}: {e})"
        markdown = f"# {title}\n\n" + markdown_table(STAGE_HEADER, stage_cells) + "\n"
        text = title
    atomic_write_text(run.out / "report.md", markdown)
    run.say(text)
    run.say(f"wrote {run.out / 'report.md'}, {run.out / 'run.log'} and {run.rows_path}")
    atomic_write_text(run.out / "run.log", "\n".join(run.log_lines) + "\n")
    if run.shim:
        shutil.rmtree(run.shim, ignore_errors=True)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench/run_all.sh", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=float, default=480.0, help="seconds for the whole run (default: 480)")
    parser.add_argument("--out", type=Path, help=f"output folder (default: {HISTORY.parent.relative_to(ROOT)}/)")
    parser.add_argument("--full", action="store_true", help="also FlexAttention and naive attention (minutes)")
    parser.add_argument("--max-memory-gb", type=card_gb, default=40.0,
                        help="emulate a card of this many GB in train and memory; 0: the whole card (default: 40)")
    parser.add_argument("--dry-run", action="store_true", help="every stage on the CPU with tiny shapes")
    args = parser.parse_args(argv)
    if args.dry_run and args.out is None:
        parser.error("--dry-run needs --out DIR: its rows are no measurements and stay out of bench/results/")
    if args.budget <= REPORT_SECONDS:
        parser.error(f"--budget must be more than the {REPORT_SECONDS} s kept for the report, got {args.budget:g}")
    args.out = args.out or HISTORY.parent
    return args


def _interrupt(signum, frame):
    raise Interrupted(signal.Signals(signum).name)


def main(argv=None) -> int:
    args = parse_args(argv)
    run = Run(args)
    stages = [Stage(name, low, high) for name, low, high in STAGES]
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        for stage in stages:
            run_stage(run, stage)
    except Interrupted as e:
        run.say(f"== interrupted by {e}: writing the report")
        for stage in stages:
            if stage.ended == "running":
                stage.ended = f"interrupted ({e})"
    except Exception as e:  # a bug in the driver itself: the report still says how far it got
        run.say(f"== the driver failed: {type(e).__name__}: {e}")
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        finish(run, stages)
    return 0 if all(s.ended == "ok" for s in stages) else 1


if __name__ == "__main__":
    sys.exit(main())
