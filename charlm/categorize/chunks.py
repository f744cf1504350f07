"""Cutting a split's tokens into chunks: pages, the text between pages, and pieces of pages too long
(the rules are in the package's docstring, under Chunks)."""
import html
import itertools
import re
from dataclasses import dataclass

import numpy as np

from charlm.data import DataError, decode_tokens, encode_text

MAX_CHUNK = 64 * 1024  # tokens per chunk at most; longer pages are cut at line boundaries
TITLE = re.compile(r"<title>(.*?)</title>")
TITLE_SEARCH = 1024  # tokens: a page's <title> comes within its first lines


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


def find_all(tokens: np.ndarray, text: str, meta: dict, haystack: bytes) -> np.ndarray:
    """Token offsets where `text` occurs in a token array (haystack: the array's bytes, copied once)."""
    ids = token_ids(text, meta)
    if ids is None:
        return np.zeros(0, dtype=np.int64)
    needle, itemsize = ids.astype(tokens.dtype).tobytes(), tokens.dtype.itemsize
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
    haystack = tokens.tobytes()
    opens, closes = find_all(tokens, "<page>", meta, haystack), find_all(tokens, "</page>", meta, haystack)
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


def text_of(tokens: np.ndarray, start: int, length: int, meta: dict) -> str:
    """The text of tokens[start:start + length]."""
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
