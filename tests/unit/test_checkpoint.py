import json

import pytest
import torch

from charlm.checkpoint import (
    CheckpointError,
    best_checkpoint,
    latest_checkpoint,
    load_checkpoint,
    save_best,
    save_checkpoint,
)


def state(value: float) -> dict:
    return {"model": {"w": torch.full((4,), value)}}


def test_keeps_the_newest_k_and_lists_them(tmp_path):
    for step in (10, 20, 30, 40):
        save_checkpoint(tmp_path, step, state(step), keep=2)
    assert sorted(p.name for p in tmp_path.glob("ckpt_*.pt")) == ["ckpt_00000030.pt", "ckpt_00000040.pt"]
    manifest = json.loads((tmp_path / "checkpoints.json").read_text())
    assert [e["step"] for e in manifest["checkpoints"]] == [30, 40]
    assert load_checkpoint(latest_checkpoint(tmp_path))["model"]["w"][0] == 40


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_corrupt_latest_falls_back_to_the_previous_with_a_warning(tmp_path, damage):
    save_checkpoint(tmp_path, 1, state(1.0))
    path = save_checkpoint(tmp_path, 2, state(2.0))
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        path.write_bytes(data[:-20] + bytes([data[-20] ^ 0xFF]) + data[-19:])
    else:
        path.unlink()
    with pytest.warns(UserWarning, match="missing or corrupt"):
        assert latest_checkpoint(tmp_path).name == "ckpt_00000001.pt"


def test_failed_write_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, 1, state(1.0))
    before = (tmp_path / "checkpoints.json").read_text()

    def disk_full(obj, f):
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(tmp_path, 2, state(2.0))
    assert (tmp_path / "checkpoints.json").read_text() == before
    assert [p.name for p in tmp_path.iterdir() if p.suffix in (".pt", ".tmp")] == ["ckpt_00000001.pt"]
    monkeypatch.undo()
    assert latest_checkpoint(tmp_path).name == "ckpt_00000001.pt"


def test_best_is_kept_apart_from_the_rotation(tmp_path):
    save_checkpoint(tmp_path, 1, state(1.0), keep=1)
    save_best(tmp_path, 1, state(1.0), val_bpc=2.5)
    save_checkpoint(tmp_path, 2, state(2.0), keep=1)
    assert load_checkpoint(best_checkpoint(tmp_path))["step"] == 1
    assert json.loads((tmp_path / "checkpoints.json").read_text())["best"]["val_bpc"] == 2.5


def test_no_checkpoint_and_incompatible_format(tmp_path):
    assert latest_checkpoint(tmp_path) is None and best_checkpoint(tmp_path) is None
    torch.save({"format": 999, "step": 0}, tmp_path / "old.pt")
    with pytest.raises(CheckpointError, match="format 999 is not supported"):
        load_checkpoint(tmp_path / "old.pt")
