"""Learning-rate schedules."""

from __future__ import annotations

from collections.abc import Callable


def linear_decay(total_steps: int, final_ratio: float = 0.1) -> Callable[[int], float]:
    """LR factor falling linearly from 1 at step 0 to ``final_ratio`` at ``total_steps``.

    >>> f = linear_decay(10, 0.1)
    >>> [round(f(s), 2) for s in (0, 5, 10, 20)]
    [1.0, 0.55, 0.1, 0.1]
    """
    total = max(1, int(total_steps))

    def factor(step: int) -> float:
        return 1.0 - (1.0 - final_ratio) * min(step, total) / total

    return factor
