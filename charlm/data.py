"""Prepare datasets: enwik8 or text8 (downloaded or from a local file) or any text file, into a dataset folder.

    python -m charlm.data enwik8                            # download, verify, write data/enwik8/
    python -m charlm.data enwik8 --from-file ~/enwik8.zip   # offline: a local enwik8 or enwik8.zip
    python -m charlm.data enwik8 --tokenization unicode     # the report's code-point vocabulary
    python -m charlm.data text8                             # Mahoney's text8: 27 symbols -> data/text8/
    python -m charlm.data text8 --from-file ~/text8.zip     # offline: a local text8 or text8.zip
    python -m charlm.data text notes.txt --name notes       # any UTF-8 or binary file

A dataset folder holds train.bin, val.bin, test.bin (raw tokens, no header: uint8 for `bytes`, uint16
for `unicode`) and meta.json. It is written under a temporary name and renamed when complete, so a
crash never leaves a half-written dataset; writers of one dataset take turns, and the next one removes
what a killed writer left. A prepared file is never rewritten in place: a run that memory-maps it keeps
reading it (truncating a mapped file would kill the reader with SIGBUS), so do not edit prepared files.
"""
import argparse
import hashlib
import http.client
import json
import re
import urllib.error
import urllib.request
import zipfile
import zlib
from pathlib import Path

import numpy as np

from charlm import cli
from charlm.console import progress
from charlm.errors import CharlmError
from charlm.io import (
    atomic_dir,
    atomic_write,
    atomic_write_text,
    check_replaceable_dir,
    exclusive_lock,
    lock_path,
    remove_stale_temporaries,
)

ENWIK8_URL = "http://mattmahoney.net/dc/enwik8.zip"
ENWIK8_BYTES = 100_000_000
ENWIK8_SHA256 = "2b49720ec4d78c3c9fabaee6e4179a5e997302b3a70029f30f2d582218c024a8"  # of the unzipped file
TEXT8_URL = "http://mattmahoney.net/dc/text8.zip"
TEXT8_BYTES = 100_000_000  # of the unzipped file
TEXT8_ALPHABET = b" abcdefghijklmnopqrstuvwxyz"
DOWNLOAD_TIMEOUT_S = 60  # per blocking read: a stalled connection fails instead of hanging
SPLIT_FRACTIONS = (0.9, 0.05, 0.05)  # for enwik8's and text8's 100M bytes: 90M / 5M / 5M, the standard split
SPLITS = ("train", "val", "test")
FORMAT = 1
TOKEN_DTYPES = {"bytes": "uint8", "unicode": "uint16"}  # tokenization -> token dtype
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")  # one folder name: no '/', not '.' or '..', not hidden


class DataError(CharlmError, ValueError):
    """A source file or dataset folder is not what was expected."""


