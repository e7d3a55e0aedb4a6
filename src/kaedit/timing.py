"""Per-stage wall-clock accounting, owned by one run (methods time their stages with it)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field


@dataclass
class Stopwatch:
    """Accumulates seconds per stage name until :meth:`take` hands them over.

    ``with clock("targets"): ...`` adds the block's wall time to ``"targets"``, also when
    the block raises. Nested stages are counted in each (callers keep them disjoint).
    """

    totals: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.totals[stage] = self.totals.get(stage, 0.0) + time.perf_counter() - t0

    def take(self) -> dict[str, float]:
        """The totals so far, and start again from zero."""
        out, self.totals = self.totals, {}
        return out
