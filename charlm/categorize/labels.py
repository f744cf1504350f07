"""Method `import`: an external labelling, a JSONL or CSV file of (split, start, category) rows, each label
holding from its start offset to the next label's."""
import csv
import json
from pathlib import Path

import numpy as np

from charlm.categorize.categories import CATEGORIES, NAMES
from charlm.data import DataError


def read_labels(path: Path, splits: dict[str, int]) -> dict[str, list[tuple[int, int]]]:
    """(start, category id) per split from a JSONL or CSV file of (split, start, category) rows, checked:
    known splits and names, offsets inside the split, no duplicates, a label at offset 0 of every split."""
    labels: dict[str, dict[int, int]] = {split: {} for split in splits}
    for where, row in read_rows(path):
        split, start, category = check_row(where, row, splits)
        if start in labels[split]:
            raise DataError(f"{where}: a second label for offset {start} of the {split} split")
        labels[split][start] = category
    for split, starts in labels.items():
        if 0 not in starts:
            raise DataError(f"{path}: no label at offset 0 of the {split} split: every token of a split needs a "
                            f"category, and a label holds from its start to the next label's")
    return {split: sorted(starts.items()) for split, starts in labels.items()}


def read_rows(path: Path) -> list[tuple[str, object]]:
    """(file:line, row) for each row of a .jsonl or .csv file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"--labels {path}: no such file")
    if path.suffix not in (".jsonl", ".csv"):
        raise DataError(f"--labels {path}: expected a .jsonl or .csv file of (split, start, category) rows")
    with open(path, newline="") as f:
        if path.suffix == ".csv":
            rows = list(enumerate(csv.DictReader(f), start=2))  # line 1 is the header
        else:
            rows = [(i, _json_row(path, i, line)) for i, line in enumerate(f, start=1) if line.strip()]
    return [(f"{path}:{line}", row) for line, row in rows]


def _json_row(path: Path, line: int, text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{line}: not valid JSON: {e}") from None


def check_row(where: str, row, splits: dict[str, int]) -> tuple[str, int, int]:
    """(split, start, category id) of one row, or an error naming its line and what is wrong."""
    if not isinstance(row, dict) or not {"split", "start", "category"} <= set(row):
        raise DataError(f"{where}: expected fields split, start and category, got {row!r}")
    split, category = row["split"], row["category"]
    if split not in splits:
        raise DataError(f"{where}: split {split!r} is not one of {', '.join(splits)}")
    if category not in CATEGORIES:
        raise DataError(f"{where}: category {category!r} is not one of: {', '.join(NAMES)}")
    try:
        start = int(row["start"])
    except (TypeError, ValueError):
        raise DataError(f"{where}: start {row['start']!r} is not an integer offset") from None
    if not 0 <= start < splits[split]:
        raise DataError(f"{where}: start {start} is outside the {split} split (0..{splits[split] - 1})")
    return split, start, NAMES.index(category)


def label_spans(labels: list[tuple[int, int]], n_tokens: int) -> np.ndarray:
    """Rows (start, length, category id): each label holds from its start to the next label's (or the end)."""
    starts = np.array([s for s, _ in labels], dtype=np.int64)
    lengths = np.diff(np.append(starts, n_tokens))
    return np.column_stack([starts, lengths, [c for _, c in labels]]).astype(np.int64)
