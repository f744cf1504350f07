"""The memory planner: predict a training step's peak GPU memory and choose micro-batch and checkpointing.

`estimate_peak_bytes` is an analytic model of eager PyTorch training with charlm's GPT (charlm.model):
fp32 master weights, AdamW (or Muon for the blocks' matrices: one momentum buffer instead of AdamW's two
moments), bf16 autocast on CUDA. `plan_memory` picks the largest micro-batch that
fits (gradient accumulation makes up the global batch) and turns on activation checkpointing, block by
block, only when a micro-batch of one sequence does not fit without it.

The model counts the tensors that exist at the peak, which is the start of the backward pass: the model
state, every tensor autograd saved during the forward pass, and the working set of the first backward
step. Assumptions, each checked by counting autograd's saved tensors on the CPU (saved_tensors_hooks)
and to be calibrated against torch.cuda.max_memory_allocated on a GPU (the constants below):
- autocast (dtype auto or bfloat16) runs Linear layers and matmuls in bf16 and LayerNorm and softmax in
  fp32; the residual stream stays fp32 because embeddings are fp32 and fp32 + bf16 is fp32. With dtype
  float32 (or float16, which charlm.train runs without autocast) everything is fp32 and nothing is cast.
- dropout keeps a 1-byte mask per element on CUDA (the CPU keeps masks in the activation dtype).
- SDPA and the Triton kernel are flash attention: they keep q, k, v (views into the fused QKV output), the
  output and one fp32 log-sum-exp per row and head, never the T x T matrix. Naive attention keeps the
  (B, H, T, T) probabilities (charlm.kernels.flash_attn.attention_reference).
- A checkpointed block keeps only its input; in the backward pass one block at a time is recomputed.
- Gradients are counted in full although the first micro-step allocates them during the backward pass,
  as activations are freed: from the second micro-step of gradient accumulation on, they are all there.
- The estimate is for eager mode. torch.compile usually saves less (its partitioner recomputes cheap
  pointwise ops such as GELU and dropout), so the estimate errs on the safe side for compiled runs.
- "GB" is 2**30 bytes throughout, as in nvidia-smi, torch's memory statistics and --max-memory-gb.
"""
import os
from dataclasses import dataclass, field

import torch

from charlm.config import Config
from charlm.data import DataError, with_dataset
from charlm.errors import CharlmError
from charlm.loss import chunk_rows, uses_chunked_loss
from charlm.model import hidden_matrix_parameters, mlp_hidden, parameter_counts, with_impls

GB = 2**30

# Calibration constants: the only numbers here that a measurement on a GPU should change.
MODEL_STATE_BYTES_PER_PARAM = 16  # fp32 weight, fp32 gradient, AdamW's fp32 exp_avg and exp_avg_sq
MUON_STATE_BYTES_PER_PARAM = 12  # fp32 weight, fp32 gradient, Muon's fp32 momentum buffer
WEIGHT_CAST_BYTES_PER_PARAM = 2  # bf16 copy of each Linear weight: autocast caches it, backward keeps it
DROPOUT_MASK_BYTES = 1  # per element: CUDA's dropout saves a bool mask
CUDA_CONTEXT_BYTES = 1 * GB  # CUDA context, cuBLAS workspaces, loaded kernels: outside the caching allocator
FRAGMENTATION_MARGIN = 0.10  # the caching allocator's slack on top of live tensors


class MemoryPlanError(CharlmError):
    """Raised when no micro-batch and checkpointing choice fits in the memory available."""


# --- the model of memory -----------------------------------------------------------------------------


def uses_autocast(cfg: Config) -> bool:
    """Whether training runs under bf16 autocast on CUDA (charlm.train's rule; `auto` means CUDA here)."""
    return cfg.dtype in ("auto", "bfloat16")


def activation_bytes(cfg: Config) -> int:
    """Bytes per element of matmul inputs and outputs: bf16 under autocast, else fp32."""
    return 2 if uses_autocast(cfg) else 4


def _rotates_outside(cfg: Config) -> bool:
    """Whether q and k are rotated in copies of their own (RoPE not fused into the attention kernel)."""
    return cfg.model.pos_embedding == "rope" and cfg.rope_impl != "fused"


