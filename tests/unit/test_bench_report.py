"""bench/report.py on a synthetic history: latest rows, same-run baseline ratios, malformed lines, plots."""
import json
from pathlib import Path

import pytest

import common
import report

CASE = {"B": 8, "T": 512, "H": 8, "D": 64, "dtype": "bfloat16", "pass": "fwd+bwd"}
DEVICES = ("NVIDIA A100-SXM4-40GB", "NVIDIA H100 80GB HBM3")
COMMITS = (("aaaaaaaaaaaa", "2025-01-01T10:00:00+00:00"), ("bbbbbbbbbbbb", "2025-02-01T10:00:00+00:00"))


def row(device, commit, date, impl, ms, baseline=False, bench="attn"):
    return common.record(bench, impl, CASE, ms, baseline=baseline, tflops=100.0 / ms) | {
        "device": device, "commit": commit, "date": date}


def timings(device_index: int, commit_index: int) -> dict:
    """Distinct ms per device, commit and impl, so that a wrong pairing shows."""
    base = 10.0 + device_index
    return {"sdpa": base + commit_index, "triton": base / (2 + commit_index)}


@pytest.fixture
def history(tmp_path) -> Path:
    rows = []
    for d, device in enumerate(DEVICES):
        for c, (commit, date) in enumerate(COMMITS):
            ms = timings(d, c)
            rows.append(row(device, commit, date, "sdpa", ms["sdpa"], baseline=True))
            rows.append(row(device, commit, date, "triton", ms["triton"]))
    # An older run of the latest commit, whose baseline must not be paired with the newer triton row.
    rows.append(row(DEVICES[0], COMMITS[1][0], "2025-01-15T10:00:00+00:00", "sdpa", 99.0, baseline=True))
    rows.append(row(DEVICES[0], COMMITS[0][0], "2025-01-01T09:00:00+00:00", "loader-only", 1.0, bench="loader")
                | {"tokens_per_s": 5e6})
    path = tmp_path / "history.jsonl"
    lines = [json.dumps(r) for r in rows]
    lines[3:3] = ["{not json", json.dumps([1, 2]), json.dumps({"bench": "attn"}), "",
                  json.dumps(rows[0] | {"case": "B=8"})]
    path.write_text("\n".join(lines) + "\n")
    return path


def table(markdown: str, device: str) -> dict[str, list[str]]:
    """impl -> cells of the attn table rows under the device's heading."""
    section = markdown.split(f"## {device}\n", 1)[1].split("\n## ", 1)[0]
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in section.splitlines()
            if line.startswith("| attn")]
    return {cells[report.COLUMNS.index("impl")]: cells for cells in rows}


def test_malformed_lines_are_skipped_with_a_warning(history, capsys):
    rows = report.read_history(history)
    assert len(rows) == 2 * 2 * 2 + 2
    assert capsys.readouterr().err.count("warning:") == 4


def test_table_shows_latest_commit_and_same_run_ratio(history):
    markdown = report.markdown_report(report.read_history(history))
    for d, device in enumerate(DEVICES):
        cells = table(markdown, device)
        latest = timings(d, 1)
        col = report.COLUMNS.index
        assert cells["triton"][col("commit")] == COMMITS[1][0]
        assert float(cells["triton"][col("ms")]) == pytest.approx(latest["triton"], rel=1e-3)
        assert cells["triton"][col("vs baseline")] == f"{latest['sdpa'] / latest['triton']:.2f}x"
        assert cells["sdpa"][col("baseline?")] == "yes" and cells["sdpa"][col("vs baseline")] == "-"
        assert cells["sdpa"][col("case")] == report.case_label(CASE)
    assert markdown.index(f"## {DEVICES[0]}") < markdown.index(f"## {DEVICES[1]}")


def test_main_prints_and_writes_plots(history, tmp_path, capsys):
    out = tmp_path / "out"
    report.main(["--history", str(history), "--out", str(out)])
    printed = capsys.readouterr().out
    assert f"## {DEVICES[1]}" in printed
    assert "## " + DEVICES[0] in (out / "report.md").read_text()
    for bench in ("attn", "loader"):
        png = (out / f"{bench}.png").read_bytes()
        assert png.startswith(b"\x89PNG") and len(png) > 1000


def test_main_figure_prefers_throughput():
    assert report.main_figure([{"ms": 1.0, "tokens_per_s": None, "tflops": 3.0}]) == "tflops"
    assert report.main_figure([{"ms": 1.0}]) == "ms"


def test_loader_speedups_pair_every_thread_count_with_the_same_run_baseline(tmp_path, monkeypatch):
    """The loader's rows differ in threads, not in case: each is compared with nanoGPT's row of the run, and
    each keeps its own line; figures spanning decades are drawn on a log scale, the legend beside the axes."""
    case = {"B": 64, "T": 512, "tipa": True}
    when = {"device": "cpu", "commit": "cccccccccccc", "date": "2025-03-01T10:00:00+00:00"}
    rows = [common.record("loader", "nanogpt", case, 4.0, baseline=True, tokens_per_s=8e6) | when,
            common.record("loader", "c++", case, 0.1, tokens_per_s=3e8, threads=1) | when,
            common.record("loader", "c++", case, 0.05, tokens_per_s=6e8, threads=2) | when]
    prefetched = common.record("loader", "c++ prefetched", case, 0.01, threads=2, work_ms=20.0) | when
    older = common.record("loader", "c++", {**case, "threads": 4, "work_ms": None}, 0.08) | when  # settings in case
    path = tmp_path / "history.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [*rows, prefetched, older]))
    markdown = report.markdown_report(report.read_history(path))
    assert "| c++ threads=1 |" in markdown and "| 40.00x |" in markdown
    assert "| c++ threads=2 |" in markdown and "| 80.00x |" in markdown
    assert "| c++ threads=4 |" in markdown and "| 50.00x |" in markdown  # an older row pairs too
    prefetched_line = next(line for line in markdown.splitlines() if "c++ prefetched" in line)
    assert "x |" not in prefetched_line  # a call's wait while prefetching is no batch time: no speed-up
    figures = []
    monkeypatch.setattr(report, "save_figure", lambda fig, path, dpi: figures.append(fig))
    report.plot_bench(rows, "tokens_per_s", tmp_path / "loader.png")
    ax = figures[0].axes[0]
    assert ax.get_yscale() == "log" and len(ax.get_lines()) == 3
    legend = ax.get_legend()
    assert legend.get_bbox_to_anchor().transformed(ax.transAxes.inverted()).x0 > 1  # outside the axes
