"""Cross-entropy of the LM head without materialising every logit, for large vocabularies.

With the 256 byte values the (tokens, V) logits of a micro-batch are small. In unicode mode (about 6,000
code points) a DEEP micro-batch of 16 x 512 tokens has 200 MB of fp32 logits, and cross-entropy keeps as
much again in log-probabilities and gradients. `linear_cross_entropy` computes head and loss a chunk of
rows at a time and, like Liger-Kernel's fused linear cross-entropy, the chunk's gradients with respect to
the hidden states and the head's weight at the same time: at most one chunk of logits exists at once,
nothing is recomputed, and backward only scales the gradients already made.

Numerics follow autocast: under it the two matmuls run in its dtype (bf16 on CUDA) and the softmax in
fp32, as F.linear + F.cross_entropy do; the weight's gradient is accumulated over chunks in fp32.
"""
import torch

IGNORE_INDEX = -100  # F.cross_entropy's default: targets of padding (charlm.loader) are ignored
CHUNK_ABOVE_VOCAB = 1024  # smaller vocabularies: plain logits + F.cross_entropy is as cheap
CHUNK_LOGITS = 2**22  # fp32 logits per chunk (16 MB): rows per chunk = CHUNK_LOGITS // V


def uses_chunked_loss(vocab_size: int) -> bool:
    return vocab_size > CHUNK_ABOVE_VOCAB


def chunk_rows(vocab_size: int) -> int:
    return max(1, CHUNK_LOGITS // vocab_size)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def _chunk_logits(x: torch.Tensor, weight: torch.Tensor, compute: torch.dtype) -> torch.Tensor:
    return (x.to(compute) @ weight.to(compute).T).float()


def token_nll(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-row next-token loss in nats (no gradient): x (N, C) hidden states, weight (V, C), targets (N,);
    0 where the target is IGNORE_INDEX. For evaluation."""
    compute, rows = _compute_dtype(x), chunk_rows(weight.shape[0])
    nll = torch.empty(targets.shape, dtype=torch.float32, device=x.device)
    with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
        for start in range(0, x.shape[0], rows):
            logits = _chunk_logits(x[start:start + rows], weight, compute)
            nll[start:start + rows] = torch.nn.functional.cross_entropy(
                logits, targets[start:start + rows], ignore_index=IGNORE_INDEX, reduction="none")
    return nll


def _chunk_loss_and_grads(xc, w, targets, keep, compute):
    """(sum of losses, d sum / d xc, d sum / d w) of one chunk of rows; its logits die on return."""
    logits = _chunk_logits(xc, w, compute)
    lse = logits.logsumexp(-1)
    loss_sum = ((lse - logits.gather(1, targets).squeeze(1)) * keep.squeeze(1)).sum()
    # d(sum of losses)/d logits = softmax - one_hot(target), zero on ignored rows; in place of the logits.
    grad = logits.sub_(lse[:, None]).exp_()
    grad.scatter_add_(1, targets, torch.full_like(targets, -1, dtype=grad.dtype))
    grad = grad.mul_(keep).to(compute)
    return loss_sum, grad @ w, grad.T @ xc


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, targets):
        compute, rows = _compute_dtype(x), chunk_rows(weight.shape[0])
        valid = targets != IGNORE_INDEX
        safe_targets = torch.where(valid, targets, 0)
        loss_sum = torch.zeros((), dtype=torch.float32, device=x.device)
        grad_x = torch.empty_like(x)
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        with torch.autocast(x.device.type, enabled=False):
            w = weight.to(compute)
            for start in range(0, x.shape[0], rows):
                chunk = slice(start, start + rows)
                loss, grad_x[chunk], chunk_grad_weight = _chunk_loss_and_grads(
                    x[chunk].to(compute), w, safe_targets[chunk, None], valid[chunk, None], compute)
                loss_sum += loss
                grad_weight += chunk_grad_weight
        scale = 1.0 / valid.sum()  # the mean over valid rows, as F.cross_entropy takes it
        ctx.save_for_backward(grad_x.mul_(scale), grad_weight.mul_(scale).to(weight.dtype))
        return loss_sum * scale

    @staticmethod
    def backward(ctx, grad_loss):
        grad_x, grad_weight = ctx.saved_tensors
        return grad_x * grad_loss, grad_weight * grad_loss, None


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """F.cross_entropy(x @ weight.T, targets) (mean over rows whose target is not IGNORE_INDEX), computed
    in chunks of rows: x (N, C), weight (V, C), targets (N,) int64."""
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(x, weight, targets)
    nll = token_nll(x, weight, targets)
    return nll.sum() / (targets != IGNORE_INDEX).sum()