def _attention_bytes_per_token(cfg: Config) -> int:
    """What attention saves beyond q, k, v and its output, per token of one block."""
    C, H, T, act = cfg.model.n_embd, cfg.model.n_head, cfg.model.block_size, activation_bytes(cfg)
    if cfg.attn == "naive":
        # The (B, H, T, T) probabilities: fp32 from the softmax (autocast runs softmax in fp32) and, under
        # autocast, the bf16 cast that probs @ v keeps. (Its q, k, v are copies for the batched matmuls; they
        # take the place of the views into the QKV output and weigh the same.)
        return H * T * (4 + act if uses_autocast(cfg) else 4)
    # Flash (SDPA, Triton): one fp32 log-sum-exp per row and head. RoPE outside the kernel makes rotated
    # copies of q and k (v stays a view); the Triton kernel rotates inside and keeps nothing extra.
    return 4 * H + (2 * act * C if _rotates_outside(cfg) else 0)


def norm_bytes_per_token(cfg: Config) -> int:
    """A norm's saved tensors. LayerNorm: its input, the fp32 residual stream, and fp32 mean and rstd.
    RMSNorm: its input, fp32 rstd and the normalised input that the gain's product keeps (torch's composite
    kernel, as on the CPU; a fused kernel keeps less, so this bounds it)."""
    C = cfg.model.n_embd
    return 4 * C + 2 * 4 if cfg.model.norm == "layernorm" else 2 * 4 * C + 4


def _qk_norm_bytes_per_token(cfg: Config) -> int:
    """QK-norm: fp32 rstd per head of q and k; under autocast the fp32 copies of q and k it normalises;
    and the normalised q and k when attention keeps them (RoPE outside the kernel keeps rotated copies
    instead, counted with attention)."""
    if not cfg.model.qk_norm:
        return 0
    C, act = cfg.model.n_embd, activation_bytes(cfg)
    upcast = 2 * 4 * C if uses_autocast(cfg) else 0
    return 2 * 4 * cfg.model.n_head + upcast + (0 if _rotates_outside(cfg) else 2 * act * C)


def mlp_bytes_per_token(cfg: Config) -> int:
    """The MLP's saved tensors beyond its input. GELU: c_fc's output and GELU's; ReLU^2: ReLU's output (its
    backward reads its result, which is also the square's input) and the square; SwiGLU: c_fc's output
    (gate and value), SiLU's output and the product."""
    hidden, act = mlp_hidden(cfg.model), activation_bytes(cfg)
    return act * (4 if cfg.model.mlp == "swiglu" else 2) * hidden


def block_bytes_per_token(cfg: Config) -> int:
    """Bytes one transformer block saves for its backward pass, per token."""
    C = cfg.model.n_embd
    act = activation_bytes(cfg)
    mask = DROPOUT_MASK_BYTES * C if cfg.dropout > 0 else 0
    norm = norm_bytes_per_token(cfg)
    return (
        norm                       # ln_1
        + act * C                  # c_attn's input: ln_1's output cast to bf16
        + 3 * act * C              # q, k, v: views into c_attn's output, kept by attention
        + _qk_norm_bytes_per_token(cfg)
        + _attention_bytes_per_token(cfg)
        + act * C                  # attention output = attn c_proj's input (one storage)
        + mask                     # residual dropout after attention
        + norm                     # ln_2
        + act * C                  # c_fc's input
        + mlp_bytes_per_token(cfg)  # hidden activations; the last is mlp c_proj's input
        + mask                     # residual dropout after the MLP
    )


