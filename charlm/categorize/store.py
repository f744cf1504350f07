"""A categorisation on disk, DATA/DATASET/categories/<name>/: spans_<split>.npy (int64 rows (start, length,
category id) that partition the split in order) and categories.json; and the table that summarises one."""
import json
from pathlib import Path

import numpy as np

from charlm.categorize.categories import CATEGORIES, FALLBACK, NAMES
from charlm.categorize.chunks import page_title
from charlm.data import SPLITS, load_meta, read_categories, split_tokens
from charlm.io import atomic_dir, atomic_write_text

FORMAT = 1


def check_partition(spans: np.ndarray, n_tokens: int, what: str) -> None:
    """Rows (start, length, id) in order, each non-empty, covering [0, n_tokens) exactly once."""
    ends = spans[:, 0] + spans[:, 1]
    ok = (len(spans) > 0 and spans[0, 0] == 0 and ends[-1] == n_tokens and (spans[:, 1] > 0).all()
          and (spans[1:, 0] == ends[:-1]).all() and ((spans[:, 2] >= 0) & (spans[:, 2] < len(NAMES))).all())
    if not ok:
        raise AssertionError(f"{what}: spans do not partition the split of {n_tokens} tokens")


def write_categories(data_dir: Path, name: str, meta: dict, method: str, details: dict,
                     spans: dict[str, np.ndarray]) -> Path:
    """Write categories/<name>/ atomically: the spans of every split, and categories.json (the method, its
    details, and the tokens ("bytes") and chunks each category holds per split). Returns the folder."""
    counts = {split: (np.bincount(s[:, 2], weights=s[:, 1], minlength=len(NAMES)).astype(int),
                      np.bincount(s[:, 2], minlength=len(NAMES))) for split, s in spans.items()}
    index = {
        "format": FORMAT, "method": method, **details, "fallback": FALLBACK,
        "dataset": data_dir.name, "source_sha256": meta["source"]["sha256"], "splits": meta["splits"],
        "categories": [{"name": n, "description": CATEGORIES[n],
                        "bytes": {split: int(counts[split][0][i]) for split in SPLITS},  # tokens: bytes, or chars
                        "chunks": {split: int(counts[split][1][i]) for split in SPLITS}}
                       for i, n in enumerate(NAMES)],
    }
    folder = data_dir / "categories" / name
    with atomic_dir(folder) as tmp:
        for split, rows in spans.items():
            np.save(tmp / f"spans_{split}.npy", rows)
        atomic_write_text(tmp / "categories.json", json.dumps(index, indent=1) + "\n")
    return folder


def example_titles(tokens: np.ndarray, spans: np.ndarray, meta: dict, k: int = 3) -> list[str]:
    """The first k distinct page titles among the spans."""
    titles = []
    for start, length in spans[:, :2].tolist():
        title = page_title(tokens, start, length, meta)
        if title and title not in titles:
            titles.append(title)
            if len(titles) == k:
                break
    return titles


def summary(data_dir: Path, name: str) -> str:
    """A table of tokens and chunks per category and split, with example titles from train."""
    data_dir = Path(data_dir)
    index, meta = read_categories(data_dir, name), load_meta(data_dir)
    unit = "bytes" if meta["tokenization"] == "bytes" else "chars"
    train = split_tokens(data_dir, "train", meta)
    train_spans = np.load(data_dir / "categories" / name / "spans_train.npy")
    header = f"{'category':<26}" + "".join(f"{split + ' ' + unit:>16}{'chunks':>8}" for split in SPLITS)
    lines = [f"categorisation {name!r} of {data_dir} (method {index['method']})", header + "  examples (train)"]
    for i, c in enumerate(index["categories"]):
        cells = "".join(f"{c['bytes'][s]:>16,}{c['chunks'][s]:>8,}" for s in SPLITS)
        examples = "; ".join(example_titles(train, train_spans[train_spans[:, 2] == i], meta))
        lines.append(f"{c['name']:<26}{cells}  {examples[:70]}")
    totals = "".join(f"{sum(c['bytes'][s] for c in index['categories']):>16,}"
                     f"{sum(c['chunks'][s] for c in index['categories']):>8,}" for s in SPLITS)
    lines.append(f"{'total':<26}{totals}")
    return "\n".join(lines)
