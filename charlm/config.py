"""The configuration of a run: the model's shape (`ModelConfig`) inside everything else (`Config`), the
report's conditions as variants, size presets, and the command-line flags generated from the fields.

Resolution order: dataclass defaults, then each `--variant` in the order given, then `--preset`, then
explicit flags. Every field is a flag (`n_embd` -> `--n-embd`, whether it lives in the model or not), its
help is the field's description, and a field typed with `Literal[...]` only accepts those choices.
The resolved config is saved with the run (config.json) and in every checkpoint.
"""
import argparse
import dataclasses
import json
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

# The report's conditions. Variants combine: --variant deep,rope,tipa.
VARIANTS: dict[str, dict] = {
    "base": {},
    "rope": {"pos_embedding": "rope"},
    "tipa": {"tipa": True},
    "deep": {"n_layer": 32, "block_size": 512},
    # modded-nanogpt's lessons that measured as helping at charlm's scales (results/modern/results.md)
    "modern": {"norm": "rmsnorm", "bias": False, "pos_embedding": "rope", "qk_norm": True, "mlp": "swiglu",
               "zero_init": True, "dropout": 0.0, "optimizer": "muon", "lr_schedule": "wsd"},
}

# Size presets, applied after the variants: `tiny` is for CPU smoke runs and tests.
PRESETS: dict[str, dict] = {
    "tiny": {"n_layer": 2, "n_head": 2, "n_embd": 64, "block_size": 64, "dropout": 0.0,
             "learning_rate": 3e-3, "warmup_iters": 10, "eval_interval": 25, "eval_iters": 8},
}

MAX_EVAL_ITERS = 10_000  # batches per val estimate: beyond this, an estimate costs more than a full pass

CompileMode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]
COMPILE_MODES = typing.get_args(CompileMode)