def head_bytes_per_token(cfg: Config) -> tuple[int, int]:
    """(saved, loss working set) per token outside the blocks: embedding, final LayerNorm, output heads."""
    C, V = cfg.model.n_embd, cfg.model.vocab_size
    act = activation_bytes(cfg)
    tipa_classes = cfg.model.tipa_max + 1 if cfg.model.tipa else 0
    # The LM loss keeps lm_head's input (bf16 cast of ln_f's output) and fp32 log-probabilities, or, chunked
    # (charlm.loss), the fp32 gradient of the hidden states it computed in the forward pass.
    lm_loss_saved = 4 * C if uses_chunked_loss(V) else act * C + 4 * V
    saved = (
        8 + 8                                  # token ids and targets (int64), for embedding and loss
        + (DROPOUT_MASK_BYTES * C if cfg.dropout > 0 else 0)  # embedding dropout
        + norm_bytes_per_token(cfg)            # ln_f
        + lm_loss_saved
        + (act * C + 4 * tipa_classes + 8 if cfg.model.tipa else 0)  # the TIPA head: unchunked
    )
    # The loss's peak: bf16 logits (or their gradient), the fp32 copy (or its gradient), the log-probs' gradient.
    loss_working_set = (act + 4 + 4) * ((0 if uses_chunked_loss(V) else V) + tipa_classes)
    return saved, loss_working_set


def chunked_loss_bytes(cfg: Config, micro_batch: int) -> int:
    """The chunked LM loss's working set: one chunk's fp32 logits (their gradient in place), their cast to
    the matmul dtype, and the fp32 gradient of the head's weight."""
    V = cfg.model.vocab_size
    if not uses_chunked_loss(V):
        return 0
    logits = min(chunk_rows(V), micro_batch * cfg.model.block_size) * V
    return (4 + activation_bytes(cfg)) * logits + 4 * V * cfg.model.n_embd


def memory_breakdown(cfg: Config, micro_batch: int, checkpoint_layers: int) -> dict[str, int]:
    """Predicted peak bytes by term; see the module docstring for what each term assumes."""
    L, k = cfg.model.n_layer, checkpoint_layers
    if not 0 <= k <= L:
        raise ValueError(f"checkpoint_layers must be in 0..n_layer ({L}), got {k}")
    if cfg.model.vocab_size <= 0:
        raise ValueError("vocab_size must be set to plan memory (it comes from the dataset's meta.json)")
    params, linear_params = parameter_counts(cfg.model)
    block = block_bytes_per_token(cfg)
    head, loss_working_set = head_bytes_per_token(cfg)
    per_token = (
        (L - k) * block                    # blocks that keep all their activations
        + k * 4 * cfg.model.n_embd        # checkpointed blocks keep only their fp32 input
        + head
        # The backward pass's working set: the loss's gradients, or one block's gradients, or the
        # activations of the checkpointed block being recomputed, whichever is largest.
        + max(loss_working_set, block)
    )
    muon_params = hidden_matrix_parameters(cfg.model) if cfg.optimizer == "muon" else 0
    terms = {
        "model_state": MODEL_STATE_BYTES_PER_PARAM * (params - muon_params) + MUON_STATE_BYTES_PER_PARAM * muon_params,
        "weight_casts": WEIGHT_CAST_BYTES_PER_PARAM * linear_params if uses_autocast(cfg) else 0,
        "activations": micro_batch * cfg.model.block_size * per_token,
        "loss_chunk": chunked_loss_bytes(cfg, micro_batch),
    }
    terms["fragmentation"] = int(FRAGMENTATION_MARGIN * sum(terms.values()))
    terms["cuda_context"] = CUDA_CONTEXT_BYTES
    return terms


def estimate_peak_bytes(cfg: Config, micro_batch: int, checkpoint_layers: int) -> int:
    """Predicted peak GPU memory of one rank's training step, in bytes."""
    return sum(memory_breakdown(cfg, micro_batch, checkpoint_layers).values())


# --- the plan ----------------------------------------------------------------------------------------


