"""Categorising a dataset: pick the method, chunk every split, classify its page chunks (or read an external
labelling), check that the spans partition each split, and store them."""
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from charlm.categorize import embed, keywords
from charlm.categorize.categories import FALLBACK, NAMES
from charlm.categorize.chunks import MAX_CHUNK, chunk_split, text_of
from charlm.categorize.labels import label_spans, read_labels
from charlm.categorize.store import check_partition, write_categories
from charlm.console import progress
from charlm.data import SPLITS, DataError, load_meta, split_tokens

METHODS = ("keywords", "embed", "import")


@dataclass(frozen=True)
class Method:
    featurize: Callable[[str, str], object]  # (title, text) of one page chunk -> its features
    predict: Callable[[dict[str, list]], dict[str, np.ndarray]]  # features per split -> category ids


def pick_method(method: str) -> str:
    """`auto`: embed when sentence-transformers and the packaged all-MiniLM-L6-v2 are installed (no download
    needed), else keywords."""
    if method != "auto":
        return method
    return "embed" if embed.available() else "keywords"


def classify_chunks(data_dir: Path, meta: dict, method: Method, max_chunk: int) -> dict[str, np.ndarray]:
    """Spans (start, length, category id) per split: chunk every split, featurize page chunks, predict."""
    chunks, features = {}, {}
    for split in SPLITS:
        tokens = split_tokens(data_dir, split, meta)
        chunks[split] = chunk_split(tokens, meta, max_chunk)
        features[split] = [method.featurize(c.title, text_of(tokens, c.start, c.length, meta))
                           for c in progress(chunks[split], desc=f"reading {split} chunks", unit="chunk")
                           if c.in_page]
    predicted = method.predict(features)
    spans = {}
    for split in SPLITS:
        ids = np.full(len(chunks[split]), NAMES.index(FALLBACK), dtype=np.int64)
        ids[[c.in_page for c in chunks[split]]] = predicted[split]
        spans[split] = np.array([(c.start, c.length, i) for c, i in zip(chunks[split], ids)], dtype=np.int64)
    return spans


def categorize(data_dir: Path, method: str = "auto", labels: Path | None = None, name: str | None = None,
               model: str | None = None, max_chunk: int = MAX_CHUNK) -> Path:
    """Sort every token of every split into one of CATEGORIES; write categories/<name>/. Returns that folder."""
    data_dir = Path(data_dir)
    meta = load_meta(data_dir)
    method = pick_method(method)
    if method not in METHODS:
        raise DataError(f"method must be auto, keywords, embed or import, got {method!r}")
    if (labels is not None) != (method == "import"):
        raise DataError("--labels FILE goes with --method import, and only with it")
    details = {}
    if method == "import":
        parsed = read_labels(labels, meta["splits"])  # every check before any chunking
        spans = {split: label_spans(parsed[split], meta["splits"][split]) for split in SPLITS}
        details["labels"] = str(labels)
    else:
        if method == "keywords":
            chosen = Method(keywords.keyword_features, keywords.keyword_predict)
        else:
            embedder, details["model"] = embed.load_embedder(model)
            chosen = Method(embed.embed_features, lambda features: embed.embed_predict(embedder, features))
        details["max_chunk"] = max_chunk
        spans = classify_chunks(data_dir, meta, chosen, max_chunk)
    for split in SPLITS:
        check_partition(spans[split], meta["splits"][split], f"{data_dir} {split}")
    return write_categories(data_dir, name or method, meta, method, details, spans)