def read_source(path: Path) -> bytes:
    """The bytes of a text file, or of the single member of a zip archive."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path} is a directory: expected a text file or a zip archive")
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    with open(path, "rb") as f:
        head = f.read(4)
    if head.startswith(b"PK"):
        try:
            with zipfile.ZipFile(path) as zf:
                members = [m for m in zf.infolist() if not m.is_dir()]
                if len(members) != 1:
                    raise DataError(f"{path}: expected a zip with one file, found {len(members)}")
                return zf.read(members[0])
        except (zipfile.BadZipFile, EOFError, zlib.error) as e:
            raise DataError(f"{path}: not a readable zip archive (truncated or corrupt?): {e}") from e
    if path.suffix == ".zip":
        raise DataError(f"{path}: named .zip but is not a zip archive")
    return path.read_bytes()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def download(url: str, dest: Path) -> Path:
    """Download url to dest with a progress bar; the file appears under its name only when complete."""

    def fetch(f) -> None:
        try:
            with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as resp:
                total = int(resp.headers.get("Content-Length") or 0) or None
                with progress(total=total, unit="B", unit_scale=True, desc=f"downloading {url}") as bar:
                    while chunk := resp.read(1 << 20):
                        f.write(chunk)
                        bar.update(len(chunk))
        except (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError) as e:
            # no network, a wrong URL, a refused, reset, stalled or truncated transfer (a full disk is not one)
            raise DataError(f"could not download {url}: {e!r}; with a local copy, pass --from-file PATH") from e

    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(lock_path(dest), f"downloading {dest}"):
        remove_stale_temporaries(dest.parent, dest.name)  # of a killed download
        atomic_write(dest, fetch)
    return dest


def encode(data: bytes, tokenization: str) -> tuple[np.ndarray, list[int] | None]:
    """Token ids and, for `unicode`, the code-point table (token id -> code point)."""
    if tokenization == "bytes":
        return np.frombuffer(data, dtype=np.uint8), None
    if tokenization != "unicode":
        raise DataError(f"tokenization must be bytes or unicode, got {tokenization!r}")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"unicode tokenization needs UTF-8 text: {e}; use --tokenization bytes") from e
    code_points = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    chars, ids = np.unique(code_points, return_inverse=True)
    if len(chars) > np.iinfo(np.uint16).max + 1:
        raise DataError(f"{len(chars)} distinct characters do not fit uint16 token ids")
    return ids.astype(np.uint16), chars.tolist()


def split_bounds(n: int) -> tuple[int, int]:
    """Ends of train and val: [0, a) train, [a, b) val, [b, n) test."""
    return int(n * SPLIT_FRACTIONS[0]), int(n * (SPLIT_FRACTIONS[0] + SPLIT_FRACTIONS[1]))


def prepare(data: bytes, out_dir: Path, tokenization: str = "bytes", source: dict | None = None) -> dict:
    """Tokenize, split and write a dataset folder atomically. Returns its meta."""
    tokens, chars = encode(data, tokenization)
    a, b = split_bounds(len(tokens))
    if min(a, b - a, len(tokens) - b) <= 0:
        raise DataError(f"{len(tokens)} tokens are too few to split into non-empty train/val/test")
    parts = {"train": tokens[:a], "val": tokens[a:b], "test": tokens[b:]}
    meta = {
        "format": FORMAT,
        "tokenization": tokenization,
        "dtype": str(tokens.dtype),
        "vocab_size": 256 if chars is None else len(chars),
        "chars": chars,
        "splits": {name: len(part) for name, part in parts.items()},
        "source": {"sha256": sha256(data), "bytes": len(data), **(source or {})},
    }
    with atomic_dir(out_dir) as tmp:
        for name, part in parts.items():
            part.tofile(tmp / f"{name}.bin")
        atomic_write_text(tmp / "meta.json", json.dumps(meta, indent=1) + "\n")
    return meta


def encode_text(text: str, meta: dict) -> list[int]:
    """Token ids of a prompt under a dataset's tokenization; unknown characters are an error."""
    if meta["tokenization"] == "bytes":
        return list(text.encode("utf-8"))
    index = {cp: i for i, cp in enumerate(meta["chars"])}
    unknown = sorted({ch for ch in text if ord(ch) not in index})
    if unknown:
        raise DataError(f"characters not in the dataset's vocabulary: {''.join(unknown)!r}")
    return [index[ord(ch)] for ch in text]


def decode_tokens(ids, meta: dict) -> str:
    """Text of a sequence of token ids (any array-like); invalid UTF-8 in byte mode decodes to U+FFFD."""
    ids = np.asarray(ids)
    if meta["tokenization"] == "bytes":
        return ids.astype(np.uint8).tobytes().decode("utf-8", errors="replace")
    return np.asarray(meta["chars"], dtype="<u4")[ids].tobytes().decode("utf-32-le")