def option(default, help: str):
    """A dataclass field with the description that --help shows."""
    if isinstance(default, dict):
        return field(default_factory=dict, metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class ModelConfig:
    """What fixes the shapes of GPT's parameters (nanoGPT's names): a checkpoint loads only into the same."""
    n_layer: int = option(16, "transformer blocks")
    n_head: int = option(8, "attention heads; must divide n_embd")
    n_embd: int = option(512, "residual stream width")
    block_size: int = option(256, "context length in tokens")
    vocab_size: int = option(0, "0: taken from the dataset's meta.json")
    bias: bool = option(True, "biases in Linear and LayerNorm layers")
    pos_embedding: Literal["learned", "rope"] = option("learned", "learned absolute positions, or rotary q/k")
    tipa: bool = option(False, "auxiliary reverse-position head (README, TIPA)")
    tipa_max: int = option(16, "R: reverse positions are clipped to R; the TIPA head has R + 1 classes")
    norm: Literal["layernorm", "rmsnorm"] = option("layernorm", "the blocks' and the final norm")
    mlp: Literal["gelu", "relu2", "swiglu"] = option("gelu", "MLP: GELU or ReLU^2 (4x wide), or SwiGLU at equal "
                                                             "parameters (three matrices, 8/3x wide)")
    qk_norm: bool = option(False, "RMS-normalise queries and keys per head before attention (no parameters)")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head if self.n_head else 0

    def mismatches(self, other: "ModelConfig") -> list[str]:
        """How `other` (a checkpoint's model) differs from this one, one phrase per field."""
        return [f"{f.name} is {getattr(other, f.name)!r} there and {getattr(self, f.name)!r} here"
                for f in dataclasses.fields(self) if getattr(other, f.name) != getattr(self, f.name)]


MODEL_FIELDS = frozenset(f.name for f in dataclasses.fields(ModelConfig))


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    # data
    dataset: str = option("enwik8", "prepared dataset: a folder under data_root (python -m charlm.data)")
    data_root: str = option("data", "where prepared datasets live")
    category: str = option("", "train on one topic subset only: METHOD/NAME (python -m charlm.categorize)")
    # model options that leave the parameters' shapes alone
    dropout: float = option(0.1, "residual and MLP dropout (attention-probability dropout is off)")
    rope_theta: float = option(10000.0, "RoPE base (half-split convention)")
    zero_init: bool = option(False, "output projections (attention and MLP c_proj) start at zero")
    tipa_lambda: float = option(0.1, "weight of the TIPA cross-entropy in the training loss")
    tipa_scope: Literal["word", "window"] = option("word", "word: position in the word; "
                                                           "window: the report's literal mapping")
    # implementation choices (auto: the fastest correct one the device offers)
    attn: Literal["auto", "sdpa", "triton", "naive"] = option("auto", "attention implementation; auto: sdpa")
    rope_impl: Literal["auto", "torch", "triton", "fused"] = option(
        "auto", "RoPE implementation; fused: inside --attn triton; auto: fused with triton attention, else the "
                "Triton kernel on CUDA, else torch")
    compile: bool | None = option(None, "torch.compile the blocks; default: on for CUDA")
    compile_mode: CompileMode = option("default", "torch.compile mode (reduce-overhead: CUDA graphs)")
    dtype: Literal["auto", "float32", "bfloat16"] = option("auto", "auto: bf16 autocast on CUDA, fp32 on the CPU")
    checkpoint_layers: int = option(-1, "blocks under activation checkpointing; -1: the memory planner decides")
    # optimisation
    batch_size: int = option(64, "global batch in sequences (all ranks, all micro-steps)")
    micro_batch_size: int = option(0, "sequences per forward pass per rank; 0: the memory planner decides")
    max_iters: int = option(5000, "optimizer steps")
    learning_rate: float = option(6e-4, "peak LR")
    min_lr_ratio: float = option(0.1, "the decay (cosine or WSD) ends at learning_rate * min_lr_ratio")
    lr_decay_iters: int = option(0, "step where the decay ends (constant after); 0: max_iters")
    warmup_iters: int = option(200, "linear warm-up steps")
    weight_decay: float = option(0.1, "decoupled weight decay on matrices only (AdamW's at learning_rate, "
                                      "Muon's at muon_lr)")
    beta1: float = option(0.9, "AdamW beta1")
    beta2: float = option(0.95, "AdamW beta2")
    grad_clip: float = option(1.0, "max global grad norm; 0 disables clipping")
    optimizer: Literal["adamw", "muon"] = option("adamw", "muon: Muon for the blocks' weight matrices, AdamW "
                                                          "(learning_rate) for embeddings, heads, norms and biases")
    muon_lr: float = option(0.02, "Muon's peak LR (torch's 'original' shape scaling)")
    muon_momentum: float = option(0.95, "Muon's Nesterov momentum")
    lr_schedule: Literal["cosine", "wsd"] = option("cosine", "cosine decay, or wsd: warm-up, stable at the peak, "
                                                             "linear decay over the last decay_fraction")
    decay_fraction: float = option(0.4, "wsd: the share of lr_decay_iters spent decaying to min_lr_ratio")
    # evaluation, logging, checkpoints
    eval_interval: int = option(500, "steps between val estimates (charlm.eval does the full pass)")
    eval_iters: int = option(50, "batches per val estimate")
    log_interval: int = option(10, "steps between metrics.jsonl rows (and log lines)")
    logger: Literal["none", "tensorboard", "wandb"] = option("none", "also log the metrics rows to TensorBoard "
                                                                    "(RUN/tensorboard/) or Weights & Biases")
    ckpt_interval: int = option(0, "steps between checkpoints; 0: every eval_interval")
    keep_checkpoints: int = option(3, "newest checkpoints kept on disk")
    save_best: bool = option(True, "also keep best.pt, the checkpoint with the lowest val estimate")
    max_bad_steps: int = option(10, "consecutive non-finite losses (each skipped) before the run stops")
    seed: int = option(0, "seeds the model init, the data order and dropout")
    # run
    out_dir: str = option("", "run folder; default runs/<variant>[-<preset>]")
    device: str = option("auto", "auto | cpu | cuda | cuda:N")
    max_memory_gb: float = option(0.0, "plan for (and cap the process at) this much GPU memory; 0: the whole card")
    resume: bool = option(False, "continue from the run folder's newest intact checkpoint")
    stop_at: int = option(0, "stop at this step with a checkpoint, the schedule still that of max_iters (a "
                             "time-sliced job: --resume continues it); 0: train to max_iters")
    extend: bool = option(False, "with --resume and a larger --max-iters: train a finished run further, the LR "
                                 "held at its final value (the cosine still ends where it ended)")
    overwrite: bool = option(False, "start over in a run folder that holds a training history (deletes its "
                                    "checkpoints and metrics)")
    init_from: str = option("", "start from this checkpoint's weights (fine-tuning); "
                                "optimizer and schedule start fresh")
    plan_only: bool = option(False, "print the memory plan and exit (no GPU needed)")
    variant: str = option("base", f"comma-separated conditions: {', '.join(VARIANTS)}")
    preset: str = option("", f"a size preset applied after the variants: {', '.join(PRESETS)}")
    extra: dict = option({}, "free-form notes saved with the run")

    @property
    def run_name(self) -> str:
        return self.variant.replace(",", "+") + (f"-{self.preset}" if self.preset else "")

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir or Path("runs") / self.run_name)

    @property
    def dataset_dir(self) -> Path:
        return Path(self.data_root) / self.dataset

    def replace(self, **changes) -> "Config":
        """A copy with fields changed, model fields included (by their flat names: n_layer=2)."""
        model = {k: changes.pop(k) for k in list(changes) if k in MODEL_FIELDS}
        if model:
            changes["model"] = dataclasses.replace(changes.get("model", self.model), **model)
        return dataclasses.replace(self, **changes)

    def validate(self) -> None:
        """Reject impossible configs before any expensive work, naming every field that is wrong."""
        errors = _choice_errors(self.model) + _choice_errors(self) + _range_errors(self)
        if errors:
            raise ValueError("invalid config: " + "; ".join(errors))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict, source: str = "config") -> "Config":
        """A Config from to_dict()'s form, or the flat form of charlm's first releases; unknown keys ignored."""
        values = {k: v for k, v in flat_fields(data, source).items() if k in FIELD_TYPES or k == "extra"}
        return cls().replace(**values)

    def save(self, path: Path) -> None:
        from charlm.io import atomic_write_text
        atomic_write_text(Path(path), json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> "Config":
        try:
            data = json.loads(Path(path).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: not a JSON config ({e})") from e
        cfg = cls.from_dict(data, source=str(path))
        try:
            cfg.validate()
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from e
        return cfg


FIELD_TYPES = {name: tp for name, tp in (typing.get_type_hints(ModelConfig) | typing.get_type_hints(Config)).items()
               if name not in ("model", "extra")}


def flat_fields(data: dict, source: str) -> dict:
    """A config mapping (nested `model` table, or flat) as flat field names, each value of its field's type."""
    if not isinstance(data, dict) or not isinstance(data.get("model", {}), dict):
        raise ValueError(f"{source}: expected a JSON object of config fields (with an optional \"model\" "
                         f"object), got {type(data).__name__}")
    flat = {**data.get("model", {}), **{k: v for k, v in data.items() if k != "model"}}
    for name, value in flat.items():
        if name in FIELD_TYPES and not _has_type(value, FIELD_TYPES[name]):
            raise ValueError(f"{source}: {name} must be {_type_name(FIELD_TYPES[name])}, got {value!r}")
    if "extra" in flat and not isinstance(flat["extra"], dict):
        raise ValueError(f"{source}: extra must be an object, got {flat['extra']!r}")
    return flat


# What a command is asked to do, not what a run is: never taken from a config file.
ACTIONS = ("resume", "overwrite", "extend", "plan_only", "stop_at")


def read_config_file(path: Path) -> dict:
    """The field values of a TOML or JSON config file (a run's own config.json included) by flat name.
    Unknown names are refused; a run's notes (`extra`) and actions (resume, ...) are left out."""
    path = Path(path)
    try:
        text = path.read_text()
        if path.suffix == ".toml":
            import tomllib
            data = tomllib.loads(text)
        else:
            data = json.loads(text)
    except OSError as e:
        raise ValueError(f"--config {path}: cannot read it ({e.strerror})") from e
    except (ValueError, UnicodeDecodeError) as e:  # json.JSONDecodeError and tomllib.TOMLDecodeError
        raise ValueError(f"--config {path}: not {'TOML' if path.suffix == '.toml' else 'JSON'} ({e})") from e
    values = flat_fields(data, f"--config {path}")
    unknown = sorted(set(values) - set(FIELD_TYPES) - {"extra"})
    if unknown:
        raise ValueError(f"--config {path}: unknown fields {', '.join(unknown)}")
    return {k: v for k, v in values.items() if k not in ACTIONS and k != "extra"}


def _has_type(value, tp) -> bool:
    if typing.get_origin(tp) is Literal:
        return value in typing.get_args(tp)
    allowed = [a for a in typing.get_args(tp)] or [tp]
    if type(None) in allowed and value is None:
        return True
    if bool in allowed:
        return isinstance(value, bool)
    if float in allowed:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, tuple(a for a in allowed if a is not type(None))) and not isinstance(value, bool)


def _type_name(tp) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(map(str, typing.get_args(tp)))
    return " or ".join("null" if a is type(None) else a.__name__ for a in (typing.get_args(tp) or [tp]))


def _choice_errors(obj) -> list[str]:
    """Fields typed Literal[...] whose value is not one of the choices."""
    errors = []
    for f in dataclasses.fields(obj):
        choices = _choices(f.type)
        if choices and getattr(obj, f.name) not in choices:
            errors.append(f"{f.name} must be one of {', '.join(choices)}, got {getattr(obj, f.name)!r}")
    return errors


def _choices(tp) -> tuple:
    return typing.get_args(tp) if typing.get_origin(tp) is Literal else ()


def _finite(*values: float) -> bool:
    return all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)


