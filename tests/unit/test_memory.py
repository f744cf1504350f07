"""charlm.memory: the memory model against the real GPT, its monotonicity, and the planner's choices."""
import re
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from charlm.config import resolve
from charlm.memory import (
    DROPOUT_MASK_BYTES,
    GB,
    MemoryPlan,
    MemoryPlanError,
    block_bytes_per_token,
    cap_process_memory,
    device_capacity_bytes,
    estimate_peak_bytes,
    format_oom,
    head_bytes_per_token,
    memory_breakdown,
    plan_memory,
    uses_autocast,
)
from charlm.model import GPT, parameter_counts

DEEP = resolve("deep", vocab_size=256, attn="sdpa")  # 32 layers, width 512, context 512, global batch 64
SMALL = dict(n_layer=2, n_head=4, n_embd=64, block_size=16, vocab_size=256, dropout=0.0)


# --- the model of memory against the real GPT ----------------------------------------------------------


@pytest.mark.parametrize("overrides", [{}, {"bias": False}, {"pos_embedding": "rope", "tipa": True},
                                       {"norm": "rmsnorm"}, {"mlp": "swiglu"}, {"mlp": "relu2", "qk_norm": True}])
def test_parameter_counts_match_the_gpt(overrides):
    cfg = resolve("base", **SMALL | overrides)
    model = GPT.from_config(cfg)
    linear = sum(p.numel() for m in model.modules() if isinstance(m, torch.nn.Linear) for p in m.parameters())
    assert parameter_counts(cfg.model) == (sum(p.numel() for p in model.parameters()), linear)
    assert memory_breakdown(cfg, 1, 0)["model_state"] == 16 * sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("variant", ["modern", "modern,tipa"])
@pytest.mark.parametrize("mlp", ["relu2", "swiglu"])
def test_muon_state_is_one_buffer_per_hidden_matrix(variant, mlp):
    """Muon keeps a momentum buffer per matrix (4 bytes a weight), AdamW two moments (8): counted from the
    optimizer's real state after one step."""
    cfg = resolve(variant, **SMALL | {"mlp": mlp})
    model = GPT.from_config(cfg)
    optimizer = model.configure_optimizer(cfg)
    idx = torch.randint(0, cfg.model.vocab_size, (2, cfg.model.block_size))
    _, lm_loss, tipa_loss = model(idx, idx, torch.zeros_like(idx))
    (lm_loss if tipa_loss is None else lm_loss + tipa_loss).backward()  # every parameter gets a gradient
    optimizer.step()
    state = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values() if t.dim() > 0)
    weights_and_grads = 8 * sum(p.numel() for p in model.parameters())
    assert memory_breakdown(cfg, 1, 0)["model_state"] == weights_and_grads + state


def saved_bytes(cfg, batch: int) -> int:
    """Bytes of the distinct non-parameter storages autograd saves in one training forward pass on the CPU."""
    torch.manual_seed(0)
    model = GPT.from_config(cfg).train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    idx, targets = torch.randint(0, cfg.model.vocab_size, (2, batch, cfg.model.block_size))
    tipa_targets = torch.randint(0, cfg.model.tipa_max + 1, idx.shape) if cfg.model.tipa else None
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=uses_autocast(cfg))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
        model(idx, targets, tipa_targets)
    return sum(saved.values())


def cpu_minus_cuda_bytes_per_token(cfg) -> int:
    """What the CPU saves per token beyond what the model (of CUDA) predicts."""
    act = 2 if uses_autocast(cfg) else 4
    full_blocks = cfg.model.n_layer - max(cfg.checkpoint_layers, 0)
    extra = 0
    if cfg.dropout > 0:  # CPU dropout keeps its mask in the input's dtype (fp32 after the embedding), CUDA a byte
        extra += (2 * full_blocks * (act - DROPOUT_MASK_BYTES) + (4 - DROPOUT_MASK_BYTES)) * cfg.model.n_embd
    if cfg.attn == "naive" and uses_autocast(cfg):  # CPU autocast runs softmax in bf16: no fp32 probabilities
        extra -= 4 * cfg.model.n_head * cfg.model.block_size * full_blocks
    return extra


