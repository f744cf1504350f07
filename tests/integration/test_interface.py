"""What users of nanoGPT, litgpt and torchtitan expect: log lines a file can hold, TensorBoard, config files,
a real --help, one `charlm` command, a schedule that --extend keeps continuous, curves with the LR."""
import json
import subprocess
import sys

import pytest

from charlm.config import Config
from charlm.console import format_row
from charlm.optim import lr_at
from charlm.train import main as train_main
from runs import train_args

pytestmark = pytest.mark.integration


def run_args(tiny_dataset, run, *extra, iters=6):
    return train_args(tiny_dataset, run, *extra, iters=iters, eval_interval=3, warmup_iters=2)


def charlm(*args, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "charlm", *args], capture_output=True, text=True, **kwargs)


def rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_a_log_file_gets_one_plain_line_per_logged_step_and_a_summary(tiny_dataset, tmp_path):
    run = tmp_path / "run"
    out = charlm("train", *run_args(tiny_dataset, run))
    assert out.returncode == 0, out.stderr
    assert "\r" not in out.stdout + out.stderr  # no progress bar in a file
    lines = [line for line in out.stdout.splitlines() if line.startswith("step ")]
    assert lines == [format_row(r, 6) for r in rows(run)]
    assert "val bpc" in lines[2] and "val bpc" not in lines[0] and "lr " in lines[0] and "tok/s" in lines[0]
    assert f"next: python -m charlm.eval {run}" in out.stdout and "best val bpc (estimate)" in out.stdout


def test_tensorboard_gets_the_metrics_rows_and_the_config(tiny_dataset, tmp_path):
    from tensorboard.backend.event_processing import event_accumulator as accumulator  # a dev dependency
    run = tmp_path / "run"
    train_main(run_args(tiny_dataset, run, "--logger", "tensorboard"))
    events = accumulator.EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    logged = rows(run)
    for key in ("train_bpc", "val_bpc", "lr", "tokens_per_s"):
        expected = [(r["step"], r[key]) for r in logged if key in r]
        assert [(e.step, pytest.approx(e.value, rel=1e-6)) for e in events.Scalars(key)] == expected, key
    plugin = events.PluginTagToContent("hparams")
    assert "_hparams_/session_start_info" in plugin
    assert b"n_layer" in plugin["_hparams_/session_start_info"]


@pytest.mark.parametrize("kind", ["toml", "json"])
def test_a_config_file_starts_a_run_and_flags_override_it(tiny_dataset, tmp_path, capsys, kind):
    root, name = tiny_dataset
    path = tmp_path / f"cfg.{kind}"
    if kind == "toml":
        path.write_text(f'variant = "rope"\npreset = "tiny"\ndataset = "{name}"\nlearning_rate = 1e-3\n'
                        f'[model]\nn_layer = 3\n')
    else:
        path.write_text(json.dumps({"variant": "rope", "preset": "tiny", "dataset": name, "learning_rate": 1e-3,
                                    "model": {"n_layer": 3}}))
    train_main(["--config", str(path), "--learning-rate", "2e-3", "--print-config"])
    cfg = Config.from_dict(json.loads(capsys.readouterr().out))
    assert (cfg.variant, cfg.model.pos_embedding, cfg.model.n_layer, cfg.model.n_embd) == ("rope", "rope", 3, 64)
    assert cfg.learning_rate == 2e-3 and cfg.dataset == name


def test_a_runs_own_config_json_reproduces_it(tiny_dataset, tmp_path, capsys):
    run = tmp_path / "run"
    train_main(run_args(tiny_dataset, run, "--variant", "rope", "--n-layer", "1", iters=2))
    capsys.readouterr()
    train_main(["--config", str(run / "config.json"), "--out-dir", str(tmp_path / "again"), "--print-config"])
    again = json.loads(capsys.readouterr().out)
    original = json.loads((run / "config.json").read_text())
    assert again["model"] == original["model"]
    assert {k: again[k] for k in ("variant", "learning_rate", "seed", "dataset")} == \
        {k: original[k] for k in ("variant", "learning_rate", "seed", "dataset")}


@pytest.mark.parametrize("text, message", [
    ('n_layr = 3\n', "unknown fields n_layr"), ('n_layer = "three"\n', "n_layer must be int"),
    ('attn = "flash"\n', "attn must be one of auto, sdpa, triton, naive"), ("n_layer = \n", "not TOML")])
