"""One configuration dataclass for model and training, the report's conditions as presets, and its CLI.

Resolution order: dataclass defaults, then each `--variant` in the order given, then `--preset`, then
explicit flags. Every field is a flag (`n_embd` -> `--n-embd`); the resolved config is saved with the run.
"""
import argparse
import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path

# The report's conditions (DESIGN.md). Variants combine: --variant deep,rope,tipa.
VARIANTS: dict[str, dict] = {
    "base": {},
    "rope": {"pos_embedding": "rope"},
    "tipa": {"tipa": True},
    "deep": {"n_layer": 32, "block_size": 512},
}

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")

# Size presets, applied after the variants: `tiny` is for CPU smoke runs and tests.
PRESETS: dict[str, dict] = {
    "tiny": {"n_layer": 2, "n_head": 2, "n_embd": 64, "block_size": 64, "dropout": 0.0,
             "learning_rate": 3e-3, "warmup_iters": 10, "eval_interval": 25, "eval_iters": 8},
}


@dataclass
class Config:
    # data
    dataset: str = "enwik8"  # prepared dataset: a folder under data_root (see charlm.data)
    data_root: str = "data"  # where prepared datasets live
    category: str = ""  # train on one topic subset only: "<method>/<name>" (see charlm.categorize)
    # model (nanoGPT's names)
    n_layer: int = 16  # transformer blocks
    n_head: int = 8  # attention heads; must divide n_embd
    n_embd: int = 512  # residual stream width
    block_size: int = 256  # context length in tokens
    vocab_size: int = 0  # 0: taken from the dataset's meta.json
    dropout: float = 0.1  # residual and MLP dropout (attention-probability dropout is off)
    bias: bool = True  # biases in Linear and LayerNorm layers
    pos_embedding: str = "learned"  # learned | rope
    rope_theta: float = 10000.0  # RoPE base; half-split convention
    tipa: bool = False  # auxiliary reverse-position head (DESIGN.md, "TIPA, made concrete")
    tipa_lambda: float = 0.1  # weight of the TIPA cross-entropy in the training loss
    tipa_max: int = 16  # R: reverse positions are clipped to R; the head has R + 1 classes
    tipa_scope: str = "word"  # word | window
    # implementation choices (auto: the fastest correct one the device offers)
    attn: str = "auto"  # auto | sdpa | triton | naive
    rope_impl: str = "auto"  # auto | torch | triton | fused (into --attn triton)
    compile: bool | None = None  # torch.compile the model; None: on for CUDA
    compile_mode: str = "default"  # torch.compile mode: default | reduce-overhead (CUDA graphs) | max-autotune
    dtype: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | float32 | bfloat16
    checkpoint_layers: int = -1  # blocks under activation checkpointing; -1: the memory planner decides
    # optimisation
    batch_size: int = 64  # global batch in sequences (all ranks, all micro-steps)
    micro_batch_size: int = 0  # sequences per forward pass per rank; 0: the memory planner decides
    max_iters: int = 5000  # optimizer steps
    learning_rate: float = 6e-4  # peak LR
    min_lr_ratio: float = 0.1  # cosine decay ends at learning_rate * min_lr_ratio
    warmup_iters: int = 200  # linear warm-up steps
    weight_decay: float = 0.1  # on matrices only
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global grad norm; 0 disables
    # evaluation, logging, checkpoints
    eval_interval: int = 500  # steps between val estimates (random windows; charlm.eval does the full pass)
    eval_iters: int = 50  # batches per val estimate
    log_interval: int = 10  # steps between metrics.jsonl rows
    ckpt_interval: int = 0  # steps between checkpoints; 0: every eval_interval
    keep_checkpoints: int = 3  # newest checkpoints kept on disk
    save_best: bool = True  # also keep best.pt, the checkpoint with the lowest val estimate
    max_bad_steps: int = 10  # consecutive non-finite losses (each skipped) before the run stops
    seed: int = 0  # seeds the model init and the data order
    # run
    out_dir: str = ""  # run folder; "": runs/<variant>[-<preset>]
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    max_memory_gb: float = 0.0  # cap this process's GPU memory (emulate a smaller card); 0: the whole card
    resume: bool = False  # continue from the run folder's latest checkpoint
    init_from: str = ""  # start from this checkpoint's weights (fine-tuning); optimizer and LR schedule start fresh
    plan_only: bool = False  # print the memory plan and exit
    variant: str = "base"  # comma-separated VARIANTS, e.g. deep,rope
    preset: str = ""  # a PRESETS entry, applied after the variants
    extra: dict = field(default_factory=dict)  # free-form notes saved with the run

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def run_name(self) -> str:
        return self.variant.replace(",", "+") + (f"-{self.preset}" if self.preset else "")

    def validate(self) -> None:
        """Reject impossible configs before any expensive work."""
        checks = [
            (self.n_head > 0 and self.n_embd % self.n_head == 0,
             f"n_head ({self.n_head}) must divide n_embd ({self.n_embd})"),
            (self.head_dim % 2 == 0 or self.pos_embedding != "rope",
             f"rope needs an even head dim, got n_embd / n_head = {self.head_dim}"),
            (self.pos_embedding in ("learned", "rope"), f"pos_embedding must be learned or rope, got {self.pos_embedding!r}"),
            (self.attn in ("auto", "sdpa", "triton", "naive"), f"attn must be auto, sdpa, triton or naive, got {self.attn!r}"),
            (self.rope_impl in ("auto", "torch", "triton", "fused"),
             f"rope_impl must be auto, torch, triton or fused, got {self.rope_impl!r}"),
            (self.rope_impl != "fused" or self.attn == "triton", "rope_impl fused needs attn triton (the kernel it is fused into)"),
            (self.rope_impl != "fused" or self.head_dim >= 32, f"rope_impl fused needs a head dim >= 32, got {self.head_dim}"),
            (self.tipa_scope in ("word", "window"), f"tipa_scope must be word or window, got {self.tipa_scope!r}"),
            (self.dtype in ("auto", "float32", "bfloat16"), f"dtype must be auto, float32 or bfloat16, got {self.dtype!r}"),
            (self.compile_mode in COMPILE_MODES, f"compile_mode must be one of {COMPILE_MODES}, got {self.compile_mode!r}"),
            (self.n_layer > 0 and self.block_size > 0 and self.batch_size > 0 and self.max_iters >= 0,
             "n_layer, block_size and batch_size must be positive and max_iters non-negative"),
            (0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout}"),
            (self.micro_batch_size == 0 or self.batch_size % self.micro_batch_size == 0,
             f"micro_batch_size ({self.micro_batch_size}) must divide batch_size ({self.batch_size})"),
            (self.log_interval > 0 and self.eval_interval > 0 and self.eval_iters > 0,
             "log_interval, eval_interval and eval_iters must be positive"),
            (self.learning_rate > 0 and 0.0 <= self.min_lr_ratio <= 1.0 and self.warmup_iters >= 0,
             f"learning_rate must be positive ({self.learning_rate}), min_lr_ratio in [0, 1] "
             f"({self.min_lr_ratio}) and warmup_iters non-negative ({self.warmup_iters})"),
            (self.weight_decay >= 0 and self.grad_clip >= 0 and 0 <= self.beta1 < 1 and 0 <= self.beta2 < 1,
             "weight_decay and grad_clip must be non-negative and beta1, beta2 in [0, 1)"),
            (self.keep_checkpoints >= 1 and self.max_bad_steps >= 1 and self.ckpt_interval >= 0,
             "keep_checkpoints and max_bad_steps must be at least 1 and ckpt_interval non-negative"),
        ]
        errors = [msg for ok, msg in checks if not ok]
        if errors:
            raise ValueError("invalid config: " + "; ".join(errors))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: Path) -> None:
        from charlm.io import atomic_write_text
        atomic_write_text(Path(path), json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> "Config":
        data = json.loads(Path(path).read_text())
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def variant_overrides(variant: str) -> dict:
    """Merged overrides of a comma-separated variant list, e.g. "deep,rope"."""
    merged = {}
    for name in filter(None, (v.strip() for v in variant.split(","))):
        if name not in VARIANTS:
            raise ValueError(f"unknown variant {name!r}; choose from {', '.join(VARIANTS)} (combine with commas)")
        merged.update(VARIANTS[name])
    return merged


def resolve(variant: str = "base", preset: str = "", **overrides) -> Config:
    """Defaults, then variants, then preset, then explicit overrides; validated."""
    if preset and preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    values = {**variant_overrides(variant), **PRESETS.get(preset, {}), **overrides}
    unknown = set(values) - {f.name for f in dataclasses.fields(Config)}
    if unknown:
        raise ValueError(f"unknown config fields: {sorted(unknown)}")
    cfg = Config(variant=variant, preset=preset, **values)
    cfg.validate()
    return cfg


def _flag_type(tp):
    """The argparse type of a field annotation (unwrapping `X | None`)."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if args else tp


def add_config_args(parser: argparse.ArgumentParser, exclude: tuple[str, ...] = ()) -> None:
    """One flag per Config field; booleans get --x/--no-x. Defaults are None so that only given flags override."""
    hints = typing.get_type_hints(Config)
    for f in dataclasses.fields(Config):
        if f.name in exclude or f.name == "extra":
            continue
        flag = "--" + f.name.replace("_", "-")
        tp = _flag_type(hints[f.name])
        help_text = f"(default: {f.default})"
        if tp is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            parser.add_argument(flag, type=tp, default=None, help=help_text)


def config_from_args(args: argparse.Namespace) -> Config:
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(Config)
             if getattr(args, f.name, None) is not None and f.name not in ("variant", "preset")}
    return resolve(args.variant or "base", args.preset or "", **given)
