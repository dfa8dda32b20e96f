"""The exponential moving average (EMA) of a model's weights: the weights a trained
diffusion model samples with. Taught in chapter 5, "The exponential moving average of the
weights"."""
from __future__ import annotations

import copy

import torch


class EMA:
    """Exponential moving average of a model's parameters (and a copy of its buffers).

    After update n (counting from 0) the decay is ``min(decay, (1 + n) / (10 + n))``, so the
    average follows the fast-changing early weights and settles to ``decay`` later.
    Taught in chapter 5, "The exponential moving average of the weights"; its multi-tensor
    update in chapter 11, "Fewer, bigger kernels: fused AdamW and the multi-tensor EMA".
    """

    def __init__(self, model: torch.nn.Module, decay: float = 0.9999):
        self.decay = decay
        self.num_updates = 0
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    def current_decay(self) -> float:
        n = self.num_updates
        return min(self.decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        d = self.current_decay()
        # ema <- ema + (1 - d) (p - ema) = d ema + (1 - d) p, for all parameters in a few kernels
        torch._foreach_lerp_(list(self.model.parameters()), [p.detach() for p in model.parameters()], 1.0 - d)
        for ema_b, b in zip(self.model.buffers(), model.buffers()):
            ema_b.copy_(b)
        self.num_updates += 1

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "num_updates": self.num_updates, "decay": self.decay}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.num_updates = state["num_updates"]
        self.decay = state["decay"]
