"""bench/run_all.sh: the dry run walks every stage on the CPU and writes every file; the driver stops a stage
at its timeout, skips what no longer fits, and writes its report when interrupted."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import run_all

ROOT = Path(__file__).resolve().parents[2]

STAGES = [name for name, _, _ in run_all.STAGES]


@pytest.mark.integration
def test_dry_run_walks_every_stage_and_writes_every_file(tmp_path):
    main_history = ROOT / "bench" / "results" / "history.jsonl"
    before = main_history.read_bytes() if main_history.is_file() else None
    out_dir = tmp_path / "out"
    done = subprocess.run([str(ROOT / "bench" / "run_all.sh"), "--dry-run", "--out", str(out_dir), "--budget", "300"],
                          capture_output=True, text=True, timeout=400, env={**os.environ, "PYTHON": sys.executable})
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-2000:]

    rows = [json.loads(line) for line in (out_dir / "run.jsonl").read_text().splitlines()]
    assert {r["bench"] for r in rows} == {"train", "memory", "attn", "rope", "loader"}
    assert len({r["run"] for r in rows}) == 1
    assert (out_dir / "history.jsonl").read_text() == (out_dir / "run.jsonl").read_text()
    report = (out_dir / "report.md").read_text()
    for stage in STAGES:
        assert f"| {stage} | ok |" in report, stage
    assert "DRY RUN" in report and "## Claims" in report and "## Memory planner" in report
    for claim in ("DEEP training tokens/s", "memory planner, DEEP 512-eager", "attention fwd+bwd",
                  "RoPE fwd+bwd", "loader batch"):
        assert claim in report and claim in done.stdout, claim  # in report.md and on the screen
    log = (out_dir / "run.log").read_text()
    assert all(f"== {stage}: ok" in log for stage in STAGES)
    assert (main_history.read_bytes() if main_history.is_file() else None) == before  # a dry run stays out of it


def test_help_says_how_to_run_it_on_a_gpu_and_what_comes_back():
    done = subprocess.run([str(ROOT / "bench" / "run_all.sh"), "--help"], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "PYTHON": sys.executable})
    assert done.returncode == 0
    for words in ("bash bench/run_all.sh --out OUT", "report.md", "run.log", "run.jsonl", "history.jsonl", "--budget",
                  "--dry-run", "PASS/FAIL"):
        assert words in done.stdout, words


@pytest.mark.parametrize("argv, message", [
    (["--dry-run"], "--dry-run needs --out DIR"),
    (["--out", "x", "--budget", "10"], "--budget must be more than"),
    (["--out", "x", "--max-memory-gb", "-1"], "--max-memory-gb: must be >= 0"),
])
def test_bad_flags_are_refused_before_any_work(argv, message, capsys):
    with pytest.raises(SystemExit):
        run_all.parse_args(argv)
    assert message in capsys.readouterr().err


def _fake_stages(monkeypatch, commands: dict[str, str]) -> None:
    """Stages that run `python -c <code>` instead of the benchmarks, and an install that does nothing."""
    monkeypatch.setattr(run_all, "STAGES", [(name, 1, 1000) for name in ["install", *commands]])
    monkeypatch.setattr(run_all, "install", lambda run, stage, timeout: 0)
    monkeypatch.setattr(run_all, "script_argv", lambda run, name: ([sys.executable, "-c", commands[name]], {}))


def test_a_stage_past_the_budget_is_stopped_and_the_rest_skipped(monkeypatch, tmp_path):
    pid_file = tmp_path / "pid"
    _fake_stages(monkeypatch, {
        "train": "print('measured'); import sys; sys.stdout.flush()",
        "memory": f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(120)",
        "attn": "print('never')",
    })
    monkeypatch.setattr(run_all, "STARTED", run_all.time.monotonic())
    status = run_all.main(["--dry-run", "--out", str(tmp_path / "out"), "--budget", str(run_all.REPORT_SECONDS + 8)])

    assert status == 1
    report = (tmp_path / "out" / "report.md").read_text()
    assert "| train | ok |" in report and "| memory | timed out |" in report and "| attn | skipped |" in report
    assert "stopped at its" in report and "needs at least 1 s" in report
    log = (tmp_path / "out" / "run.log").read_text()
    assert "measured" in log and "never" not in log
    with pytest.raises(ProcessLookupError):  # the stage's process was ended with it
        os.kill(int(pid_file.read_text()), 0)


def test_an_interrupted_run_still_writes_its_report(monkeypatch, tmp_path):
    _fake_stages(monkeypatch, {
        "train": "import os, signal, time; os.kill(os.getppid(), signal.SIGTERM); time.sleep(120)",
        "attn": "print('never')",
    })
    status = run_all.main(["--dry-run", "--out", str(tmp_path / "out"), "--budget", "600"])

    assert status == 1
    report = (tmp_path / "out" / "report.md").read_text()
    assert "| train | interrupted (SIGTERM) |" in report and "| attn | not reached |" in report
    assert "interrupted by SIGTERM" in (tmp_path / "out" / "run.log").read_text()


def test_without_an_install_charlm_imports_from_the_source_tree(tmp_path):
    folder = run_all.source_tree_imports(ROOT)
    probe = "import charlm, charlm.kernels.flash_attn as fa; print(charlm.__file__); print(fa.__file__)"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PYTHONPATH": str(folder)}
    done = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    package, kernel = done.stdout.split()
    assert package.startswith(str(folder)) and kernel.startswith(str(folder / "charlm" / "kernels"))
    assert Path(kernel).resolve() == ROOT / "kernels" / "flash_attn.py"
    shutil.rmtree(folder)


def test_a_failing_summary_still_leaves_the_stages_in_report_md(monkeypatch, tmp_path):
    _fake_stages(monkeypatch, {"train": "print('measured')"})

    def broken(rows):
        raise KeyError("tokens_per_s")
    monkeypatch.setattr(run_all, "claims", broken)
    run_all.main(["--dry-run", "--out", str(tmp_path / "out"), "--budget", "600"])

    report = (tmp_path / "out" / "report.md").read_text()
    assert "no summary (KeyError: 'tokens_per_s')" in report and "| train | ok |" in report
    assert "measured" in (tmp_path / "out" / "run.log").read_text()