@pytest.mark.parametrize("overrides", [
    {"dtype": "bfloat16"},
    {"dtype": "bfloat16", "dropout": 0.1},
    {"dtype": "bfloat16", "pos_embedding": "rope", "tipa": True},
    {"dtype": "bfloat16", "checkpoint_layers": 1},
    {"dtype": "bfloat16", "checkpoint_layers": 2},
    {"dtype": "bfloat16", "attn": "naive"},
    {"dtype": "float32", "dropout": 0.1, "checkpoint_layers": 1},
    {"dtype": "float32", "attn": "naive"},
    {"dtype": "bfloat16", "pos_embedding": "rope", "attn": "triton", "rope_impl": "fused", "n_head": 2},
    {"dtype": "bfloat16", "pos_embedding": "rope", "attn": "triton", "rope_impl": "triton"},  # (the interpreter)
    {"dtype": "bfloat16", "vocab_size": 2048},  # chunked LM loss (charlm.loss)
    {"dtype": "float32", "vocab_size": 2048, "tipa": True},
    {"variant": "modern", "dtype": "bfloat16"},
    {"variant": "modern", "dtype": "float32", "mlp": "swiglu"},
    {"variant": "modern", "dtype": "bfloat16", "mlp": "gelu", "qk_norm": False, "pos_embedding": "learned"},
    {"variant": "modern", "dtype": "bfloat16", "mlp": "swiglu", "checkpoint_layers": 1},
])
def test_activation_terms_match_what_autograd_saves(overrides):
    """Every term of the per-token model, to the byte: what two batch sizes' saved tensors differ by.
    (The difference cancels what does not grow with the batch: autocast's weight casts, masks, RoPE tables.)"""
    overrides = dict(overrides)
    cfg = resolve(overrides.pop("variant", "base"), **SMALL | {"attn": "sdpa"} | overrides)
    per_token = (saved_bytes(cfg, 2) - saved_bytes(cfg, 1)) / cfg.model.block_size
    k = max(cfg.checkpoint_layers, 0)
    # A checkpointed layer keeps only its fp32 input.
    blocks = (cfg.model.n_layer - k) * block_bytes_per_token(cfg) + k * 4 * cfg.model.n_embd
    assert per_token == blocks + head_bytes_per_token(cfg)[0] + cpu_minus_cuda_bytes_per_token(cfg)


class LiveBytes(TorchDispatchMode):
    """Tracks the bytes of the storages that ops create under the mode while they live, and their peak.
    (Views and in-place results share an input's storage and are not new.)"""

    def __init__(self):
        super().__init__()
        self.live, self.now, self.peak = {}, 0, 0

    def _free(self, key):
        self.now -= self.live.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        seen = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen | self.live.keys():
                storage = t.untyped_storage()
                self.live[storage.data_ptr()] = storage.nbytes()
                self.now += storage.nbytes()
                self.peak = max(self.peak, self.now)
                weakref.finalize(storage, self._free, storage.data_ptr())
        return out


@pytest.mark.parametrize("overrides", [
    {}, {"checkpoint_layers": 2}, {"attn": "naive", "dtype": "float32"}, {"vocab_size": 6000, "tipa": True},
    {"vocab_size": 6000, "block_size": 256}])  # the last: several chunks of the LM loss (charlm.loss)
