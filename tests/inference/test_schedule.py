"""inference.schedule: the warm-up, the cosine to 1 % of the peak, and the budget that wall time
spends as well as steps (so a run on a busy CPU still anneals inside --max-minutes)."""

from __future__ import annotations

import pytest

from inference.schedule import budget_fraction, learning_rate


def test_warm_up_is_linear_then_the_cosine_falls_to_one_percent() -> None:
    rates = [learning_rate(1e-3, step, 10, 100, elapsed=0.0, deadline=3600.0)
             for step in range(100)]
    assert rates[0] == pytest.approx(1e-4)
    assert rates[9] == pytest.approx(1e-3)
    after = rates[10:]
    assert all(a >= b for a, b in zip(after, after[1:], strict=False))
    assert rates[50] == pytest.approx(1e-3 * (0.01 + 0.99 * 0.5), rel=1e-9)  # the cosine midpoint
    assert learning_rate(1e-3, 100, 10, 100, 0.0, 3600.0) == pytest.approx(1e-5)
    assert learning_rate(1e-3, 500, 10, 100, 0.0, 3600.0) == pytest.approx(1e-5)


def test_wall_time_spends_the_budget_when_it_is_further_than_the_steps() -> None:
    assert budget_fraction(10, 100, elapsed=30.0, deadline=60.0) == pytest.approx(0.5)
    assert budget_fraction(80, 100, elapsed=30.0, deadline=60.0) == pytest.approx(0.8)
    assert budget_fraction(10, 100, elapsed=61.0, deadline=60.0) >= 1.0
    # half the time gone at step 20 of 100: the cosine is at its midpoint, not at 20 %
    assert learning_rate(1.0, 20, 5, 100, elapsed=30.0, deadline=60.0) == pytest.approx(0.505)
    assert budget_fraction(0, 0, 0.0, 0.0) == 0.0