@dataclass
class MemoryPlan:
    micro_batch_size: int  # sequences per forward pass per rank
    accum_steps: int  # micro-steps per optimizer step
    checkpoint_layers: int  # the first k blocks run under activation checkpointing
    predicted_peak_bytes: int
    capacity_bytes: int  # what the plan had to fit in, per rank
    world_size: int
    n_layer: int
    breakdown: dict[str, int] = field(default_factory=dict)  # predicted bytes by term (memory_breakdown)

    @property
    def tensor_bytes(self) -> int:
        """The predicted live tensors: the peak less the allocator's slack and the CUDA context, the figure
        torch.cuda.max_memory_allocated measures."""
        return sum(v for k, v in self.breakdown.items() if k not in ("cuda_context", "fragmentation"))

    def describe(self) -> str:
        global_batch = self.micro_batch_size * self.accum_steps * self.world_size
        steps = "step" if self.accum_steps == 1 else "steps"
        ranks = "rank" if self.world_size == 1 else "ranks"
        return (f"memory plan: micro-batch {self.micro_batch_size} x {self.accum_steps} accumulation {steps} "
                f"(global batch {global_batch} over {self.world_size} {ranks}), activation checkpointing on "
                f"{self.checkpoint_layers} of {self.n_layer} layers, predicted peak "
                f"{self.predicted_peak_bytes / GB:.1f} GB of {self.capacity_bytes / GB:.1f} GB")


def _per_rank_batch(cfg: Config, world_size: int) -> int:
    if world_size < 1 or cfg.batch_size % world_size:
        raise ValueError(f"batch_size ({cfg.batch_size}) must be divisible by the number of ranks ({world_size})")
    local = cfg.batch_size // world_size
    if cfg.micro_batch_size > 0 and local % cfg.micro_batch_size:
        raise ValueError(f"micro_batch_size ({cfg.micro_batch_size}) must divide the per-rank batch "
                         f"({cfg.batch_size} / {world_size} ranks = {local})")
    return local


def _candidates(cfg: Config, local_batch: int) -> list[tuple[int, int]]:
    """(micro-batch, checkpointed layers) in order of preference: the largest micro-batch without
    checkpointing first; checkpointing more and more layers only at the smallest micro-batch."""
    divisors = [m for m in range(local_batch, 0, -1) if local_batch % m == 0]
    micro_batches = [cfg.micro_batch_size] if cfg.micro_batch_size > 0 else divisors
    if cfg.checkpoint_layers >= 0:
        return [(m, cfg.checkpoint_layers) for m in micro_batches]
    return [(m, 0) for m in micro_batches] + [(micro_batches[-1], k) for k in range(1, cfg.model.n_layer + 1)]


def plan_memory(cfg: Config, capacity_bytes: int, world_size: int = 1) -> MemoryPlan:
    """The largest micro-batch (a divisor of the per-rank batch) whose predicted peak fits capacity_bytes,
    checkpointing as few blocks as needed; cfg.micro_batch_size > 0 and cfg.checkpoint_layers >= 0 are
    kept as given. Raises MemoryPlanError, with what to change, when nothing fits."""
    local_batch = _per_rank_batch(cfg, world_size)
    candidates = _candidates(cfg, local_batch)
    for micro_batch, layers in candidates:
        breakdown = memory_breakdown(cfg, micro_batch, layers)
        peak = sum(breakdown.values())
        if peak <= capacity_bytes:
            return MemoryPlan(micro_batch, local_batch // micro_batch, layers, peak, capacity_bytes,
                              world_size, cfg.model.n_layer, breakdown)
    raise _does_not_fit(cfg, capacity_bytes, world_size, *candidates[-1])


def _does_not_fit(cfg: Config, capacity_bytes: int, world_size: int, micro_batch: int, layers: int) -> MemoryPlanError:
    """The error for a config whose most frugal allowed choice still does not fit, naming what would."""
    breakdown = memory_breakdown(cfg, micro_batch, layers)
    terms = ", ".join(f"{name.replace('_', ' ')} {size / GB:.2f}" for name, size in breakdown.items() if size)
    m = cfg.model
    message = (f"n_layer {m.n_layer}, n_embd {m.n_embd}, block_size {m.block_size} does not fit in "
               f"{capacity_bytes / GB:.1f} GB per GPU: micro-batch {micro_batch} with {layers} of {m.n_layer} "
               f"layers checkpointed needs a predicted {sum(breakdown.values()) / GB:.1f} GB ({terms} GB).")
    if cfg.micro_batch_size > 0 or cfg.checkpoint_layers >= 0:  # was it the user's choice that did not fit?
        try:
            plan = plan_memory(cfg.replace(micro_batch_size=0, checkpoint_layers=-1), capacity_bytes, world_size)
            return MemoryPlanError(f"{message} --micro-batch-size {plan.micro_batch_size} --checkpoint-layers "
                                   f"{plan.checkpoint_layers} would fit ({plan.predicted_peak_bytes / GB:.1f} GB); "
                                   f"or leave both unset and the planner chooses.")
        except MemoryPlanError:
            pass
    return MemoryPlanError(f"{message} Use a smaller model or context (--n-layer, --n-embd, --block-size) or a GPU "
                           f"with more memory; more GPUs do not help, since data parallelism keeps a whole model "
                           f"and at least one sequence on every GPU.")