def test_estimate_bounds_the_measured_peak(overrides):
    """The peak of a forward and backward pass on the CPU (every tensor the step creates: activations,
    weight casts, transients, gradients) is below the estimate of those terms, and not far below."""
    cfg = resolve("base", **SMALL | {"n_layer": 4, "block_size": 64, "dtype": "bfloat16"} | overrides)
    model = GPT.from_config(cfg).train()
    batch = 4
    idx, targets = torch.randint(0, cfg.model.vocab_size, (2, batch, cfg.model.block_size))
    tipa_targets = torch.randint(0, cfg.model.tipa_max + 1, idx.shape) if cfg.model.tipa else None
    tracker = LiveBytes()
    with tracker:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=uses_autocast(cfg)):
            lm_loss, tipa_loss = model(idx, targets, tipa_targets)[1:]
        (lm_loss if tipa_loss is None else lm_loss + tipa_loss).backward()
    terms = memory_breakdown(cfg, batch, max(cfg.checkpoint_layers, 0))
    gradients = 4 * parameter_counts(cfg.model)[0]
    predicted = terms["activations"] + terms["weight_casts"] + terms["loss_chunk"] + gradients
    del lm_loss, tipa_loss
    assert tracker.now == gradients  # all that outlives the step
    assert 0.6 * predicted < tracker.peak <= predicted


# --- monotonicity ------------------------------------------------------------------------------------


def test_more_micro_batch_needs_more_memory():
    peaks = [estimate_peak_bytes(DEEP, m, 0) for m in (1, 2, 4, 8, 16, 32, 64)]
    assert peaks == sorted(peaks) and len(set(peaks)) == len(peaks)


def test_checkpointing_more_layers_needs_less_memory():
    peaks = [estimate_peak_bytes(DEEP, 8, k) for k in range(DEEP.model.n_layer)]
    assert all(later < earlier for earlier, later in zip(peaks, peaks[1:]))
    checkpointed, stored = (memory_breakdown(DEEP, 8, k)["activations"] for k in (DEEP.model.n_layer, 0))
    assert checkpointed < stored / 4


def test_naive_attention_needs_more_than_flash_at_context_512():
    naive = DEEP.replace(attn="naive")
    flash = block_bytes_per_token(DEEP)
    # At T = 512 the (B, H, T, T) probabilities, fp32 and bf16, outweigh everything else a block keeps.
    assert block_bytes_per_token(naive) > 2 * flash
    assert estimate_peak_bytes(naive, 16, 0) > estimate_peak_bytes(DEEP, 16, 0)


def test_deep_fits_40gb_without_checkpointing():
    """Issue 6's target, from first principles: weights, gradients and AdamW's states take 16 bytes per
    parameter, and each block keeps at least the fp32 residual twice and the 4C MLP hidden twice in bf16."""
    plan = plan_memory(DEEP, 40 * GB)
    assert plan.checkpoint_layers == 0 and plan.micro_batch_size >= 8
    params, _ = parameter_counts(DEEP.model)
    tokens = plan.micro_batch_size * DEEP.model.block_size
    floor = 16 * params + tokens * DEEP.model.n_layer * (2 * 4 + 2 * 4 * 2) * DEEP.model.n_embd
    assert floor < plan.predicted_peak_bytes <= 40 * GB


