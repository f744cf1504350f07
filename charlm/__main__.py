"""The `charlm` command: one entry point for every tool, as `charlm <command> [flags]`.

    charlm data enwik8                  # = python -m charlm.data enwik8
    charlm train --variant deep         # = python -m charlm.train --variant deep
    charlm eval runs/deep               # ... and sample, categorize, experts, study, export

Each command's flags are its module's (`charlm train --help`); the `python -m charlm.X` forms keep working.
"""
import importlib
import sys

COMMANDS = {
    "data": ("charlm.data", "prepare a dataset (enwik8, or any text file)"),
    "train": ("charlm.train", "train a model"),
    "eval": ("charlm.eval", "bits per character of a run on the full val and test splits"),
    "sample": ("charlm.sample", "generate text from a run"),
    "categorize": ("charlm.categorize.__main__", "cut a dataset into the report's 16 topic subsets"),
    "experts": ("charlm.experts.__main__", "the expert scheme: pre-train, fine-tune per topic, post-train"),
    "study": ("charlm.study.__main__", "conditions at equal compute, several seeds, with intervals"),
    "export": ("charlm.export.command", "write a run's model for sharing (Hugging Face transformers)"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {what}" for name, (_, what) in COMMANDS.items()]
    return "usage: charlm <command> [flags]   (charlm <command> --help for its flags)\n\ncommands:\n" + "\n".join(lines)


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return
    if argv[0] not in COMMANDS:
        sys.exit(f"error: unknown command {argv[0]!r}\n{usage()}")
    importlib.import_module(COMMANDS[argv[0]][0]).main(argv[1:])


if __name__ == "__main__":
    main()
