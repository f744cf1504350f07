"""Command lines of tiny CPU training runs on the `tiny_dataset` fixture, for the integration tests."""


def train_args(tiny_dataset, run, *extra, iters: int = 4, eval_interval: int = 2, **flags) -> list[str]:
    """charlm.train's argv for a tiny run of `iters` steps into folder `run`; `flags` (name=value, as
    --name value) and `extra` come last, so they win."""
    root, name = tiny_dataset
    args = ["--preset", "tiny", "--dataset", name, "--data-root", str(root), "--out-dir", str(run), "--device",
            "cpu", "--batch-size", "4", "--max-iters", str(iters), "--eval-interval", str(eval_interval),
            "--eval-iters", "1", "--log-interval", "1"]
    for flag, value in flags.items():
        args += ["--" + flag.replace("_", "-"), str(value)]
    return args + list(extra)