# --- the planner -------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch_size, fits, expected", [(64, 16, 16), (48, 16, 16), (48, 13, 12), (64, 63, 32)])
def test_planner_picks_the_largest_fitting_divisor(batch_size, fits, expected):
    """Capacity is exactly the estimate of micro-batch `fits`; the plan is the largest divisor <= fits."""
    cfg = DEEP.replace(batch_size=batch_size)
    plan = plan_memory(cfg, estimate_peak_bytes(cfg, fits, 0))
    assert (plan.micro_batch_size, plan.accum_steps, plan.checkpoint_layers) == (expected, batch_size // expected, 0)
    assert plan.predicted_peak_bytes == estimate_peak_bytes(cfg, expected, 0)


def test_planner_checkpoints_only_when_micro_batch_one_does_not_fit():
    assert plan_memory(DEEP, estimate_peak_bytes(DEEP, 1, 0)).checkpoint_layers == 0
    plan = plan_memory(DEEP, estimate_peak_bytes(DEEP, 1, 0) - 1)
    assert (plan.micro_batch_size, plan.checkpoint_layers) == (1, 1)
    plan = plan_memory(DEEP, estimate_peak_bytes(DEEP, 1, 5))
    assert (plan.micro_batch_size, plan.accum_steps, plan.checkpoint_layers) == (1, 64, 5)


def test_planner_honours_overrides():
    plan = plan_memory(DEEP.replace(micro_batch_size=8), 80 * GB)
    assert (plan.micro_batch_size, plan.accum_steps, plan.checkpoint_layers) == (8, 8, 0)
    plan = plan_memory(DEEP.replace(checkpoint_layers=4), 80 * GB)
    assert (plan.micro_batch_size, plan.checkpoint_layers) == (64, 4)
    plan = plan_memory(DEEP.replace(micro_batch_size=64), estimate_peak_bytes(DEEP, 64, 10))
    assert (plan.micro_batch_size, plan.checkpoint_layers) == (64, 10)  # checkpointing makes the fixed batch fit


def test_fixed_micro_batch_that_does_not_fit_names_one_that_does():
    cfg = DEEP.replace(micro_batch_size=64, checkpoint_layers=0)
    with pytest.raises(MemoryPlanError, match="--micro-batch-size 16 --checkpoint-layers 0 would fit"):
        plan_memory(cfg, estimate_peak_bytes(DEEP, 16, 0))


def test_nothing_fits_says_what_to_change():
    with pytest.raises(MemoryPlanError) as error:
        plan_memory(DEEP, 2 * GB)
    message = str(error.value)
    assert "micro-batch 1 with 32 of 32 layers checkpointed" in message and "2.0 GB" in message
    assert "--n-layer" in message and "--block-size" in message and "more memory" in message


def test_world_size_splits_the_batch():
    plan = plan_memory(DEEP, 80 * GB, world_size=4)
    assert plan.micro_batch_size * plan.accum_steps * plan.world_size == DEEP.batch_size
    assert plan.micro_batch_size == 16  # the whole per-rank batch fits on 80 GB
    # DDP adds no gradient copy: charlm.train builds it with gradient_as_bucket_view=True
    with pytest.raises(ValueError, match="divisible by the number of ranks"):
        plan_memory(DEEP, 80 * GB, world_size=3)
    with pytest.raises(ValueError, match="must divide the per-rank batch"):
        plan_memory(DEEP.replace(micro_batch_size=32), 80 * GB, world_size=4)


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="checkpoint_layers must be in 0..n_layer"):
        plan_memory(DEEP.replace(checkpoint_layers=33), 80 * GB)
    with pytest.raises(ValueError, match="vocab_size must be set"):
        plan_memory(DEEP.replace(vocab_size=0), 80 * GB)


def test_describe():
    plan = MemoryPlan(16, 4, 0, int(31.2 * GB), 40 * GB, 1, 32)
    assert plan.describe() == ("memory plan: micro-batch 16 x 4 accumulation steps (global batch 64 over 1 rank), "
                               "activation checkpointing on 0 of 32 layers, predicted peak 31.2 GB of 40.0 GB")


# --- the device --------------------------------------------------------------------------------------


def test_device_capacity_on_the_cpu():
    assert device_capacity_bytes("cpu", 40) == 40 * GB
    assert device_capacity_bytes(torch.device("cpu")) > GB  # the machine's RAM
    with pytest.raises(ValueError, match="max_memory_gb"):
        device_capacity_bytes("cpu", -1)
    cap_process_memory("cpu", 40)  # nothing to cap


def test_format_oom_names_the_plan_and_the_fixes():
    plan = plan_memory(DEEP, 40 * GB)
    message = format_oom(plan, torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert plan.describe() in message and "Tried to allocate 2.00 GiB" in message
    assert re.search(r"--micro-batch-size 32\b", message) and re.search(r"--checkpoint-layers 8\b", message)
    assert "--max-memory-gb" in message
