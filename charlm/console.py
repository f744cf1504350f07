"""What a command shows while it works: a progress bar on a terminal, plain lines in a log file.

A cluster job's log (stdout redirected to a file, or piped through `tee`) gets one plain line per logged
step and no bar; a terminal gets the bar, with eval rows printed above it so that they stay visible.
"""
import sys


def interactive() -> bool:
    """Whether stdout is a terminal (a human watching), not a file or a pipe."""
    return sys.stdout.isatty()


def progress(iterable=None, disable: bool = False, **kwargs):
    """A tqdm bar on a terminal; off (a plain iterator) when stdout is a file or a pipe."""
    from tqdm import tqdm
    return tqdm(iterable, disable=disable or not interactive(), dynamic_ncols=True, **kwargs)


def format_row(row: dict, max_iters: int) -> str:
    """One logged step as a line: step, train BPC, val BPC when evaluated, tokens/s, MFU on CUDA, LR."""
    parts = [f"step {row['step']}/{max_iters}: train bpc {row['train_bpc']:.4f}"]
    if "val_bpc" in row:
        parts.append(f"val bpc {row['val_bpc']:.4f}")
    parts.append(f"{row['tokens_per_s']:,.0f} tok/s")
    if row.get("mfu") is not None:
        parts.append(f"mfu {100 * row['mfu']:.1f}%")
    parts.append(f"lr {row['lr']:.2e}")
    if row.get("skipped_steps"):
        parts.append(f"{row['skipped_steps']} steps skipped (non-finite)")
    return ", ".join(parts)