def _range_errors(cfg: Config) -> list[str]:
    m = cfg.model
    checks = [
        (m.n_head > 0 and m.n_embd > 0 and m.n_embd % m.n_head == 0,
         f"n_head ({m.n_head}) must divide n_embd ({m.n_embd}), and both must be positive"),
        (m.pos_embedding != "rope" or m.head_dim % 2 == 0,
         f"rope needs an even head dim, got n_embd / n_head = {m.head_dim}"),
        (m.n_layer > 0 and m.block_size > 0 and m.vocab_size >= 0 and m.tipa_max >= 1,
         f"n_layer ({m.n_layer}) and block_size ({m.block_size}) must be positive, vocab_size ({m.vocab_size}) "
         f"non-negative and tipa_max ({m.tipa_max}) at least 1"),
        (cfg.rope_impl != "fused" or cfg.attn == "triton",
         "rope_impl fused needs attn triton (the kernel it is fused into)"),
        (cfg.rope_impl != "fused" or m.head_dim >= 32, f"rope_impl fused needs a head dim >= 32, got {m.head_dim}"),
        (_finite(cfg.rope_theta) and cfg.rope_theta > 0, f"rope_theta must be a positive number, got {cfg.rope_theta}"),
        (_finite(cfg.tipa_lambda) and cfg.tipa_lambda >= 0,
         f"tipa_lambda must be a non-negative number, got {cfg.tipa_lambda}"),
        (cfg.batch_size > 0 and cfg.max_iters >= 0, "batch_size must be positive and max_iters non-negative"),
        (_finite(cfg.dropout) and 0.0 <= cfg.dropout < 1.0, f"dropout must be in [0, 1), got {cfg.dropout}"),
        (cfg.micro_batch_size >= 0,
         f"micro_batch_size must be positive, or 0 for the planner's choice; got {cfg.micro_batch_size}"),
        (cfg.micro_batch_size <= 0 or cfg.batch_size % cfg.micro_batch_size == 0,
         f"micro_batch_size ({cfg.micro_batch_size}) must divide batch_size ({cfg.batch_size})"),
        (cfg.checkpoint_layers >= -1,
         f"checkpoint_layers must be -1 (the planner decides) or more, got {cfg.checkpoint_layers}"),
        (cfg.log_interval > 0 and cfg.eval_interval > 0 and cfg.eval_iters > 0,
         "log_interval, eval_interval and eval_iters must be positive"),
        (_finite(cfg.learning_rate, cfg.min_lr_ratio) and cfg.learning_rate > 0 and 0.0 <= cfg.min_lr_ratio <= 1.0
         and cfg.warmup_iters >= 0,
         f"learning_rate must be positive ({cfg.learning_rate}), min_lr_ratio in [0, 1] "
         f"({cfg.min_lr_ratio}) and warmup_iters non-negative ({cfg.warmup_iters})"),
        (_finite(cfg.weight_decay, cfg.grad_clip, cfg.beta1, cfg.beta2) and cfg.weight_decay >= 0
         and cfg.grad_clip >= 0 and 0 <= cfg.beta1 < 1 and 0 <= cfg.beta2 < 1,
         "weight_decay and grad_clip must be non-negative and beta1, beta2 in [0, 1)"),
        (cfg.stop_at >= 0, f"stop_at must be 0 (max_iters) or a step, got {cfg.stop_at}"),
        (_finite(cfg.muon_lr, cfg.muon_momentum, cfg.decay_fraction) and cfg.muon_lr > 0
         and 0 <= cfg.muon_momentum < 1 and 0 < cfg.decay_fraction <= 1,
         f"muon_lr must be positive ({cfg.muon_lr}), muon_momentum in [0, 1) ({cfg.muon_momentum}) and "
         f"decay_fraction in (0, 1] ({cfg.decay_fraction})"),
        (cfg.lr_decay_iters >= 0, f"lr_decay_iters must be 0 (max_iters) or more, got {cfg.lr_decay_iters}"),
        (cfg.keep_checkpoints >= 1 and cfg.max_bad_steps >= 1 and cfg.ckpt_interval >= 0,
         "keep_checkpoints and max_bad_steps must be at least 1 and ckpt_interval non-negative"),
        (0 <= cfg.seed < 2**63, f"seed must be in [0, 2**63), got {cfg.seed}"),
        (re.fullmatch(r"auto|cpu|cuda(:\d+)?", cfg.device) is not None,
         f"device must be auto, cpu, cuda or cuda:N, got {cfg.device!r}"),
        (not (cfg.resume and cfg.overwrite),
         "resume and overwrite exclude each other: continue the run, or start it over"),
        (cfg.eval_iters <= MAX_EVAL_ITERS,
         f"eval_iters must be at most {MAX_EVAL_ITERS} (an estimate on random windows; python -m charlm.eval "
         f"scores every character), got {cfg.eval_iters}"),
        (_finite(cfg.max_memory_gb) and cfg.max_memory_gb >= 0,
         f"max_memory_gb must be >= 0 (0: the whole card), got {cfg.max_memory_gb}"),
    ]
    return [msg for ok, msg in checks if not ok]