def load_meta(data_dir: Path) -> dict:
    """A prepared dataset's meta.json, checked, and checked against its token files. The token files are
    memory-mapped by readers: they must not be modified while a run reads them (a truncated mapped file
    kills the reader with SIGBUS); charlm.data only ever replaces the whole folder."""
    data_dir = Path(data_dir)
    meta_path = data_dir / "meta.json"
    if not meta_path.is_file():
        raise DataError(f"no prepared dataset at {data_dir}: prepare it with `{prepare_command(data_dir)}`")
    try:
        meta = json.loads(meta_path.read_bytes())
    except ValueError as e:  # not JSON, or not UTF-8
        raise DataError(f"{meta_path}: expected the JSON that charlm.data writes, got unreadable text ({e}); "
                        f"prepare it again with `{prepare_command(data_dir)}`") from e
    check_meta(meta, meta_path)
    itemsize = np.dtype(meta["dtype"]).itemsize
    for split, n in meta["splits"].items():
        path = data_dir / f"{split}.bin"
        size = path.stat().st_size if path.is_file() else None
        if size != n * itemsize:
            raise DataError(f"{path}: expected {n * itemsize} bytes ({n} tokens), found "
                            f"{'no file' if size is None else size}; "
                            f"prepare it again with `{prepare_command(data_dir)}`")
    return meta


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def check_meta(meta, path: Path) -> None:
    """What charlm relies on in a meta.json: a DataError names the file, what was expected and what it holds."""
    def expect(ok: bool, message: str) -> None:
        if not ok:
            raise DataError(f"{path}: {message}")

    expect(isinstance(meta, dict), f"expected a JSON object, got a {type(meta).__name__}")
    keys = ("format", "tokenization", "dtype", "vocab_size", "splits", "source")
    missing = [k for k in keys if k not in meta]
    expect(not missing, f"expected the keys {', '.join(keys)}; missing {', '.join(missing)}")
    kinds = (meta["format"], meta["tokenization"], meta["dtype"])
    expect(_is_int(meta["format"]) and kinds in [(FORMAT, t, d) for t, d in TOKEN_DTYPES.items()],
           f"expected format {FORMAT} with tokenization/dtype bytes/uint8 or unicode/uint16, got "
           f"format={kinds[0]!r}, tokenization={kinds[1]!r}, dtype={kinds[2]!r}")
    vocab, chars = meta["vocab_size"], meta.get("chars")
    if meta["tokenization"] == "bytes":
        expect(_is_int(vocab) and vocab == 256, f"bytes tokenization has vocab_size 256, got {vocab!r}")
    else:
        expect(_is_int(vocab) and 1 <= vocab <= 1 << 16, f"expected vocab_size in 1..65536, got {vocab!r}")
        listed = isinstance(chars, list) and all(_is_int(c) and 0 <= c <= 0x10FFFF for c in chars)
        got = f"{len(chars)} entries" if isinstance(chars, list) else repr(chars)
        expect(listed and len(chars) == vocab, f"expected chars to list vocab_size = {vocab} code points "
                                               f"(ints in 0..0x10FFFF), got {got}")
    splits = meta["splits"]
    expect(isinstance(splits, dict) and splits and set(splits) <= set(SPLITS),
           f"expected splits to map some of {', '.join(SPLITS)} to token counts, got {splits!r}")
    for split, n in splits.items():
        expect(_is_int(n) and n >= 0, f"expected a token count >= 0 for split {split!r}, got {n!r}")
    expect(isinstance(meta["source"], dict), f"expected source to be an object, got {meta['source']!r}")


def split_tokens(data_dir: Path, split: str, meta: dict) -> np.ndarray:
    """A split's tokens, memory-mapped read-only: the file must not be modified while it is mapped (see
    load_meta)."""
    return np.memmap(Path(data_dir) / f"{split}.bin", dtype=meta["dtype"], mode="r")


def dataset_fingerprint(meta: dict) -> str:
    """A prepared dataset's identity: the hash of its meta.json, which holds its source's sha256, its
    tokenization and split sizes. A run records it, and refuses to resume on other data."""
    return hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()


def with_dataset(cfg):
    """A charlm.config.Config with its dataset's vocab size, and the dataset's meta; errors name the
    preparing command, or the field that does not fit the dataset."""
    meta = load_meta(cfg.dataset_dir)
    if cfg.model.vocab_size and cfg.model.vocab_size != meta["vocab_size"]:
        raise DataError(f"vocab_size {cfg.model.vocab_size} does not match dataset {cfg.dataset_dir} "
                        f"(vocab {meta['vocab_size']})")
    for split, n in meta["splits"].items():
        if split != "test" and n < cfg.model.block_size + 1:
            raise DataError(f"block_size {cfg.model.block_size} is longer than the {split} split of "
                            f"{cfg.dataset_dir} ({n} tokens)")
    return cfg.replace(vocab_size=meta["vocab_size"]), meta


