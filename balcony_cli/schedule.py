"""Learning-rate schedules: linear warm-up, then cosine decay to zero, over steps or over a time budget."""

from __future__ import annotations

import math
from typing import Any

import torch


class TimeBudgetSchedule:
    """Linear warm-up, then cosine decay to zero, over whichever budget runs out first: steps or seconds.

    With a wall-clock budget, the number of steps is not known in advance, because it depends on the
    throughput of the setting under test. A cosine over max_steps would end such a run at a high learning
    rate, and an estimate from the first steps' timing would inherit their noise (warm-up, other load on
    the machine). So the schedule follows progress = max(step / max_steps, seconds / max_seconds), where
    seconds counts only optimiser steps, and every setting ends its budget with the rate decayed to zero.

    The progress is part of the state, and the seconds come from the training checkpoint, so a resumed
    run continues the same schedule. A resumed run does not repeat the original run's learning rates
    exactly, because they depend on measured time.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, warmup_ratio: float, max_steps: int, max_seconds: float):
        self.optimizer = optimizer
        self.warmup_ratio = warmup_ratio
        self.max_steps = max_steps
        self.max_seconds = max_seconds
        self.base_lrs = [group["lr"] for group in optimizer.param_groups]
        self.progress = 0.0
        self._apply()

    def factor(self) -> float:
        """Return the share of the peak learning rate at the current progress."""
        progress = min(self.progress, 1.0)
        if progress < self.warmup_ratio:
            return progress / self.warmup_ratio
        decay = (progress - self.warmup_ratio) / (1.0 - self.warmup_ratio)
        return 0.5 * (1.0 + math.cos(math.pi * decay))

    def update(self, step: int, seconds: float) -> None:
        """Set the learning rate for the next step from the steps taken and the seconds they took."""
        self.progress = max(step / self.max_steps, seconds / self.max_seconds)
        self._apply()

    def _apply(self) -> None:
        factor = self.factor()
        for group, base_lr in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base_lr * factor

    def get_last_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        return {"progress": self.progress, "base_lrs": list(self.base_lrs)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.progress = state["progress"]
        self.base_lrs = list(state["base_lrs"])
        self._apply()
