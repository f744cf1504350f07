"""Hostile input to `python -m charlm.data` and charlm.io, 46 cases: each ends in correct work or in one
line `error: ...` naming the flag or file and a non-zero exit, and nothing outside the data root changes.

- dataset names that leave the data root or are not one folder name (9: 8 for `text`, 1 for `enwik8`);
- a file or symlink where the dataset folder goes (4 kinds), a file as --data-root (1), and atomic_dir
  given a file or a symlink (2): refused before any work, the user's file neither renamed nor deleted;
- temporaries of killed writes (6): stale dataset and download temporaries removed by the next run (2),
  the temporaries of other names kept (in the same case), a writer that waits instead of deleting the
  temporary of the one writing (1), 4 concurrent writer processes ending with one whole dataset (1), a lock
  held elsewhere named by pid and host (1), a stale lock file of a killed holder (1);
- a symlink planted at a lock file's name (1), and remove_stale_temporaries on a symlink named like a
  temporary (1);
- a full disk (ENOSPC) in atomic_write, atomic_dir and through the CLI, and a file where a parent folder
  should be (4): errors name the target;
- malformed meta.json (15 kinds), a malformed meta.json under a dataset being prepared again (1), a folder
  given as the input text (1);
- a prepared file never rewritten in place: a reader's memory map keeps the old tokens (1).
"""
import errno
import json
import os
import socket
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

from charlm import data, io
from charlm.data import DataError, load_meta, prepare
from charlm.io import LockedError, WriteError, atomic_dir, atomic_write, exclusive_lock, remove_stale_temporaries
from corpora import make_corpus


def snapshot(folder: Path) -> dict:
    """Every entry under folder (links not followed): its kind and its content or link target."""
    entries = {}
    for p in sorted(folder.rglob("*")):
        kind = "link" if p.is_symlink() else "dir" if p.is_dir() else "file"
        entries[str(p.relative_to(folder))] = (kind, os.readlink(p) if kind == "link" else
                                               p.read_bytes() if kind == "file" else None)
    return entries


def cli(*argv) -> str:
    """Run charlm.data's CLI and return its error line; it must exit with one."""
    with pytest.raises(SystemExit) as exit_:
        data.main([str(a) for a in argv])
    message = str(exit_.value.code)
    assert message.startswith("error: ") and "\n" not in message and "Traceback" not in message
    return message


