"""Render bench/results/history.jsonl: the latest figures per device, bench, case and implementation.

    python bench/report.py                      # print the Markdown tables
    python bench/report.py --out bench/report   # also write report.md and one <bench>.png per bench

Each implementation's row is compared with its case's baseline measured in the same run: the baseline
row of the same device, bench, case and commit whose date is nearest. "vs baseline" is the speed-up,
baseline ms / ms (above 1: faster than the baseline). The plots show each bench's main figure over
commits, in date order: tokens/s, TFLOP/s or GB/s, whichever the bench records, else ms.
"""
import argparse
import datetime as dt
import functools
import json
import sys
from collections import defaultdict
from pathlib import Path

from charlm.io import atomic_write_text, pyplot, save_figure
from common import HISTORY, format_cell  # (bench/ is a folder of scripts: python puts it on sys.path)

REQUIRED = ("bench", "impl", "case", "device", "date")
FIGURES = {"tokens_per_s": "tokens/s", "tflops": "TFLOP/s", "gbps": "GB/s", "ms": "ms"}  # plot preference order
COLUMNS = ["bench", "case", "impl", "baseline?", "ms", "TFLOP/s", "GB/s", "tokens/s", "peak GB",
           "vs baseline", "commit", "date"]


def read_history(path: Path) -> list[dict]:
    """The rows of a history file, in file order; malformed lines are skipped with a warning on stderr."""
    rows = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            missing = [key for key in REQUIRED if key not in row] if isinstance(row, dict) else ["all"]
            if missing:
                raise ValueError(f"missing {', '.join(missing)}")
            if not isinstance(row["case"], dict):
                raise ValueError("case is not an object")
            # Rows written before implementation settings left the case: move them out, so they pair.
            row |= {key: row["case"].pop(key) for key in IMPL_SETTINGS if key in row["case"]}
            when(row)
        except (ValueError, TypeError) as e:
            print(f"warning: {path}:{number}: skipped a malformed row ({e})", file=sys.stderr)
            continue
        rows.append(row)
    return rows


def when(row: dict) -> dt.datetime:
    """A row's date; one without a time zone is taken as UTC, as bench.common.record writes them."""
    return _parse_date(row["date"])


@functools.cache
def _parse_date(date: str) -> dt.datetime:
    time = dt.datetime.fromisoformat(date)
    return time if time.tzinfo else time.replace(tzinfo=dt.UTC)


def case_label(case: dict) -> str:
    """A compact one-line form of a case: "B=8 T=512 dtype=bfloat16"."""
    return " ".join(f"{key}={value}" for key, value in case.items())


# Settings of an implementation, beside its name, that make rows of one case different measurements.
IMPL_SETTINGS = ("threads", "work_ms")


def _series(row: dict) -> tuple:
    """What a row measures: rows with the same series are repeated measurements of one thing."""
    settings = tuple(row.get(key) for key in IMPL_SETTINGS)
    return row["device"], row["bench"], json.dumps(row["case"], sort_keys=True), row["impl"], settings


def latest_rows(rows: list[dict]) -> list[dict]:
    """The newest row of each device x bench x case x impl (a later line wins a tie)."""
    latest = {}
    for row in rows:
        key = _series(row)
        if key not in latest or when(row) >= when(latest[key]):
            latest[key] = row
    return list(latest.values())


def _run(row: dict) -> tuple:
    """Rows of one run of a bench on one case: device, bench, case and commit."""
    return *_series(row)[:3], row.get("commit")


def baselines_by_run(rows: list[dict]) -> dict[tuple, list[dict]]:
    by_run = defaultdict(list)
    for row in rows:
        if row.get("baseline"):
            by_run[_run(row)].append(row)
    return by_run


def speedup(row: dict, baselines: dict[tuple, list[dict]]) -> float | None:
    """baseline ms / ms, against the baseline of row's run nearest in date; None for a baseline row or
    where there is nothing to compare."""
    if row.get("baseline") or row.get("work_ms"):  # a prefetched call's wait is not a batch's time
        return None
    same_run = baselines.get(_run(row), [])
    base = min(same_run, key=lambda r: abs(when(r) - when(row)), default=None)
    if base is None or not base.get("ms") or not row.get("ms"):
        return None
    return base["ms"] / row["ms"]


def impl_label(row: dict) -> str:
    """The implementation with its settings: "c++ threads=4"."""
    return " ".join([row["impl"], *(f"{key}={row[key]}" for key in IMPL_SETTINGS if row.get(key) is not None)])