def variant_overrides(variant: str) -> dict:
    """Merged overrides of a comma-separated variant list, e.g. "deep,rope"."""
    merged = {}
    for name in filter(None, (v.strip() for v in variant.split(","))):
        if name not in VARIANTS:
            raise ValueError(f"unknown variant {name!r}; choose from {', '.join(VARIANTS)} (combine with commas)")
        merged.update(VARIANTS[name])
    return merged


def resolve(variant: str = "base", preset: str = "", **overrides) -> Config:
    """Defaults, then variants, then preset, then explicit overrides (flat names); validated."""
    if preset and preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    values = {**variant_overrides(variant), **PRESETS.get(preset, {}), **overrides}
    unknown = set(values) - {f.name for f in dataclasses.fields(Config)} - MODEL_FIELDS
    if unknown:
        raise ValueError(f"unknown config fields: {sorted(unknown)}")
    cfg = Config(variant=variant, preset=preset).replace(**values)
    cfg.validate()
    return cfg


def flag_fields() -> list[dataclasses.Field]:
    """Every field that has a flag: the model's and the run's (not the nested `model` or `extra` themselves)."""
    return [f for f in dataclasses.fields(ModelConfig) + dataclasses.fields(Config) if f.name not in ("model", "extra")]


def _flag_type(tp):
    """The argparse type of a field annotation: unwraps `X | None`; Literal choices are strings."""
    if typing.get_origin(tp) is Literal:
        return type(typing.get_args(tp)[0])
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if args else tp


def add_config_args(parser: argparse.ArgumentParser, exclude: tuple[str, ...] = ()) -> None:
    """One flag per field; booleans get --x/--no-x. Defaults are None so that only given flags override."""
    for f in flag_fields():
        if f.name in exclude:
            continue
        flag = "--" + f.name.replace("_", "-")
        tp = FIELD_TYPES[f.name]
        help_text = f"{f.metadata.get('help', '')} (default: {f.default})"
        if _flag_type(tp) is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            parser.add_argument(flag, type=_flag_type(tp), default=None, choices=_choices(tp) or None,
                                help=help_text)


def given_flags(args: argparse.Namespace) -> dict:
    """The config fields given on the command line, by their flat names."""
    return {f.name: getattr(args, f.name) for f in flag_fields() if getattr(args, f.name, None) is not None}


def config_from_args(args: argparse.Namespace, file_values: dict | None = None) -> Config:
    """Defaults, variants, preset, then a config file's values, then the flags given (which win)."""
    values = {**(file_values or {}), **given_flags(args)}
    variant, preset = values.pop("variant", "base"), values.pop("preset", "")
    return resolve(variant, preset, **values)
