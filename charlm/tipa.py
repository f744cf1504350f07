"""TIPA targets: reverse positions of tokens inside words (DESIGN.md, "TIPA, made concrete").

A word is a maximal run of word tokens; with tokenization "bytes" the word bytes are ASCII letters and
digits and every byte >= 0x80 (so UTF-8 encoded letters stay inside words), with "unicode" the code points
that are letters or decimal digits by Unicode category (L*, Nd; not other numerals such as "½" or "²").
For the token at 0-based index i of a word of length L the reverse position is L - i (the last token of a
word has 1), clipped to ``tipa_max``; delimiters have 0. The end of the token array ends a word, so a word
that runs to the end of a split ends there.

Scope "window" (the report's literal mapping) replaces this with the distance to the end of the training
window: for target position j in 0..T-1 of a window of T targets the value is min(T - j, tipa_max).
"""
import unicodedata

import numpy as np

SCOPES = ("word", "window")


def _byte_word_table() -> np.ndarray:
    table = np.zeros(256, dtype=bool)
    for lo, hi in ((ord("0"), ord("9")), (ord("A"), ord("Z")), (ord("a"), ord("z")), (0x80, 0xFF)):
        table[lo:hi + 1] = True
    return table


BYTE_WORD = _byte_word_table()  # (256,) bool: which byte values are word bytes
BYTE_WORD.flags.writeable = False


def word_table(meta: dict) -> np.ndarray:
    """(vocab_size,) bool lookup table: which token ids are word tokens, for a dataset's meta.json."""
    if meta["tokenization"] == "bytes":
        return BYTE_WORD
    return np.array([_is_letter_or_digit(chr(cp)) for cp in meta["chars"]], dtype=bool)


def _is_letter_or_digit(char: str) -> bool:
    category = unicodedata.category(char)
    return category[0] == "L" or category == "Nd"


def reverse_positions(tokens, tipa_max: int = 16, word: np.ndarray | None = None) -> np.ndarray:
    """Word-scope reverse positions of a 1-D token array: uint8, same length (see the module docstring).

    ``word`` is a bool table over token ids (default: the bytes rule, ``BYTE_WORD``).
    """
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise ValueError(f"tokens must be 1-D, got shape {tokens.shape}")
    if not 1 <= tipa_max <= 255:
        raise ValueError(f"tipa_max must be in 1..255 (targets are uint8), got {tipa_max}")
    is_word = (BYTE_WORD if word is None else np.asarray(word, dtype=bool))[tokens]
    index = np.arange(len(tokens))
    # For every index, the first delimiter at or after it (len(tokens) if none): a suffix minimum.
    next_delimiter = np.minimum.accumulate(np.where(is_word, len(tokens), index)[::-1])[::-1]
    return np.minimum(next_delimiter - index, tipa_max).astype(np.uint8)


def window_positions(block_size: int, tipa_max: int = 16) -> np.ndarray:
    """Window-scope reverse positions of the T targets of a window: min(T - j, tipa_max), uint8."""
    return np.minimum(np.arange(block_size, 0, -1), tipa_max).astype(np.uint8)
