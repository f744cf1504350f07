"""The optimizers and their schedule: Muon for the hidden weight matrices beside AdamW for everything else
(one optimizer for the trainer), and the learning rate at each step (lr_at).

Muon (torch.optim.Muon) orthogonalises each matrix's momentum with Newton-Schulz iterations; it is defined
for 2-D weights of hidden layers only. Embeddings, output heads, norm gains and biases stay with AdamW:
their gradients are sparse in rows (embeddings) or not matrices of a linear map between hidden states.
"""
import math

import torch

from charlm.config import Config


class MuonAdamW:
    """Steps a Muon and a fused AdamW together: one `param_groups`, `state_dict`, `zero_grad` and `step`.

    Every group keeps its own peak LR as `peak_lr` (the trainer scales it by the schedule). The trainer's
    non-finite-step guard sets `found_inf`: fused AdamW honours it on the device; Muon has no such flag, so
    its step is skipped on the host, which costs one device sync per step (none on the CPU).
    """

    def __init__(self, muon_params, adamw_groups: list[dict], *, muon_lr: float, muon_momentum: float,
                 weight_decay: float, lr: float, betas: tuple[float, float]):
        if not hasattr(torch.optim, "Muon"):
            raise ValueError(f"--optimizer muon needs torch.optim.Muon (torch >= 2.9); "
                             f"this is torch {torch.__version__}")
        self.muon = torch.optim.Muon(muon_params, lr=muon_lr, momentum=muon_momentum, weight_decay=weight_decay)
        self.adamw = torch.optim.AdamW(adamw_groups, lr=lr, betas=betas, fused=True)
        for group in self.muon.param_groups:
            group["peak_lr"] = muon_lr
        for group in self.adamw.param_groups:
            group["peak_lr"] = lr
        self.found_inf: torch.Tensor | None = None

    @property
    def param_groups(self) -> list[dict]:
        return self.muon.param_groups + self.adamw.param_groups

    @property
    def state(self):
        return {**self.muon.state, **self.adamw.state}

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("MuonAdamW.step takes no closure")
        self.adamw.found_inf = self.found_inf
        self.adamw.step()
        if self.found_inf is None or not bool(self.found_inf):
            self.muon.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.muon.zero_grad(set_to_none)
        self.adamw.zero_grad(set_to_none)

    def state_dict(self) -> dict:
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if set(state) != {"muon", "adamw"}:
            raise KeyError(f"expected the state of Muon and AdamW, got keys {sorted(state)}")
        peaks = [group["peak_lr"] for group in self.param_groups]  # this run's config sets the LRs
        self.muon.load_state_dict(state["muon"])
        self.adamw.load_state_dict(state["adamw"])
        for group, peak in zip(self.param_groups, peaks):
            group["peak_lr"] = peak


def is_hidden_matrix(name: str, param: torch.Tensor) -> bool:
    """Muon's parameters: the 2-D weights inside the transformer blocks (not embeddings, heads or gains)."""
    return param.dim() == 2 and name.startswith("blocks.")


def lr_at(step: int, cfg: Config, peak: float | None = None) -> float:
    """Linear warm-up to the peak (default learning_rate), then decay to min_lr_ratio of it at lr_decay_iters
    (default max_iters), constant after that (an --extend'ed run's tail). The decay is a cosine, or with
    lr_schedule wsd the peak held until the last decay_fraction of the steps and a linear decay over them."""
    peak = cfg.learning_rate if peak is None else peak
    if step < cfg.warmup_iters:
        return peak * (step + 1) / cfg.warmup_iters
    decay_end = cfg.lr_decay_iters or cfg.max_iters
    if cfg.lr_schedule == "wsd":
        decay_start = max(cfg.warmup_iters, decay_end - cfg.decay_fraction * decay_end)
        done = min(1.0, max(0.0, step - decay_start) / max(1.0, decay_end - decay_start))
        return peak * (1 - (1 - cfg.min_lr_ratio) * done)
    done = min(1.0, (step - cfg.warmup_iters) / max(1, decay_end - cfg.warmup_iters))
    ratio = cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * done))
    return peak * ratio
