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
import json

from charlm import cli
from charlm.config import (
    ACTIONS,
    PRESETS,
    VARIANTS,
    Config,
    add_config_args,
    config_from_args,
    given_flags,
    read_config_file,
)


def variants_and_presets() -> str:
    """--help's epilog: what each variant and preset sets (a preset's values replace the defaults shown)."""
    lines = ["variants (combine with commas; applied in order):"]
    lines += [f"  {name:<8} {_overrides(v) or 'the defaults'}" for name, v in VARIANTS.items()]
    lines += ["presets (applied after the variants, before the flags):"]
    lines += [f"  {name:<8} {_overrides(p)}" for name, p in PRESETS.items()]
    return "\n".join(lines)


def _overrides(values: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in values.items())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m charlm.train", description=__doc__, epilog=variants_and_presets(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", metavar="FILE", help="a TOML or JSON file of config fields (a run's own "
                        "config.json too); flags given on the command line override it")
    parser.add_argument("--print-config", action="store_true",
                        help="print the fully resolved config (variants, preset, file, flags) as JSON and exit")
    add_config_args(parser)
    return parser


def parse_config(argv=None) -> tuple[Config, bool]:
    """The run's config, and whether only to print it."""
    args = build_parser().parse_args(argv)
    file_values = read_config_file(args.config) if args.config else {}
    cfg = config_from_args(args, file_values)
    saved = cfg.run_dir / "config.json"
    if cfg.resume and saved.is_file():
        if args.config:
            raise ValueError(f"--config starts a run from a file; --resume continues {saved}: give one of them")
        # The folder resumed is the one named now, whatever out_dir its config.json holds (a copied run).
        cfg = resumed_config(Config.load(saved), {**given_flags(args), "out_dir": str(cfg.run_dir)})
    return cfg, args.print_config


# Fields that place the LR schedule's turns: changed on a resume, the LR would jump. (--max-iters has --extend.)
SCHEDULE_SHAPE = ("warmup_iters", "lr_schedule", "decay_fraction", "min_lr_ratio", "lr_decay_iters")


def resumed_config(saved: Config, given: dict) -> Config:
    """A resumed run keeps its saved config; only the flags given now override it. A changed --max-iters
    needs --extend, which holds the LR at its final value past the original end."""
    changed = [f"--{f} {given[f]} (the run has {getattr(saved, f)!r})" for f in ("variant", "preset")
               if f in given and set(given[f].split(",")) != set(getattr(saved, f).split(","))]
    if changed:  # their fields were resolved when the run began; a new name alone would mislabel it
        raise ValueError(f"a resumed run keeps its variant and preset: drop {', '.join(changed)}")
    reshaped = [f"--{f.replace('_', '-')} {given[f]} (the run has {getattr(saved, f)!r})" for f in SCHEDULE_SHAPE
                if f in given and given[f] != getattr(saved, f)]
    if reshaped:  # the LR would jump at the resume: a different run, not a continued one
        raise ValueError(f"a resumed run keeps the shape of its LR schedule: drop {', '.join(reshaped)}, or start "
                         f"a new run (--init-from a checkpoint of this one)")
    new_iters = given.get("max_iters", saved.max_iters)
    if given.get("extend"):
        if new_iters <= saved.max_iters:
            raise ValueError(f"--extend needs a --max-iters beyond the run's {saved.max_iters}, got {new_iters}")
        given = {**given, "lr_decay_iters": saved.lr_decay_iters or saved.max_iters}
    elif new_iters != saved.max_iters:
        raise ValueError(f"--max-iters {new_iters}: the run was planned for {saved.max_iters} steps, and its LR "
                         f"schedule with it; pass --extend to train it to {new_iters} with the LR held at its "
                         f"final value, or drop --max-iters")
    actions = {name: getattr(Config(), name) for name in ACTIONS}  # what the run was asked to do then
    cfg = saved.replace(**{**actions, **given})
    cfg.validate()
    return cfg


def _main(argv=None) -> None:
    cfg, print_only = parse_config(argv)
    if print_only:
        print(json.dumps(cfg.to_dict(), indent=2))
        return
    # Imported here: --help and argument errors should not wait for torch and triton to load.
    from charlm.job import train
    from charlm.memory import plan_only
    from charlm.runtime import distributed

    if cfg.plan_only:
        print(plan_only(cfg).describe())
        return
    with distributed(cfg.device) as ctx:
        if cfg.resume and not cfg.run_dir.exists():
            ctx.print(f"--resume: {cfg.run_dir} holds no run yet; starting it at step 0")
        train(cfg, ctx)


def main(argv=None) -> None:
    cli.run(lambda: _main(argv))


if __name__ == "__main__":
    main()
