"""Sort a prepared dataset into the report's 16 topic subsets, stored as span lists over its token files.

    python -m charlm.categorize enwik8                     # embed if sentence-transformers is there, else keywords
    python -m charlm.categorize enwik8 --method keywords    # deterministic and dependency-free
    python -m charlm.categorize enwik8 --method embed --model ~/models/all-MiniLM-L6-v2
    python -m charlm.categorize enwik8 --method import --labels labels.jsonl
    python -m charlm.categorize enwik8 --method keywords --summary   # the table of an existing one, no work

Chunks. Each split's token file is cut on its own (a page that straddles a split boundary is cut there,
so the spans of a split partition it exactly): a chunk runs from the line holding `<page>` to the end of
the line holding `</page>`; the XML header and any other text between pages are chunks of their own;
chunks longer than --max-chunk tokens (64 KiB) are cut after their last newline that fits.

Methods. `keywords`: TF-IDF-style scores against a keyword lexicon per category (sublinear term
frequency times an inverse document frequency counted over the train split's chunks) plus a fixed bonus
per title word found in the category's lexicon or title words; ties go to the earlier category. `embed`:
zero-shot, the cosine similarity between a sentence embedding of the chunk (its title and opening text,
wiki markup stripped) and embeddings of the category descriptions. `import`: an external labelling, a
JSONL or CSV file of (split, start, category) rows, each label holding from its start offset to the next
label's. Text outside pages (XML scaffolding, no article) and chunks with no evidence at all go to the
fallback category, Culture and Society, the broadest of the 16. Splits without any page markup (a plain
text dataset) are classified chunk by chunk from their content.

Output, in DATA/DATASET/categories/<name>/ (name defaults to the method), written atomically:
spans_<split>.npy, int64 rows (start, length, category id) that partition the split in order, and
categories.json (method, the categories in order with their descriptions, and the tokens ("bytes") and
chunks each holds per split). No text is copied: training and evaluation read the spans over the one
prepared file (charlm.data.category_spans).
"""
import importlib

from charlm.categorize.categories import CATEGORIES, FALLBACK, NAMES, category_slug

# Reading order: categories (the 16 names), chunks (cutting a split), keywords + lexicon, embed and labels
# (the three methods), store (the files and their summary), pipeline (categorize), __main__ (the command).
# The entry points load numpy, tqdm and the classifiers' tables, so they are imported on first use only:
# charlm.eval and charlm.experts import category_slug from here without paying for them.
_ENTRY_POINTS = {"categorize": "pipeline", "pick_method": "pipeline", "METHODS": "pipeline", "summary": "store"}
__all__ = ["CATEGORIES", "FALLBACK", "NAMES", "category_slug", *_ENTRY_POINTS]


def __getattr__(name: str):
    if name in _ENTRY_POINTS:
        return getattr(importlib.import_module(f"{__name__}.{_ENTRY_POINTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