def read_categories(data_dir: Path, name: str) -> dict:
    """categories/<name>/categories.json of a dataset (charlm.categorize writes it); a missing one names
    the command that makes it."""
    path = Path(data_dir) / "categories" / name / "categories.json"
    if not path.is_file():
        root = "" if Path(data_dir).parent == Path("data") else f" --data-root {Path(data_dir).parent}"
        raise DataError(f"no categorisation {name!r} at {path.parent}: run `python -m charlm.categorize "
                        f"{Path(data_dir).name}{root} --method {name}`")
    return json.loads(path.read_text())


def categorisation_sha256(data_dir: Path, name: str) -> str:
    """One hash of a categorisation's files (categories.json and the span lists): changes if it is redone
    with another model, lexicon or labelling."""
    read_categories(data_dir, name)  # a missing categorisation names its command
    folder = Path(data_dir) / "categories" / name
    digest = hashlib.sha256()
    for path in [folder / "categories.json", *sorted(folder.glob("spans_*.npy"))]:
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def category_names(data_dir: Path, categories: str) -> list[str]:
    """The categories of one of the dataset's categorisations, in its order (a missing one names its command)."""
    return [c["name"] for c in read_categories(data_dir, categories)["categories"]]


def category_spans(data_dir: Path, category: str, split: str) -> np.ndarray:
    """Rows (start, length, category id) of one topic subset of a split; category is "<method>/<name>"."""
    method, _, name = category.partition("/")
    names = category_names(data_dir, method)
    if name not in names:
        raise DataError(f"category {name!r} is not one of {method}'s: {', '.join(names)}")
    spans = np.load(Path(data_dir) / "categories" / method / f"spans_{split}.npy")
    return spans[spans[:, 2] == names.index(name)]


def prepare_command(data_dir: Path) -> str:
    name = Path(data_dir).name
    if name == "enwik8":
        return "python -m charlm.data enwik8"
    if name == "enwik8-unicode":
        return "python -m charlm.data enwik8 --tokenization unicode"
    if name == "text8":
        return "python -m charlm.data text8"
    return f"python -m charlm.data text PATH --name {name}"


def is_prepared(out_dir: Path, tokenization: str, expected_sha256: str | None) -> bool:
    try:
        meta = load_meta(out_dir)
    except DataError:
        return False
    return meta["tokenization"] == tokenization and expected_sha256 in (None, meta["source"].get("sha256"))


def dataset_dir(data_root: Path, name: str) -> Path:
    """data_root/name, checked before any work: name is one folder name (nothing is written outside
    data_root), and what is there is a dataset folder or nothing (a user's file or symlink is not replaced)."""
    if not NAME.fullmatch(name):
        raise DataError(f"invalid --name {name!r}: expected a folder name of at most 100 letters, digits, '.', "
                        f"'_' or '-', starting with a letter or digit")
    data_root = Path(data_root)
    if data_root.exists() and not data_root.is_dir():
        raise DataError(f"--data-root {data_root} is a file: expected a folder (or nothing, to create)")
    check_replaceable_dir(data_root / name)
    return data_root / name


def prepare_enwik8(data_root: Path, tokenization: str = "bytes", from_file: Path | None = None,
                   url: str = ENWIK8_URL, name: str | None = None) -> Path:
    out_dir = dataset_dir(data_root, name or ("enwik8" if tokenization == "bytes" else "enwik8-unicode"))
    if is_prepared(out_dir, tokenization, ENWIK8_SHA256):
        print(f"{out_dir} is already prepared; nothing to do")
        return out_dir

    def check(data: bytes, path: Path) -> None:
        if len(data) != ENWIK8_BYTES or sha256(data) != ENWIK8_SHA256:
            raise DataError(f"{path}: not enwik8: expected {ENWIK8_BYTES} bytes with sha256 {ENWIK8_SHA256}, "
                            f"got {len(data)} bytes with sha256 {sha256(data)}")

    return _prepare_benchmark("enwik8", out_dir, tokenization, from_file, url, check)


def check_text8(data: bytes, path: Path) -> None:
    """text8 is TEXT8_BYTES bytes of lower-case letters and spaces. No published hash to check against:
    the size and the alphabet are what is verified."""
    if len(data) != TEXT8_BYTES:
        raise DataError(f"{path}: not text8: expected {TEXT8_BYTES} bytes, got {len(data)}")
    other = set(data) - set(TEXT8_ALPHABET)
    if other:
        raise DataError(f"{path}: not text8: expected only a-z and space, found {bytes(sorted(other))[:20]!r}")


