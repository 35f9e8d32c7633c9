"""The Downpour master's watch for divergence over each replica's recent steps."""

from __future__ import annotations

from collections import deque

DIVERGED_WINDOW = 8
"""Steps of a replica over which most losses being NaN or Inf means the run diverged."""


class DivergenceWatch:
    """Per replica, the steps of its last progress notes covering ``DIVERGED_WINDOW`` steps
    or more, and how many of them had a NaN or Inf loss. A bad batch now and then is only
    counted (its push rejected); most of a replica's recent steps bad is divergence."""

    def __init__(self) -> None:
        self.recent: dict[int, deque[tuple[int, int]]] = {}  # replica -> (steps, non-finite)

    def add(self, replica: int, steps: int, nonfinite_steps: int) -> tuple[int, int] | None:
        """Note a replica's progress; returns ``(bad, steps)`` of its recent steps if most of
        them (two or more) were bad, else None."""
        recent = self.recent.setdefault(replica, deque())
        recent.append((steps, nonfinite_steps))
        while len(recent) > 1 and sum(s for s, _ in recent) - recent[0][0] >= DIVERGED_WINDOW:
            recent.popleft()
        steps, bad = sum(s for s, _ in recent), sum(b for _, b in recent)
        return (bad, steps) if bad >= 2 and 2 * bad > steps else None
