"""Train a character-level GPT on a prepared dataset.

One GPU, or the CPU when there is none (same code, PyTorch reference ops):
    python -m charlm.train --variant base
    python -m charlm.train --variant deep,rope --n-embd 768 --n-head 12
    python -m charlm.train --variant base --preset tiny --max-iters 50      # CPU smoke run, about a minute
    python -m charlm.train --variant deep --plan-only --max-memory-gb 40    # the memory plan, no GPU needed
    python -m charlm.train --out-dir runs/deep --resume                     # continue where it stopped

Several GPUs on one node, or several nodes (torchrun's usual rendezvous flags):
    torchrun --standalone --nproc_per_node 8 -m charlm.train --variant deep
    torchrun --nnodes 2 --node_rank R --rdzv_backend c10d --rdzv_endpoint HOST:29500 --nproc_per_node 8 \\
        -m charlm.train --variant deep
`--batch-size` is the global batch whatever the number of ranks.
"""
import argparse

from charlm import cli
from charlm.config import Config, add_config_args, config_from_args, given_flags


def parse_config(argv=None) -> Config:
    parser = argparse.ArgumentParser(prog="python -m charlm.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    args = parser.parse_args(argv)
    cfg = config_from_args(args)
    saved = cfg.run_dir / "config.json"
    if cfg.resume and saved.is_file():
        return resumed_config(Config.load(saved), given_flags(args))
    return cfg


def resumed_config(saved: Config, given: dict) -> Config:
    """A resumed run keeps its saved config; only the flags given now override it."""
    changed = [f"--{f} {given[f]} (the run has {getattr(saved, f)!r})" for f in ("variant", "preset")
               if f in given and set(given[f].split(",")) != set(getattr(saved, f).split(","))]
    if changed:  # their fields were resolved when the run began; a new name alone would mislabel it
        raise ValueError(f"a resumed run keeps its variant and preset: drop {', '.join(changed)}")
    cfg = saved.replace(**given)
    cfg.validate()
    return cfg


def _main(argv=None) -> None:
    cfg = parse_config(argv)
    # Imported here: --help and argument errors should not wait for torch and triton to load.
    from charlm.runtime import distributed
    from charlm.trainer import plan_only, train

    if cfg.plan_only:
        print(plan_only(cfg).describe())
        return
    with distributed(cfg.device) as ctx:
        train(cfg, ctx)


def main(argv=None) -> None:
    cli.run(lambda: _main(argv))


if __name__ == "__main__":
    main()