def prepare_text8(data_root: Path, from_file: Path | None = None, url: str = TEXT8_URL,
                  name: str | None = None) -> Path:
    """Mahoney's text8: its 27 symbols as the vocabulary (one token per character), split 90M/5M/5M."""
    out_dir = dataset_dir(data_root, name or "text8")
    if is_prepared(out_dir, "unicode", None) and load_meta(out_dir)["source"].get("name") == "text8":
        print(f"{out_dir} is already prepared; nothing to do")
        return out_dir
    return _prepare_benchmark("text8", out_dir, "unicode", from_file, url, check_text8)


def _prepare_benchmark(name: str, out_dir: Path, tokenization: str, from_file: Path | None, url: str,
                       check) -> Path:
    """Download (unless from_file) and read a benchmark's file, check(data, path) it and prepare it."""
    downloaded = from_file is None
    if downloaded:
        from_file = out_dir.parent / "downloads" / f"{name}.zip"
        if not from_file.is_file():
            download(url, from_file)
    try:
        data = read_source(from_file)
        check(data, from_file)
    except DataError:
        if downloaded:  # a bad download must not be reused by the next call (with a corrected --url, say)
            from_file.unlink(missing_ok=True)
        raise
    meta = prepare(data, out_dir, tokenization, {"name": name, "path": str(from_file)})
    print(f"wrote {out_dir}: {meta['splits']} tokens, vocab {meta['vocab_size']}")
    return out_dir


def prepare_text(path: Path, name: str, data_root: Path, tokenization: str = "bytes") -> Path:
    out_dir = dataset_dir(data_root, name)
    data = read_source(path)
    if is_prepared(out_dir, tokenization, sha256(data)):
        print(f"{out_dir} is already prepared from this file; nothing to do")
        return out_dir
    meta = prepare(data, out_dir, tokenization, {"name": name, "path": str(path)})
    print(f"wrote {out_dir}: {meta['splits']} tokens, vocab {meta['vocab_size']}")
    return out_dir


def main(argv=None) -> None:
    cli.run(lambda: _main(argv))


def _main(argv) -> None:
    parser = argparse.ArgumentParser(prog="python -m charlm.data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    e8 = sub.add_parser("enwik8", help="download (or read) enwik8, verify it and prepare it")
    e8.add_argument("--from-file", type=Path, help="a local enwik8 or enwik8.zip instead of downloading")
    e8.add_argument("--url", default=ENWIK8_URL, help="where to download enwik8.zip from")
    e8.add_argument("--name", help="dataset folder name (default enwik8, or enwik8-unicode)")
    t8 = sub.add_parser("text8", help="download (or read) text8, verify its size and alphabet and prepare it")
    t8.add_argument("--from-file", type=Path, help="a local text8 or text8.zip instead of downloading")
    t8.add_argument("--url", default=TEXT8_URL, help="where to download text8.zip from")
    t8.add_argument("--name", help="dataset folder name (default text8)")
    t8.add_argument("--data-root", type=Path, default=Path("data"))
    text = sub.add_parser("text", help="prepare any UTF-8 or binary file")
    text.add_argument("path", type=Path)
    text.add_argument("--name", required=True, help="dataset folder name under --data-root")
    for p in (e8, text):
        p.add_argument("--tokenization", choices=["bytes", "unicode"], default="bytes")
        p.add_argument("--data-root", type=Path, default=Path("data"))
    args = parser.parse_args(argv)
    if args.command == "enwik8":
        out = prepare_enwik8(args.data_root, args.tokenization, args.from_file, args.url, args.name)
    elif args.command == "text8":
        out = prepare_text8(args.data_root, args.from_file, args.url, args.name)
    else:
        out = prepare_text(args.path, args.name, args.data_root, args.tokenization)
    root = "" if out.parent == Path("data") else f" --data-root {out.parent}"
    print(f"next: python -m charlm.train --dataset {out.name}{root} --variant base")


if __name__ == "__main__":
    main()
