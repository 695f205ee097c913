"""Learning-rate schedules as pure functions of the step (so resuming needs only the step).

* ``cosine``: linear warmup from 0 over ``warmup_steps``, then cosine decay to ``lr * min_lr_ratio`` at
  ``total_steps`` (the paper's recipe: 2000 warmup steps, cosine to 0).
* ``wsd`` (warmup-stable-decay): linear warmup, constant, then linear decay to ``lr * min_lr_ratio`` over
  the last ``decay_fraction`` of the steps.
* ``constant``: linear warmup, then constant.
"""

from __future__ import annotations

import math


def lr_factor(step: int, *, schedule: str, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0,
              decay_fraction: float = 0.2) -> float:
    """Multiplier of the peak learning rate for optimizer step ``step`` (0-based)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        span = max(1, total_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    if schedule == "wsd":
        decay_steps = int(round(decay_fraction * total_steps))
        decay_start = total_steps - decay_steps
        if step < decay_start or decay_steps == 0:
            return 1.0
        progress = min(1.0, (step - decay_start + 1) / decay_steps)
        return 1.0 - (1 - min_lr_ratio) * progress
    raise ValueError(f"optim.schedule: unknown schedule {schedule!r}; use cosine, wsd or constant")
