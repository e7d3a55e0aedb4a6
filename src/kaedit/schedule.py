"""Which edits go into which step: the sequential-editing plan (paper §2.3)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from kaedit.errors import ConfigError


def every_due(every: int | None, step: int, n_steps: int) -> bool:
    """The rule of the ``every`` settings (``perplexity.every``, ``wild.every``,
    ``schedule.generation_every``): 0 never; None step 0 and the last step; k step 0,
    every k-th step and the last."""
    if every is None:
        return step in (0, n_steps)
    return int(every) > 0 and (step in (0, n_steps) or step % int(every) == 0)


class ScheduleError(ConfigError):
    """The schedule does not fit the dataset or is malformed."""


@dataclass(frozen=True)
class Schedule:
    n_edits: int = 100
    batch_size: int = 10
    #: Explicit batch sizes (overrides ``batch_size``); must sum to ``n_edits``.
    batch_sizes: Sequence[int] | None = None
    #: Evaluate every this many steps (the last step is always evaluated; 0 = only last).
    eval_every: int = 1
    #: How many earlier edits ``seen/*`` re-checks per evaluation (0 or None = all).
    retention_sample: int | None = 100
    #: Also score every edit of the first batch at every evaluation (beside the sample),
    #: so ``retention/first_batch`` and the first row of ``retention.csv`` are exact;
    #: ``seen/*`` stays the sample's.
    first_batch_in_full: bool = False
    #: Neighbourhood prompts of this many planned edits (a seeded sample fixed before the
    #: first edit) scored at every evaluation: ``fixed/specificity`` -- specificity as a
    #: curve of the model, not of a growing set. 0 = off; None = every planned edit.
    fixed_sample: int | None = 0
    #: Skip this many records of the dataset before taking ``n_edits``.
    start: int = 0
    #: Save a checkpoint every this many steps (and at the last step); 0 = never.
    checkpoint_every: int = 1
    #: Generation metrics (fluency, consistency) on evaluated steps: None = step 0 and the
    #: last step only; k = also every k steps; 0 = never.
    generation_every: int | None = None

    def batches(self, n_available: int) -> list[range]:
        """Index ranges (into the dataset) of each step's batch, step 1 first."""
        if self.n_edits < 1:
            raise ScheduleError(f"schedule.n_edits={self.n_edits} must be at least 1")
        if self.fixed_sample is not None and self.fixed_sample < 0:
            raise ScheduleError(f"schedule.fixed_sample={self.fixed_sample} must be >= 0 "
                                "(0 = off, null = every planned edit)")
        if self.start < 0:
            raise ScheduleError(f"schedule.start={self.start} must be >= 0")
        if self.start + self.n_edits > n_available:
            raise ScheduleError(
                f"schedule.n_edits={self.n_edits} (from schedule.start={self.start}) is more "
                f"than the dataset's {n_available} records; use at most "
                f"{max(0, n_available - self.start)}"
            )
        if self.batch_sizes:
            sizes = [int(s) for s in self.batch_sizes]
            if any(s < 1 for s in sizes) or sum(sizes) != self.n_edits:
                raise ScheduleError(
                    f"schedule.batch_sizes={sizes} must be positive and sum to "
                    f"schedule.n_edits={self.n_edits} (they sum to {sum(sizes)})"
                )
        else:
            if self.batch_size < 1:
                raise ScheduleError(f"schedule.batch_size={self.batch_size} must be >= 1")
            full, rest = divmod(self.n_edits, self.batch_size)
            sizes = [self.batch_size] * full + ([rest] if rest else [])
        out, at = [], self.start
        for s in sizes:
            out.append(range(at, at + s))
            at += s
        return out

    def evaluate_at(self, step: int, n_steps: int) -> bool:
        """Step 0 (the unedited model) and the last step always; else every ``eval_every``."""
        if step in (0, n_steps):
            return True
        return self.eval_every > 0 and step % self.eval_every == 0

    def generation_at(self, step: int, n_steps: int) -> bool:
        """Whether an evaluated step also generates text (fluency, consistency)."""
        return self.evaluate_at(step, n_steps) and every_due(self.generation_every, step,
                                                             n_steps)
