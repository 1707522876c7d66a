"""Learning rate as a pure function of the global step: one OneCycle (cosine warm-up to the stage's peak over
`pct_start` of its steps, cosine annealing after; torch's OneCycleLR shape, div 25, final div 1e4) per
curriculum stage."""

from __future__ import annotations

import math

from ttt_speech.train.config import StageConfig


def one_cycle(t: int, steps: int, pct_start: float, div: float = 25.0, final_div: float = 1e4) -> float:
    """Factor in (0, 1] of the peak lr at step t of a `steps`-step cycle."""
    warm = max(1, int(pct_start * steps))
    lo, end = 1.0 / div, 1.0 / (div * final_div)
    if t < warm:
        return lo + (1.0 - lo) * (1 - math.cos(math.pi * t / warm)) / 2
    rest = max(1, steps - warm)
    return end + (1.0 - end) * (1 + math.cos(math.pi * min(t - warm, rest) / rest)) / 2


class Schedule:
    """Sets each optimizer group's lr from its `peak_lr` (scaled by the stage's lr / optim.lr) and the step."""

    def __init__(self, stages: list[StageConfig], base_lr: float, pct_start: float) -> None:
        self.stages, self.base_lr, self.pct_start = stages, base_lr, pct_start
        self.step = 0

    def stage_at(self, step: int) -> tuple[int, int]:
        """(stage index, step within the stage)."""
        for i, s in enumerate(self.stages):
            if step < s.steps:
                return i, step
            step -= s.steps
        raise IndexError("step past the last stage")

    def apply(self, optimizer, step: int) -> float:
        i, t = self.stage_at(step)
        stage = self.stages[i]
        scale = (stage.lr / self.base_lr if stage.lr is not None else 1.0) * one_cycle(t, stage.steps, self.pct_start)
        for group in optimizer.param_groups:
            group["lr"] = group["peak_lr"] * scale
        self.step = step
        return optimizer.param_groups[0]["lr"]

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
