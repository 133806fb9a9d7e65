"""Checkpoint averaging: an exponential moving average (EMA) of the weights during training.

After every optimizer step each parameter's average moves towards it,
``avg ← avg + (1 − d)(w − avg)`` (``torch.lerp``: an average of identical weights stays those
weights exactly), with the decay warmed up, ``d = min(ema_decay, (1 + n) / (10 + n))`` after
``n`` updates, so that the random initial weights fade within the first few dozen batches of a
short run. Buffers are copied as they are. The trainer validates the averaged weights and saves
them as ``model_state_dict`` of the published layout; its resume checkpoint holds the average
and ``n``, so a resumed run continues it exactly.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


class WeightAverage:
    """The EMA of one model's parameters (on the model's device)."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.updates = 0
        self.params = {n: p.detach().clone() for n, p in model.named_parameters()}

    def rate(self) -> float:
        """The decay of the next update (warmed up)."""
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        d = self.rate()
        for n, p in model.named_parameters():
            self.params[n].lerp_(p.detach(), 1.0 - d)
        self.updates += 1

    @contextlib.contextmanager
    def applied(self, model: torch.nn.Module) -> Iterator[None]:
        """The model holds the averaged weights inside the block, its own again after it."""
        own = {n: p.detach().clone() for n, p in model.named_parameters()}
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(self.params[n])
        try:
            yield
        finally:
            with torch.no_grad():
                for n, p in model.named_parameters():
                    p.copy_(own[n])

    def state_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates,
                "params": {n: t.detach().cpu() for n, t in self.params.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.decay, self.updates = float(state["decay"]), int(state["updates"])
        for n, t in state["params"].items():
            self.params[n].copy_(t)
