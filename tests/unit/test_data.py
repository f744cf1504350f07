import hashlib
import os
import zipfile

import numpy as np
import pytest

from charlm import data
from charlm.data import DataError, decode_tokens, encode_text, load_meta, prepare, prepare_enwik8, prepare_text
from corpora import make_corpus


def read_split(d, split, meta):
    return np.fromfile(d / f"{split}.bin", dtype=meta["dtype"])


@pytest.mark.parametrize("n", [1000, 12345])
def test_bytes_round_trip_and_split_sizes(tmp_path, n):
    text = make_corpus(n)
    meta = prepare(text, tmp_path / "ds", "bytes")
    a, b = int(n * 0.9), int(n * 0.95)
    assert meta["splits"] == {"train": a, "val": b - a, "test": n - b}
    joined = np.concatenate([read_split(tmp_path / "ds", s, meta) for s in ("train", "val", "test")])
    assert joined.tobytes() == text
    assert meta["vocab_size"] == 256 and meta["dtype"] == "uint8"
    assert meta["source"]["sha256"] == hashlib.sha256(text).hexdigest()


def test_enwik8_sizes_give_the_standard_split():
    assert data.split_bounds(100_000_000) == (90_000_000, 95_000_000)


def test_unicode_round_trip(tmp_path):
    text = make_corpus(5000).decode("utf-8", errors="ignore")
    meta = prepare(text.encode(), tmp_path / "u", "unicode")
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == len(set(text))
    ids = np.concatenate([read_split(tmp_path / "u", s, meta) for s in ("train", "val", "test")])
    assert decode_tokens(ids, meta) == text
    assert sum(meta["splits"].values()) == len(text)
    assert encode_text("naïve", meta) == [meta["chars"].index(ord(c)) for c in "naïve"]
    with pytest.raises(DataError, match="not in the dataset's vocabulary"):
        encode_text("€", meta)


def test_unicode_rejects_binary(tmp_path):
    with pytest.raises(DataError, match="UTF-8"):
        prepare(b"\xff\xfe abc" * 10, tmp_path / "b", "unicode")


def test_prepare_text_is_idempotent(tmp_path, capsys):
    src = tmp_path / "notes.txt"
    src.write_bytes(make_corpus(3000))
    out = prepare_text(src, "notes", tmp_path / "data")
    mtime = (out / "train.bin").stat().st_mtime_ns
    prepare_text(src, "notes", tmp_path / "data")
    assert "nothing to do" in capsys.readouterr().out
    assert (out / "train.bin").stat().st_mtime_ns == mtime


