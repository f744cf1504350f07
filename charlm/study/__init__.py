"""Reproduce the report's results table at equal compute, with seeds and error bars.

    python -m charlm.study --dataset enwik8 --conditions base,rope,tipa,deep,deep+rope --budget 1.3e16 \
        --seeds 3 --out-dir studies/report                       # every run in sequence, then the table
    python -m charlm.study ... --plan-only                       # each condition's steps; nothing is trained
    python -m charlm.study ... --only deep+rope:1                # one run (one job per GPU); the same command
                                                                 # without --only then collects the table
    python -m charlm.study ... --budget 4e7 --budget-unit tokens # equal tokens instead of equal FLOPs
    python -m charlm.study ... --tokenization unicode             # the report's setting (data/enwik8-unicode)
    python -m charlm.study ... --preset tiny --batch-size 8       # any training flag applies to every run
    python -m charlm.study ... --conditions base,experts:base     # the expert scheme's row (charlm.experts)

A condition is a `--variant` combination with `+` between variants (`deep+rope`); conditions are
separated by commas. Every run is an ordinary charlm.train run in `OUT_DIR/runs/<condition>-s<seed>/`,
trained in sequence (data-parallel over the ranks under torchrun); running the command again skips
finished runs (result.json written) and resumes interrupted ones. Runs keep one rolling checkpoint
(`--keep-checkpoints 1` unless given) besides the trainer's best.pt. OUT_DIR/study.json records the
settings: a re-run with another budget or config is refused rather than mixed with finished runs.

Equal compute. The budget is the same for every run: training FLOPs (default) or tokens. A condition's
FLOPs per token come from `GPT.flops_per_token` (6 (N - V C) + 6 * L * T * C, charlm.model), its tokens per step
are batch_size * block_size, and it trains for floor(budget / (FLOPs per token * tokens per step)) steps,
so that no run exceeds the budget: DEEP gets fewer steps than BASE. The LR schedule of each run decays
over its own steps (warm-up stays warmup_iters steps), so every condition gets a complete schedule.
Note that a preset is applied after the variants: with `--preset tiny`, deep has tiny's depth and context.

`experts:VARIANT` runs charlm.experts' scheme (pre-training, one fine-tune per topic subset in order,
post-training of the fine-tune with the best val BPC) in the run folder, its steps split by
`--experts-split` (default 0.5,0.4,0.1 of the run's steps); the row is the post-trained model, and its
steps count everything spent to produce it: pre-training, every fine-tune (all are needed to choose one)
and post-training. The scheme's own equal-compute control also runs (see the run's report.md).

What is reported. val and test BPC are full passes over each split (charlm.eval's default protocol,
recorded in results.md: every character scored once), next-character loss only: TIPA's auxiliary loss is a
training signal and never counts. The evaluated checkpoint is chosen without looking at test: a run's
`best.pt` (the trainer keeps the weights of its best val estimate), or the final checkpoint if best.pt
is missing or corrupt; an experts run's final post-training checkpoint. Test BPC is the headline: val
took part in the selection. results.png plots the trainer's val estimates against training FLOPs.

The statistics (mean ± standard deviation over seeds, Welch t-intervals of the differences) are
described at the end of --help and in results.md.
"""

# Reading order: plan (conditions, budget, steps, the dataset), run (study.json, training and evaluating each
# run, result.json), stats (over seeds), report (results.md and results.png), __main__ (the command).

# The study's settings, shared by the command's flags and its plan.
EXPERTS_CATEGORIES = "keywords"  # --experts-categories: the dataset's categorisation (charlm.categorize)
EXPERTS_SPLIT = (0.5, 0.4, 0.1)  # --experts-split: shares of an experts run's steps for pre, fine and post
# Config fields the study sets itself, so they are not flags of it.
STUDY_OWNED = ("variant", "max_iters", "seed", "out_dir", "resume", "init_from", "plan_only", "category")
# Flags that may change between invocations of one study without changing its results.
RUNTIME_FIELDS = ("device", "compile", "compile_mode", "attn", "rope_impl", "max_memory_gb", "micro_batch_size",
                  "checkpoint_layers", "log_interval", "keep_checkpoints", "data_root")
