"""Method `keywords`: TF-IDF-style scores of a chunk's words against each category's word list
(charlm.categorize.lexicon), plus a bonus per title word found there."""
import functools
import re
from collections import Counter
from typing import NamedTuple

import numpy as np

from charlm.categorize.categories import FALLBACK, NAMES
from charlm.categorize.lexicon import LEXICONS

TITLE_BONUS = 8.0  # score added per title word in a category's lexicon or title words
WORD = re.compile(r"[a-z]+")


class Tables(NamedTuple):
    vocab: dict[str, int]  # every stemmed lexicon word -> its index
    member: np.ndarray  # (V, C): 1 where word v is in category c's lexicon
    title_words: list[set[str]]  # per category: its lexicon and its title-only words


def stem(word: str) -> str:
    """A plural's singular, roughly: drop a final s (not ss) from words of four letters or more."""
    return word[:-1] if len(word) > 3 and word.endswith("s") and not word.endswith("ss") else word


@functools.cache
def tables() -> Tables:
    """The lexicons, stemmed and indexed; built on first use."""
    body = [{stem(w) for w in LEXICONS[name][0].split()} for name in NAMES]
    vocab = {w: i for i, w in enumerate(sorted(set().union(*body)))}
    member = np.zeros((len(vocab), len(NAMES)), dtype=np.float32)
    for c, words in enumerate(body):
        member[[vocab[w] for w in words], c] = 1.0
    titles = [words | {stem(w) for w in LEXICONS[name][1].split()} for name, words in zip(NAMES, body)]
    return Tables(vocab, member, titles)


def keyword_features(title: str, text: str) -> np.ndarray:
    """(V + C,): counts of each lexicon word in a chunk, then the number of its title words in each category's
    lexicon or title words."""
    vocab, _, title_words = tables()
    counts = np.zeros(len(vocab), dtype=np.float32)
    for word, n in Counter(WORD.findall(text.lower())).items():
        i = vocab.get(stem(word))
        if i is not None:
            counts[i] += n
    in_title = {stem(w) for w in WORD.findall(title.lower())}
    title_hits = [len(in_title & words) for words in title_words]
    return np.concatenate([counts, np.asarray(title_hits, dtype=np.float32)])


def keyword_predict(features: dict[str, list[np.ndarray]]) -> dict[str, np.ndarray]:
    """Category ids per split: argmax of TF-IDF scores plus title bonuses; no evidence -> FALLBACK."""
    vocab, member, _ = tables()
    v = len(vocab)
    stacked = {split: np.array(rows, dtype=np.float32).reshape(len(rows), v + len(NAMES))
               for split, rows in features.items()}
    train_counts = stacked["train"][:, :v]
    df = (train_counts > 0).sum(axis=0)
    idf = np.log((1 + len(train_counts)) / (1 + df)) + 1  # smoothed, as scikit-learn's TfidfVectorizer
    ids = {}
    for split, rows in stacked.items():
        counts, title_hits = rows[:, :v], rows[:, v:]
        tf = np.where(counts > 0, 1 + np.log(np.maximum(counts, 1)), 0)  # sublinear term frequency
        scores = (tf * idf) @ member + TITLE_BONUS * title_hits  # (N, C)
        best = scores.argmax(axis=1)  # ties: the earlier category
        ids[split] = np.where(scores.max(axis=1, initial=0) > 0, best, NAMES.index(FALLBACK))
    return ids