def test_crash_leaves_no_half_written_dataset(tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(data, "atomic_write_text", boom)
    with pytest.raises(OSError, match="disk full"):
        prepare(make_corpus(2000), tmp_path / "ds", "bytes")
    assert list(tmp_path.iterdir()) == []


def zipped(archive, member: str, content: bytes):
    """archive, a zip holding `content` as its one file `member`, as the benchmarks are distributed."""
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(member, content)
    return archive


@pytest.fixture
def fake_enwik8(monkeypatch, tmp_path):
    """A small stand-in for enwik8: the module's expected size and checksum are pointed at it."""
    content = make_corpus(4000)
    monkeypatch.setattr(data, "ENWIK8_BYTES", len(content))
    monkeypatch.setattr(data, "ENWIK8_SHA256", hashlib.sha256(content).hexdigest())
    return content, zipped(tmp_path / "enwik8.zip", "enwik8", content)


def test_enwik8_from_zip_then_noop(fake_enwik8, tmp_path, capsys):
    content, archive = fake_enwik8
    out = prepare_enwik8(tmp_path / "data", from_file=archive)
    meta = load_meta(out)
    assert out.name == "enwik8" and meta["source"]["sha256"] == hashlib.sha256(content).hexdigest()
    prepare_enwik8(tmp_path / "data", from_file=archive)
    assert "nothing to do" in capsys.readouterr().out


def test_enwik8_download_from_url(fake_enwik8, tmp_path):
    _, archive = fake_enwik8
    out = prepare_enwik8(tmp_path / "data", url=archive.as_uri())
    assert load_meta(out)["splits"]["train"] == int(0.9 * data.ENWIK8_BYTES)
    assert (tmp_path / "data" / "downloads" / "enwik8.zip").read_bytes() == archive.read_bytes()


def test_failed_download_is_a_clear_error(tmp_path):
    url = (tmp_path / "nowhere" / "enwik8.zip").as_uri()
    with pytest.raises(DataError, match=f"could not download {url}.*--from-file"):
        prepare_enwik8(tmp_path / "data", url=url)
    assert list((tmp_path / "data" / "downloads").iterdir()) == []  # no partial file left


def test_bad_download_is_not_reused(fake_enwik8, tmp_path):
    _, archive = fake_enwik8
    wrong = tmp_path / "wrong.zip"
    wrong.write_bytes(b"<html>moved</html>")
    with pytest.raises(DataError, match="not a zip archive"):
        prepare_enwik8(tmp_path / "data", url=wrong.as_uri())
    out = prepare_enwik8(tmp_path / "data", url=archive.as_uri())  # the corrected URL is fetched anew
    assert load_meta(out)["splits"]["train"] == int(0.9 * data.ENWIK8_BYTES)


@pytest.fixture
def fake_text8(monkeypatch, tmp_path):
    """A small stand-in for text8 (its alphabet, every symbol present): the expected size is pointed at it."""
    words = np.random.default_rng(0).choice(list(b"abcdefghijklmnopqrstuvwxyz "), 6000).astype(np.uint8)
    content = b" anarchism originated " + bytes(words) + b" abcdefghijklmnopqrstuvwxyz"
    monkeypatch.setattr(data, "TEXT8_BYTES", len(content))
    return content, zipped(tmp_path / "text8.zip", "text8", content)


def test_text8_has_27_symbols_one_token_per_character(fake_text8, tmp_path, capsys):
    content, archive = fake_text8
    out = data.prepare_text8(tmp_path / "data", from_file=archive)
    meta = load_meta(out)
    assert out.name == "text8" and meta["vocab_size"] == 27 and meta["source"]["name"] == "text8"
    a, b = int(len(content) * 0.9), int(len(content) * 0.95)
    assert meta["splits"] == {"train": a, "val": b - a, "test": len(content) - b}
    val = read_split(out, "val", meta)
    assert decode_tokens(val, meta) == content[a:b].decode()
    data.prepare_text8(tmp_path / "data", from_file=archive)
    assert "nothing to do" in capsys.readouterr().out


def test_text8_from_an_unzipped_file_and_by_download(fake_text8, tmp_path):
    content, archive = fake_text8
    plain = tmp_path / "text8"
    plain.write_bytes(content)
    assert load_meta(data.prepare_text8(tmp_path / "a", from_file=plain))["source"]["bytes"] == len(content)
    out = data.prepare_text8(tmp_path / "b", url=archive.as_uri())
    assert (tmp_path / "b" / "downloads" / "text8.zip").read_bytes() == archive.read_bytes()
    meta = load_meta(out)
    assert (read_split(out, "test", meta) == read_split(tmp_path / "a" / "text8", "test", meta)).all()


def test_text8_checks_size_and_alphabet(fake_text8, tmp_path):
    content, _ = fake_text8
    short, upper = tmp_path / "short", tmp_path / "upper"
    short.write_bytes(content[:-1])
    upper.write_bytes(content[:-1] + b"Z")
    with pytest.raises(DataError, match=f"{short}: not text8: expected {len(content)} bytes, got {len(content) - 1}"):
        data.prepare_text8(tmp_path / "data", from_file=short)
    with pytest.raises(DataError, match=f"{upper}: not text8: expected only a-z and space, found b'Z'"):
        data.prepare_text8(tmp_path / "data", from_file=upper)
    assert not (tmp_path / "data" / "text8").exists()


def test_text8_command_line(fake_text8, tmp_path):
    _, archive = fake_text8
    data.main(["text8", "--from-file", str(archive), "--data-root", str(tmp_path / "data")])
    assert load_meta(tmp_path / "data" / "text8")["vocab_size"] == 27


def test_replacing_a_dataset_keeps_the_old_one_until_the_new_one_is_in_place(tmp_path, monkeypatch):
    prepare(make_corpus(2000), tmp_path / "ds", "bytes")
    old_train = (tmp_path / "ds" / "train.bin").read_bytes()
    real_replace, folder_renames = os.replace, []

    def crash_on_second_folder_rename(src, dst):  # old folder aside, then new folder in: crash in between
        if os.path.isdir(src):
            folder_renames.append(src)
            if len(folder_renames) == 2:
                raise OSError("power cut")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_second_folder_rename)
    with pytest.raises(OSError, match="power cut"):
        prepare(make_corpus(3000), tmp_path / "ds", "bytes")
    assert (tmp_path / "ds" / "train.bin").read_bytes() == old_train  # the old dataset, whole, in its place
    assert [d.name for d in tmp_path.iterdir()] == ["ds"]  # no leftovers


def test_enwik8_wrong_checksum_names_file_and_expectation(fake_enwik8, tmp_path):
    bad = tmp_path / "enwik8"
    bad.write_bytes(b"x" * data.ENWIK8_BYTES)
    with pytest.raises(DataError) as err:
        prepare_enwik8(tmp_path / "data", from_file=bad)
    assert str(bad) in str(err.value) and data.ENWIK8_SHA256 in str(err.value)
    assert not (tmp_path / "data" / "enwik8").exists()


def test_truncated_zip_is_a_clear_error(fake_enwik8, tmp_path):
    _, archive = fake_enwik8
    cut = tmp_path / "cut.zip"
    cut.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    with pytest.raises(DataError, match="not a readable zip"):
        prepare_enwik8(tmp_path / "data", from_file=cut)


def test_non_zip_named_zip_is_a_clear_error(tmp_path):
    fake = tmp_path / "enwik8.zip"
    fake.write_bytes(b"<html>not found</html>")
    with pytest.raises(DataError, match="not a zip archive"):
        prepare_enwik8(tmp_path / "data", from_file=fake)


def test_missing_dataset_names_the_command(tmp_path):
    with pytest.raises(DataError, match="python -m charlm.data enwik8"):
        load_meta(tmp_path / "enwik8")


def test_truncated_token_file_is_detected(tmp_path):
    prepare(make_corpus(3000), tmp_path / "ds", "bytes")
    with open(tmp_path / "ds" / "val.bin", "r+b") as f:
        f.truncate(10)
    with pytest.raises(DataError, match="val.bin: expected"):
        load_meta(tmp_path / "ds")


def test_cli_reports_errors_without_traceback(tmp_path):
    with pytest.raises(SystemExit, match="no such file"):
        data.main(["text", str(tmp_path / "missing.txt"), "--name", "x", "--data-root", str(tmp_path)])