@pytest.fixture
def source(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_bytes(make_corpus(3000))
    return path


# ----------------------------------------------------------------------------------------------------
# 1. Names that would write outside the data root

@pytest.mark.parametrize("name", ["../../escaped", "..", ".", "a/b", "ABSOLUTE", ".hidden", "", "x" * 101])
def test_unsafe_name_is_refused_and_nothing_is_written(tmp_path, source, name):
    root = tmp_path / "a" / "b" / "data"
    root.mkdir(parents=True)
    name = str(tmp_path / "abs") if name == "ABSOLUTE" else name
    before = snapshot(tmp_path)
    assert "invalid --name" in cli("text", source, "--name", name, "--data-root", root)
    assert snapshot(tmp_path) == before


def test_unsafe_enwik8_name_is_refused(tmp_path, source):
    root = tmp_path / "data"
    assert "invalid --name '../up'" in cli("enwik8", "--from-file", source, "--name", "../up", "--data-root", root)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


# ----------------------------------------------------------------------------------------------------
# 2. What is at the dataset's place is not a folder

@pytest.mark.parametrize("kind", ["file", "link_to_dataset", "link_to_file", "dangling_link"])
def test_file_or_symlink_at_the_dataset_place_is_left_alone(tmp_path, source, kind):
    root, elsewhere = tmp_path / "data", tmp_path / "elsewhere"
    root.mkdir()
    prepare(make_corpus(2000), elsewhere / "ds", "bytes")
    (elsewhere / "user.txt").write_text("the user's file\n")
    target = root / "ds"
    if kind == "file":
        target.write_text("the user's notes\n")
    else:
        target.symlink_to({"link_to_dataset": elsewhere / "ds", "link_to_file": elsewhere / "user.txt",
                           "dangling_link": elsewhere / "missing"}[kind])
    before = snapshot(tmp_path)
    message = cli("text", source, "--name", "ds", "--data-root", root)
    assert f"could not write {target}: it is {'not a folder' if kind == 'file' else 'a symlink'}" in message
    assert snapshot(tmp_path) == before  # nothing renamed aside, written through the link, or left behind


def test_file_as_data_root_is_refused(tmp_path, source):
    (tmp_path / "data").write_text("not a folder\n")
    assert f"--data-root {tmp_path / 'data'} is a file" in cli("text", source, "--name", "x", "--data-root",
                                                              tmp_path / "data")
    assert (tmp_path / "data").read_text() == "not a folder\n"


@pytest.mark.parametrize("kind", ["file", "link"])
def test_atomic_dir_refuses_to_replace_a_file_or_symlink_before_its_block_runs(tmp_path, kind):
    (tmp_path / "real").mkdir()
    target = tmp_path / "out"
    target.write_text("mine\n") if kind == "file" else target.symlink_to(tmp_path / "real")
    before, entered = snapshot(tmp_path), []
    with pytest.raises(WriteError, match=f"could not write {target}: it is"):
        with atomic_dir(target) as tmp:
            entered.append(tmp)
    assert entered == [] and snapshot(tmp_path) == before


# ----------------------------------------------------------------------------------------------------
# 3. Temporaries of killed writes, and concurrent writers

def test_stale_temporaries_are_removed_by_the_next_write_and_others_kept(tmp_path, source):
    root = tmp_path / "data"
    stale_dir, stale_file = root / ".ds.k1lled9x.tmp", root / ".ds.q7abc_12.tmp"
    kept = [root / ".ds.v2.a1b2c3d4.tmp", root / "ds.tmp", root / ".ds.k1lled9x.old", root / ".dsx.abc.tmp"]
    stale_dir.mkdir(parents=True)
    (stale_dir / "train.bin").write_bytes(b"x" * 1000)
    stale_file.write_bytes(b"half a file")
    for p in kept:
        p.write_text("someone else's\n")
    data.main(["text", str(source), "--name", "ds", "--data-root", str(root)])
    assert not stale_dir.exists() and not stale_file.exists()
    assert sorted(p.name for p in root.iterdir()) == sorted(["ds", *(p.name for p in kept)])
    assert load_meta(root / "ds")["source"]["sha256"] == data.sha256(source.read_bytes())


def test_stale_download_temporary_is_removed(tmp_path, monkeypatch):
    content = make_corpus(4000)
    monkeypatch.setattr(data, "ENWIK8_BYTES", len(content))
    monkeypatch.setattr(data, "ENWIK8_SHA256", data.sha256(content))
    with zipfile.ZipFile(tmp_path / "enwik8.zip", "w") as zf:
        zf.writestr("enwik8", content)
    downloads = tmp_path / "data" / "downloads"
    downloads.mkdir(parents=True)
    (downloads / ".enwik8.zip.abcd1234.tmp").write_bytes(b"a killed download")
    data.prepare_enwik8(tmp_path / "data", url=(tmp_path / "enwik8.zip").as_uri())
    assert [p.name for p in downloads.iterdir()] == ["enwik8.zip"]


def test_a_second_writer_waits_and_leaves_the_first_ones_temporary(tmp_path, capsys):
    target, first, second = tmp_path / "ds", make_corpus(2000), make_corpus(2500)
    errors = []

    def write_second():
        try:
            prepare(second, target, "bytes")
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    with atomic_dir(target) as tmp:
        (tmp / "train.bin").write_bytes(first)
        writer = threading.Thread(target=write_second)
        writer.start()
        waited, deadline = "", time.monotonic() + 10
        while "waiting for writing" not in waited and time.monotonic() < deadline:
            time.sleep(0.02)
            waited += capsys.readouterr().err
        assert f"pid {os.getpid()} on {socket.gethostname()}" in waited
        assert tmp.exists() and (tmp / "train.bin").read_bytes() == first and writer.is_alive()
    writer.join(10)
    assert not writer.is_alive() and errors == []
    assert load_meta(target)["source"]["sha256"] == data.sha256(second)
    assert [p.name for p in tmp_path.iterdir()] == ["ds"]


def test_four_concurrent_writer_processes_end_with_one_whole_dataset(tmp_path):
    sources = []
    for i in range(4):
        sources.append(tmp_path / f"src{i}.txt")
        sources[-1].write_bytes(make_corpus(300_000 + 1000 * i))
    root = tmp_path / "data"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}
    procs = [subprocess.Popen([sys.executable, "-m", "charlm.data", "text", str(s), "--name", "ds",
                               "--data-root", str(root)], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for s in sources]
    assert [(p.wait(60), p.stderr.read().count("Traceback")) for p in procs] == [(0, 0)] * 4
    meta = load_meta(root / "ds")
    written = [s for s in sources if data.sha256(s.read_bytes()) == meta["source"]["sha256"]]
    assert len(written) == 1 and meta["source"]["path"] == str(written[0])
    tokens = np.concatenate([np.fromfile(root / "ds" / f"{s}.bin", np.uint8) for s in data.SPLITS])
    assert tokens.tobytes() == written[0].read_bytes()
    assert [p.name for p in root.iterdir()] == ["ds"]


def test_a_held_lock_is_named_by_pid_and_host_and_released(tmp_path):
    lock = tmp_path / ".run.lock"
    with exclusive_lock(lock, "run folder x", blocking=False):
        with pytest.raises(LockedError, match=f"run folder x is in use by pid {os.getpid()} on "
                                              f"{socket.gethostname()} \\(lock file {lock}\\)"):
            with exclusive_lock(lock, "run folder x", blocking=False):
                pass
    assert not lock.exists()
    with exclusive_lock(lock, "run folder x", blocking=False):  # free again
        assert lock.read_text() == f"pid {os.getpid()} on {socket.gethostname()}\n"


def test_the_lock_file_of_a_killed_holder_does_not_block(tmp_path):
    lock = tmp_path / ".ds.lock"
    lock.write_text("pid 999999 on gone\n")  # the kernel released its flock with the process
    with exclusive_lock(lock, "writing ds", blocking=False):
        assert lock.read_text() == f"pid {os.getpid()} on {socket.gethostname()}\n"


def test_a_symlink_at_the_lock_name_is_refused_and_its_target_untouched(tmp_path, source):
    root = tmp_path / "data"
    root.mkdir()
    (tmp_path / "precious.txt").write_text("do not truncate\n")
    (root / ".ds.lock").symlink_to(tmp_path / "precious.txt")
    before = snapshot(tmp_path)
    assert (f"could not write {root / '.ds.lock'}: it is a symlink, expected a lock file"
            in cli("text", source, "--name", "ds", "--data-root", root))
    assert snapshot(tmp_path) == before


def test_remove_stale_temporaries_unlinks_a_symlink_and_not_what_it_points_to(tmp_path):
    (tmp_path / "keep").mkdir()
    (tmp_path / "keep" / "f").write_text("kept\n")
    (tmp_path / ".ds.abcd1234.tmp").symlink_to(tmp_path / "keep")
    assert remove_stale_temporaries(tmp_path, "ds") == [tmp_path / ".ds.abcd1234.tmp"]
    assert (tmp_path / "keep" / "f").read_text() == "kept\n"
    assert remove_stale_temporaries(tmp_path / "missing", "ds") == []


# ----------------------------------------------------------------------------------------------------
# 4. A full disk, and a file where a folder should be

def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_atomic_write_on_a_full_disk_names_the_file_and_keeps_the_old_one(tmp_path, monkeypatch):
    path = tmp_path / "result.json"
    path.write_text("old\n")
    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(WriteError) as err:
        io.atomic_write_text(path, "new\n")
    assert str(err.value) == f"could not write {path}: No space left on device"
    assert err.value.errno == errno.ENOSPC
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"] and path.read_text() == "old\n"


def test_atomic_dir_on_a_full_disk_names_the_folder(tmp_path, monkeypatch):
    with pytest.raises(WriteError, match=f"^could not write {tmp_path / 'out'}: No space left on device$"):
        with atomic_dir(tmp_path / "out") as tmp:
            io.atomic_write_text(tmp / "a.json", "{}")
            monkeypatch.setattr(os, "fsync", no_space)
    assert list(tmp_path.iterdir()) == []


def test_full_disk_through_the_cli_is_one_line_naming_the_dataset(tmp_path, source, monkeypatch):
    monkeypatch.setattr(os, "fsync", no_space)
    root = tmp_path / "data"
    assert cli("text", source, "--name", "ds", "--data-root", root) == \
        f"error: could not write {root / 'ds'}: No space left on device"
    assert list(root.iterdir()) == []


def test_a_file_as_parent_folder_names_the_target_and_the_file(tmp_path):
    (tmp_path / "plain").write_text("a file\n")
    with pytest.raises(WriteError, match=f"could not write {tmp_path / 'plain' / 'x.json'}: "):
        atomic_write(tmp_path / "plain" / "x.json", lambda f: f.write(b"{}"))
    assert (tmp_path / "plain").read_text() == "a file\n"


# ----------------------------------------------------------------------------------------------------
# 5. Malformed meta.json, and a folder as input

META_CASES = {
    "not JSON": (b"{not json", "expected the JSON that charlm.data writes"),
    "not UTF-8": (b"\xff\xfe{}", "expected the JSON that charlm.data writes"),
    "a list": ([1, 2], "expected a JSON object, got a list"),
    "missing keys": ({"format": 1}, "missing tokenization, dtype, vocab_size, splits, source"),
    "format as text": ({"format": "1"}, "expected format 1 with tokenization/dtype"),
    "unknown dtype": ({"dtype": "float32"}, "expected format 1 with tokenization/dtype"),
    "unknown tokenization": ({"tokenization": ["words"]}, "expected format 1 with tokenization/dtype"),
    "vocab as text": ({"vocab_size": "256"}, "bytes tokenization has vocab_size 256, got '256'"),
    "unicode vocab too large": ({"tokenization": "unicode", "dtype": "uint16", "vocab_size": 70000},
                                "expected vocab_size in 1..65536"),
    "unicode chars missing": ({"tokenization": "unicode", "dtype": "uint16", "vocab_size": 3, "chars": None},
                              "expected chars to list vocab_size = 3 code points (ints in 0..0x10FFFF), got None"),
    "splits a list": ({"splits": [1, 2, 3]}, "expected splits to map some of train, val, test"),
    "split name a path": ({"splits": {"../../x": 1}}, "expected splits to map some of train, val, test"),
    "negative split": ({"splits": {"train": -5}}, "expected a token count >= 0 for split 'train', got -5"),
    "split count a bool": ({"splits": {"train": True}}, "expected a token count >= 0 for split 'train'"),
    "source not an object": ({"source": "enwik8"}, "expected source to be an object"),
}


@pytest.mark.parametrize("case", META_CASES)
def test_malformed_meta_names_the_file_and_the_expectation(tmp_path, case):
    prepare(make_corpus(2000), tmp_path / "ds", "bytes")
    meta_path = tmp_path / "ds" / "meta.json"
    change, expected = META_CASES[case]
    if isinstance(change, bytes):
        meta_path.write_bytes(change)
    elif isinstance(change, dict) and case != "missing keys":
        meta_path.write_text(json.dumps({**json.loads(meta_path.read_text()), **change}))
    else:
        meta_path.write_text(json.dumps(change))
    with pytest.raises(DataError) as err:
        load_meta(tmp_path / "ds")
    assert str(err.value).startswith(f"{meta_path}: ") and expected in str(err.value)


def test_a_dataset_with_malformed_meta_is_prepared_again(tmp_path, source):
    root = tmp_path / "data"
    prepare(make_corpus(2000), root / "ds", "bytes")
    (root / "ds" / "meta.json").write_text("[]")
    data.main(["text", str(source), "--name", "ds", "--data-root", str(root)])
    assert load_meta(root / "ds")["source"]["sha256"] == data.sha256(source.read_bytes())


def test_a_folder_as_input_text_says_it_is_a_folder(tmp_path):
    (tmp_path / "corpus").mkdir()
    message = cli("text", tmp_path / "corpus", "--name", "x", "--data-root", tmp_path / "data")
    assert message == f"error: {tmp_path / 'corpus'} is a directory: expected a text file or a zip archive"
    assert not (tmp_path / "data").exists()


# ----------------------------------------------------------------------------------------------------
# 6. Prepared files are replaced, never rewritten in place

def test_preparing_again_leaves_a_mapped_token_file_intact(tmp_path):
    old, new = make_corpus(4000), make_corpus(6000)[::-1]
    meta = prepare(old, tmp_path / "ds", "bytes")
    mapped = data.split_tokens(tmp_path / "ds", "train", meta)
    inode = (tmp_path / "ds" / "train.bin").stat().st_ino
    prepare(new, tmp_path / "ds", "bytes")
    assert (tmp_path / "ds" / "train.bin").stat().st_ino != inode
    assert mapped.tobytes() == old[: meta["splits"]["train"]]