def _table_row(row: dict, baselines: dict[tuple, list[dict]]) -> list[str]:
    ratio = speedup(row, baselines)
    return [row["bench"], case_label(row["case"]), impl_label(row), "yes" if row.get("baseline") else "",
            *(format_cell(row.get(key)) for key in ("ms", "tflops", "gbps", "tokens_per_s", "peak_mem_gb")),
            "-" if ratio is None else f"{ratio:.2f}x", (row.get("commit") or "?")[:12], row["date"]]


def markdown_report(rows: list[dict]) -> str:
    """One Markdown table per device of the latest rows, baselines first within each case."""
    baselines = baselines_by_run(rows)
    by_device = defaultdict(list)
    for row in latest_rows(rows):
        by_device[row["device"]].append(row)
    sections = []
    for device in sorted(by_device):
        ordered = sorted(by_device[device], key=lambda r: (r["bench"], case_label(r["case"]),
                                                            not r.get("baseline"), r["impl"]))
        lines = [f"## {device}", "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
        lines += ["| " + " | ".join(_table_row(row, baselines)) + " |" for row in ordered]
        sections.append("\n".join(lines) + "\n")
    return "\n".join(sections)


def main_figure(rows: list[dict]) -> str | None:
    """The first figure in FIGURES that some row of the bench records."""
    return next((key for key in FIGURES if any(r.get(key) is not None for r in rows)), None)


def plot_bench(bench_rows: list[dict], figure: str, path: Path) -> None:
    """A figure of a bench over commits (x: commits in date order), one line per device, case and impl; the
    legend beside the axes, a log scale when the figures span more than a decade."""
    ordered = sorted(bench_rows, key=when)
    commits = list(dict.fromkeys(row.get("commit") for row in ordered))  # in order of first measurement
    series = defaultdict(dict)  # (device, case, impl) -> {commit index: value}; later rows overwrite
    for row in ordered:
        if row.get(figure) is not None:
            label = (row["device"], case_label(row["case"]), impl_label(row))
            series[label][commits.index(row.get("commit"))] = row[figure]
    several_devices = len({device for device, _, _ in series}) > 1
    fig, ax = pyplot().subplots(figsize=(8, 4.5))
    for (device, case, impl), points in sorted(series.items()):
        xs = sorted(points)
        label = f"{impl} {case}" + (f" ({device})" if several_devices else "")
        ax.plot(xs, [points[x] for x in xs], marker="o", label=label)
    values = [v for points in series.values() for v in points.values() if v > 0]
    if values and max(values) > 10 * min(values):
        ax.set_yscale("log")
    ax.set_xticks(range(len(commits)), [(c or "?")[:7] for c in commits], rotation=45)
    ax.set_xlabel("commit")
    ax.set_ylabel(FIGURES[figure])
    ax.set_title(f"{bench_rows[0]['bench']}: {FIGURES[figure]}")
    ax.legend(fontsize="x-small", loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    save_figure(fig, path, dpi=100)  # bbox "tight": the legend and title widen the image, not squeeze the axes


def write_report(rows: list[dict], out_dir: Path) -> None:
    """out_dir/report.md (the tables and the plots) and out_dir/<bench>.png."""
    by_bench = defaultdict(list)
    for row in rows:
        by_bench[row["bench"]].append(row)
    plotted = []
    for bench, bench_rows in sorted(by_bench.items()):
        figure = main_figure(bench_rows)
        if figure is not None:
            plot_bench(bench_rows, figure, out_dir / f"{bench}.png")
            plotted.append(bench)
    plots = "".join(f"![{bench}]({bench}.png)\n\n" for bench in plotted)
    atomic_write_text(out_dir / "report.md", "# Benchmarks\n\n" + markdown_report(rows) + "\n" + plots)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--history", type=Path, default=HISTORY, help="history file (default: %(default)s)")
    parser.add_argument("--out", type=Path, help="also write report.md and one PNG per bench here")
    args = parser.parse_args(argv)
    if not args.history.is_file():
        sys.exit(f"error: no history file at {args.history}; run a benchmark in bench/ first")
    rows = read_history(args.history)
    print(markdown_report(rows) if rows else f"{args.history} holds no valid rows")
    if args.out and rows:
        write_report(rows, args.out)
        print(f"wrote {args.out / 'report.md'} and the plots beside it")


if __name__ == "__main__":
    main()
