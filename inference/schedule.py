"""The training budget and learning-rate schedule shared by every recipe (``inference.train``
for US and SM, ``inference.train_mammo`` for the MG patch model).

A run has two budgets, a number of optimiser steps and a wall-time deadline; whichever is
further along decides how far the schedule has gone. Driving the cosine by wall time as well
as steps lets a run on a busy shared CPU still finish its annealing inside its time budget, at
the cost of bit-exact reproducibility between runs.
"""

from __future__ import annotations

import math


def budget_fraction(step: int, total_steps: int, elapsed: float, deadline: float) -> float:
    """Fraction of the training budget used: by steps or by wall time (seconds), whichever is
    further; 1.0 or more means the budget is spent."""
    return max(step / max(total_steps, 1), elapsed / max(deadline, 1e-9))


def learning_rate(
    peak: float, step: int, warmup_steps: int, total_steps: int, elapsed: float, deadline: float
) -> float:
    """Linear warm-up over ``warmup_steps``, then cosine decay to 1 % of ``peak`` over the
    budget (``budget_fraction``)."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    fraction = min(budget_fraction(step, total_steps, elapsed, deadline), 1.0)
    return peak * (0.01 + 0.99 * 0.5 * (1.0 + math.cos(math.pi * fraction)))