def plan_only(cfg: Config) -> MemoryPlan:
    """The memory plan without building the model or touching a GPU (works on a CPU-only machine, and
    without the dataset: its vocabulary is then taken as 256 bytes)."""
    try:
        cfg, _ = with_dataset(cfg)
    except DataError:
        cfg = cfg if cfg.model.vocab_size else cfg.replace(vocab_size=256)
    device = torch.device("cuda" if torch.cuda.is_available() and cfg.device != "cpu" else "cpu")
    return plan_memory(with_impls(cfg, device), device_capacity_bytes(device, cfg.max_memory_gb))


# --- the device --------------------------------------------------------------------------------------


def device_capacity_bytes(device: torch.device | str, max_memory_gb: float = 0.0) -> int:
    """Memory to plan for: the CUDA device's total, capped at max_memory_gb when given. Off CUDA (e.g.
    `--plan-only --max-memory-gb 40` on a laptop) max_memory_gb itself, or else the machine's RAM."""
    if max_memory_gb < 0:
        raise ValueError(f"max_memory_gb must be >= 0 (0: the whole device), got {max_memory_gb}")
    device = torch.device(device)
    cap = int(max_memory_gb * GB)
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        return min(total, cap) if cap else total
    return cap or os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def cap_process_memory(device: torch.device | str, max_memory_gb: float) -> None:
    """Emulate a card of max_memory_gb: cap this process's CUDA caching allocator at that less what lives
    outside it (the CUDA context, library workspaces, loaded kernels; memory of other processes on the GPU
    too). That grows as kernels load, so it counts as the larger of what is outside now and
    CUDA_CONTEXT_BYTES, the plan's figure for it. Off CUDA, nothing."""
    device = torch.device(device)
    if device.type != "cuda" or max_memory_gb <= 0:
        return
    free, total = torch.cuda.mem_get_info(device)  # creates the CUDA context if need be
    outside = max(total - free - torch.cuda.memory_reserved(device), CUDA_CONTEXT_BYTES)
    allocator = max_memory_gb * GB - outside
    if allocator <= 0:
        raise ValueError(f"max_memory_gb {max_memory_gb} leaves no memory for tensors: {outside / GB:.1f} GB of "
                         f"the GPU are used outside PyTorch's allocator")
    torch.cuda.set_per_process_memory_fraction(min(1.0, allocator / total), device)


def format_oom(plan: MemoryPlan, exc: BaseException) -> str:
    """The message for a torch.cuda.OutOfMemoryError caught during training under `plan`."""
    lines = [f"CUDA out of memory under the {plan.describe()}."]
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        lines.append(f"measured peak allocated: {torch.cuda.max_memory_allocated() / GB:.1f} GB "
                     f"(torch.cuda.max_memory_allocated; the CUDA context comes on top)")
    local_batch = plan.micro_batch_size * plan.accum_steps
    smaller = [m for m in range(plan.micro_batch_size - 1, 0, -1) if local_batch % m == 0]
    if smaller:
        lines.append(f"try --micro-batch-size {smaller[0]} (more accumulation steps, same global batch)")
    if plan.checkpoint_layers < plan.n_layer:
        more = min(plan.n_layer, plan.checkpoint_layers + max(1, plan.n_layer // 4))
        lines.append(f"or --checkpoint-layers {more} (recompute more blocks in the backward pass)")
    lines.append("or, if other processes share this GPU, --max-memory-gb with the memory actually free.")
    lines.append(f"torch said: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
    return "\n".join(lines)