def test_a_bad_config_file_is_one_line_naming_it(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(SystemExit) as exit_info:
        train_main(["--config", str(path), "--print-config"])
    assert str(exit_info.value.code).startswith(f"error: --config {path}") and message in str(exit_info.value.code)


def test_help_lists_descriptions_choices_and_presets_without_importing_torch():
    code = ("import sys, contextlib, io\nfrom charlm.train import main\n"
            "buf = io.StringIO()\nwith contextlib.redirect_stdout(buf), contextlib.suppress(SystemExit):\n"
            "    main(['--help'])\nprint(buf.getvalue())\nprint('torch loaded:', 'torch' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout
    assert "torch loaded: False" in out
    assert "{auto,sdpa,triton,naive}" in out and "residual stream width" in out
    assert "tiny     n_layer=2" in out and "deep     n_layer=32, block_size=512" in out
    assert "--nproc_per_node 8 \\\n" in out  # the usage example's line continuation survives


def test_the_charlm_command_dispatches_to_each_tool(tiny_dataset, tmp_path):
    out = charlm("--help")
    assert out.returncode == 0 and all(cmd in out.stdout for cmd in ("data", "train", "eval", "export", "study"))
    assert "usage: python -m charlm.eval" in charlm("eval", "--help").stdout
    bad = charlm("trian")
    assert bad.returncode != 0 and "unknown command 'trian'" in bad.stderr


def test_resume_of_a_finished_run_says_so_and_extend_keeps_the_schedule(tiny_dataset, tmp_path, capsys):
    run = tmp_path / "run"
    train_main(run_args(tiny_dataset, run))
    before = rows(run)
    train_main(run_args(tiny_dataset, run, "--resume"))
    assert "is finished (step 6 of --max-iters 6): nothing to train" in capsys.readouterr().out
    assert rows(run) == before
    with pytest.raises(SystemExit, match="--max-iters 9: the run was planned for 6 steps.*--extend"):
        train_main(run_args(tiny_dataset, run, "--resume", iters=9))
    train_main(run_args(tiny_dataset, run, "--resume", "--extend", iters=9))
    after = rows(run)
    assert after[:6] == before and [r["step"] for r in after[6:]] == [7, 8, 9]
    cfg = Config.load(run / "config.json")
    floor = cfg.learning_rate * cfg.min_lr_ratio  # where the original cosine ends, at step 6
    assert all(r["lr"] == pytest.approx(floor) for r in after[6:])  # held there, not restarted
    assert cfg.lr_decay_iters == 6 and lr_at(5, cfg) == pytest.approx(before[-1]["lr"]) and before[-1]["lr"] > floor
    assert after[6]["resumed_from"] == 6


def test_curves_show_the_learning_rate_and_where_the_run_was_resumed(tiny_dataset, tmp_path, drawn, monkeypatch):
    from matplotlib.axes import Axes

    marks = []
    real = Axes.axvline
    monkeypatch.setattr(Axes, "axvline", lambda self, x, *a, **k: marks.append(x) or real(self, x, *a, **k))
    run = tmp_path / "run"
    train_main(run_args(tiny_dataset, run, "--max-iters", "3"))
    train_main(run_args(tiny_dataset, run, "--resume", "--extend", iters=6))
    logged = rows(run)
    lr_lines = [args for args in drawn["plot"] if list(args[1]) == [r["lr"] for r in logged]]
    assert lr_lines and list(lr_lines[-1][0]) == [r["step"] for r in logged]
    assert marks[-2:] == [3, 3]  # one dashed line on each panel


def test_stop_at_pauses_a_run_on_its_own_schedule_and_resume_finishes_it(tiny_dataset, tmp_path):
    straight, paused = tmp_path / "straight", tmp_path / "paused"
    train_main(run_args(tiny_dataset, straight))
    train_main(run_args(tiny_dataset, paused, "--stop-at", "3"))
    assert [r["step"] for r in rows(paused)] == [1, 2, 3] and (paused / "ckpt_00000003.pt").is_file()
    assert not (paused / "model.safetensors").exists()  # not the final weights yet
    train_main(run_args(tiny_dataset, paused, "--resume"))  # --stop-at is not remembered
    keys = ("step", "train_loss", "lr", "val_loss")
    assert [{k: r.get(k) for k in keys} for r in rows(paused)] == [{k: r.get(k) for k in keys} for r in rows(straight)]
    assert (paused / "model.safetensors").is_file()


@pytest.mark.parametrize("module", ["charlm.train", "charlm.experts.__main__", "charlm.study.__main__",
                                    "charlm.__main__"])
def test_the_commands_with_training_flags_answer_help_without_loading_torch(module):
    code = (f"import sys, contextlib, io\nfrom {module} import main\n"
            "with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.suppress(SystemExit):\n"
            "    main(['--help'])\n"
            "assert 'usage' in out.getvalue(), out.getvalue()\nprint('torch loaded:', 'torch' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert "torch loaded: False" in done.stdout, done.stdout + done.stderr


@pytest.mark.parametrize("command", ["data", "train", "eval", "sample", "categorize", "experts", "study", "export"])
def test_every_charlm_command_answers_help(command):
    done = charlm(command, "--help")
    assert done.returncode == 0 and done.stdout.startswith("usage: "), done.stderr


@pytest.mark.parametrize("flag, value", [("--warmup-iters", "1"), ("--lr-schedule", "wsd"), ("--min-lr-ratio", "0.5")])
def test_a_resume_refuses_to_reshape_its_lr_schedule(tiny_dataset, tmp_path, flag, value):
    run = tmp_path / "run"
    train_main(run_args(tiny_dataset, run, "--stop-at", "3"))
    with pytest.raises(SystemExit, match=f"keeps the shape of its LR schedule: drop {flag} {value}"):
        train_main(run_args(tiny_dataset, run, "--resume", flag, value))
    train_main(run_args(tiny_dataset, run, "--resume"))  # unchanged, it continues
    assert [r["step"] for r in rows(run)] == [1, 2, 3, 4, 5, 6]
