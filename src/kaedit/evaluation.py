"""What each evaluation of a run scores (:class:`Evaluation`): the step's batch, a stable
sample of the edits made so far, the first batch in full, a fixed neighbourhood set, and
on their steps text metrics and WILD scores. Built by :func:`kaedit.setup.build_session`,
called by the recipe (:mod:`kaedit.experiment`)."""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence

import numpy as np
from omegaconf import DictConfig, OmegaConf

from kaedit import wild
from kaedit.evaluate import Evaluator, Scorer, TextMetrics, aggregate
from kaedit.records import EditRequest
from kaedit.schedule import Schedule

#: What ``fixed/*`` logs of the fixed neighbourhood set (:class:`Evaluation`).
FIXED = ("specificity", "specificity_mag")


class Evaluation:
    """Scores this step's batch and a stable sample of all edits so far; on generation
    steps also their text metrics (``texts``).

    ``first_batch``: the planned edits (indices) re-checked in full at every evaluation
    beside the sample (``schedule.first_batch_in_full``), so first-batch retention is
    exact. ``fixed``: how many planned edits (the first of the seeded order, chosen before
    any edit; None = all) whose neighbourhood prompts are scored at every evaluation as
    ``fixed/specificity``: one set of prompts from step 0 to the end, where
    ``seen/specificity`` scores the neighbourhoods of a growing set. Both are scored by the
    same evaluator call path as ``seen`` (without text metrics); each request once."""

    def __init__(self, evaluator: Evaluator, scorer: Scorer, planned: Sequence[EditRequest],
                 sample: int | None, seed: int, texts: TextMetrics | None = None,
                 first_batch: Sequence[int] = (), fixed: int | None = 0) -> None:
        self.evaluator, self.scorer, self.texts = evaluator, scorer, texts
        # A fixed random order of the planned edits: seen/* at step t takes the first
        # `sample` of those already made, so the same edits are followed across steps.
        order = list(range(len(planned)))
        random.Random(seed).shuffle(order)
        self.order = order
        self.planned = planned
        self.sample = sample or len(planned)
        self.first_batch = sorted(first_batch)
        self.fixed = sorted(order[: len(planned) if fixed is None else int(fixed)])
        #: WILD evaluation (:mod:`kaedit.wild`), set by the runner when ``wild.every`` ≠ 0.
        self.wild: wild.WildEval | None = None

    def seen_indices(self, n_done: int) -> list[int]:
        pool = [i for i in self.order if i < n_done] if n_done else self.order
        return sorted(pool[: self.sample])

    def tracked_indices(self, n_done: int) -> list[int]:
        """The edits whose values go to ``retention.csv``: the sample and the first batch."""
        return sorted(set(self.seen_indices(n_done)) | set(self.first_batch))

    def indices(self, batch: Sequence[int], n_done: int) -> list[int]:
        """The planned edits an evaluation scores with text metrics: the batch and ``seen``."""
        return sorted(set(batch) | set(self.seen_indices(n_done)))

    def __call__(self, batch: Sequence[int], n_done: int,
                 generate: bool = False) -> tuple[dict, list[int], dict]:
        """``batch``: indices into the planned edits. Each request is scored once. Returns
        the aggregated row, the tracked edits (:meth:`tracked_indices`) and their values."""
        seen, tracked = self.seen_indices(n_done), self.tracked_indices(n_done)
        both = self.indices(batch, n_done)
        rest = sorted((set(tracked) | set(self.fixed)) - set(both))
        values = self.evaluator(self.scorer, [self.planned[i] for i in both],
                                texts=self.texts if generate else None)
        if rest:  # the first batch and the fixed set: scored alike, without text metrics
            more = self.evaluator(self.scorer, [self.planned[i] for i in rest])
            values = {k: np.concatenate([values.get(k, np.full(len(both), np.nan)),
                                         more.get(k, np.full(len(rest), np.nan))])
                      for k in dict.fromkeys([*values, *more])}
        at = {i: k for k, i in enumerate([*both, *rest])}

        def pick(idx: Sequence[int]) -> dict:
            rows = [at[i] for i in idx]
            return {k: v[rows] for k, v in values.items()}

        row = {**aggregate(pick(batch), "batch"), **aggregate(pick(seen), "seen")}
        if self.fixed:
            fixed = aggregate(pick(self.fixed), "fixed")
            row.update({f"fixed/{m}": fixed[f"fixed/{m}"] for m in FIXED
                        if f"fixed/{m}" in fixed})
        return row, tracked, pick(tracked)

    def wild_scores(self, batch: Sequence[int], n_done: int,
                    locality: bool = True) -> tuple[dict, dict]:
        """WILD scores (:attr:`wild`; locality only with ``locality``) of the batch and the
        tracked edits, each request once: ``wild/batch/*`` and ``wild/seen/*`` for the
        metrics row, and the tracked edits' values (:meth:`tracked_indices` order) as
        ``wild_<metric>`` for ``retention.csv``."""
        assert self.wild is not None
        tracked = self.tracked_indices(n_done)
        scored = sorted(set(batch) | set(tracked))
        values = self.wild([self.planned[i] for i in scored], locality=locality)
        at = {i: k for k, i in enumerate(scored)}

        def pick(idx: Sequence[int]) -> dict:
            return {k: v[[at[i] for i in idx]] for k, v in values.items()}

        row = {**wild.aggregate(pick(batch), "wild/batch"),
               **wild.aggregate(pick(self.seen_indices(n_done)), "wild/seen")}
        return row, {f"wild_{k}": v for k, v in pick(tracked).items()}


#: Config keys (dotted) that decide how a run is evaluated (its plan: the model, the
#: records, the schedule and its samples, the seed, and every evaluation setting): runs
#: that agree on all of them have the same step 0 and score the same edits the same way
#: (``kaedit.rescore`` scores them together; ``step0_from`` copies step 0 between them).
PLAN_KEYS = ("model.name", "model.load", "model.dtype", "dataset", "schedule", "seed",
             "data_root", "eval_batch_size", "generation", "perplexity", "wild", "templates")


def plan_difference(a: DictConfig, b: DictConfig) -> str | None:
    """The first of :data:`PLAN_KEYS` on which configs ``a`` and ``b`` differ (resolved;
    an absent key is None), or None when they agree on all."""

    def value(cfg: DictConfig, key: str) -> object:
        got = OmegaConf.select(cfg, key, default=None)
        return OmegaConf.to_container(got, resolve=True) if isinstance(got, DictConfig) \
            else got

    return next((k for k in PLAN_KEYS if value(a, k) != value(b, k)), None)


def generation_indices(schedule: Schedule, batches: Sequence[range],
                       evaluation: Evaluation) -> list[int]:
    """Planned edits that some generation step will evaluate (its batch and ``seen``)."""
    n_steps, ends = len(batches), [0, *itertools.accumulate(len(b) for b in batches)]
    due: set[int] = set()
    for step in range(n_steps + 1):
        if schedule.generation_at(step, n_steps):
            batch = range(ends[max(step, 1) - 1], ends[max(step, 1)])  # step 0: the first
            due.update(evaluation.indices(batch, ends[step]))
    return sorted(due)
