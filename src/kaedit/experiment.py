"""The sequential-edit recipe, top to bottom (paper §2.3).

Build the parts in order (data, schedule, model, statistics, method, fusion, evaluation,
trackers), evaluate the unedited model (step 0), then for each step t: compute Δ on
M_{t-1} → fuse → check → apply → evaluate → log. Everything the run owns (statistics,
tokenisation caches, random generators) is created here; nothing is module-level.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from kaedit import data
from kaedit.evaluate import Evaluator, Scorer, aggregate
from kaedit.methods.base import EditContext, EditMethod
from kaedit.methods.core import context_templates
from kaedit.models import LoadedModel, load_model
from kaedit.records import Deltas, EditRequest, StepOutcome
from kaedit.schedule import Schedule
from kaedit.stats import CovarianceStore
from kaedit.tracking import Trackers, atomic_write
from kaedit.weights import add_into, apply_deltas, delta_problem

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]


def resolve_data_root(cfg: DictConfig) -> None:
    """Make a relative ``data_root`` absolute: from the working dir, else the repo root."""
    root = Path(str(cfg.data_root)).expanduser()
    if not root.is_absolute():
        here = Path.cwd() / root
        root = here if here.exists() or not (REPO_ROOT / root).exists() else REPO_ROOT / root
    cfg.data_root = str(root.resolve())


def step_generator(seed: int, step: int) -> torch.Generator:
    """The generator for step ``step``'s randomness (drop masks): a pure function of both."""
    return torch.Generator().manual_seed(int(seed) * 1_000_003 + int(step))


class Evaluation:
    """Scores this step's batch and a stable sample of all edits so far."""

    def __init__(self, evaluator: Evaluator, scorer: Scorer, planned: Sequence[EditRequest],
                 sample: int | None, seed: int) -> None:
        self.evaluator, self.scorer = evaluator, scorer
        # A fixed random order of the planned edits: seen/* at step t takes the first
        # `sample` of those already made, so the same edits are followed across steps.
        order = list(range(len(planned)))
        random.Random(seed).shuffle(order)
        self.order = order
        self.planned = planned
        self.sample = sample or len(planned)

    def seen_indices(self, n_done: int) -> list[int]:
        pool = [i for i in self.order if i < n_done] if n_done else self.order
        return sorted(pool[: self.sample])

    def __call__(self, batch: Sequence[int], n_done: int) -> tuple[dict, list[int], dict]:
        """``batch``: indices into the planned edits. Each request is scored once."""
        seen = self.seen_indices(n_done)
        both = sorted(set(batch) | set(seen))
        values = self.evaluator(self.scorer, [self.planned[i] for i in both])
        at = {i: k for k, i in enumerate(both)}

        def pick(idx: Sequence[int]) -> dict:
            rows = [at[i] for i in idx]
            return {k: v[rows] for k, v in values.items()}

        per_seen = pick(seen)
        row = {**aggregate(pick(batch), "batch"), **aggregate(per_seen, "seen")}
        return row, seen, per_seen


def run(cfg: DictConfig, run_dir: str | None = None) -> dict[str, Any]:
    """Run one sequential-editing experiment; returns the final metrics (``summary.json``)."""
    cfg = cfg.copy()
    resolve_data_root(cfg)
    run_dir = Path(run_dir or cfg.get("run_dir") or "outputs/manual")
    seed = int(cfg.seed)

    # 1. data and plan: fail on bad input before anything is loaded or written
    records = data.from_config(cfg.dataset, cache_dir=str(Path(cfg.cache_dir) / "data"))
    schedule = Schedule(**OmegaConf.to_container(cfg.schedule, resolve=True))
    batches = schedule.batches(len(records))
    planned = [records[i] for r in batches for i in r]
    evaluator: Evaluator = instantiate(cfg.dataset.evaluator)
    fusion = instantiate(cfg.fusion)

    # 2. model, statistics, method
    lm: LoadedModel = load_model(cfg.model, lambda: instantiate(cfg.model.load))
    lm.spec.check(lm.model, [int(x) for x in cfg.model.edit.layers])
    torch.manual_seed(seed)
    method: EditMethod = instantiate(cfg.method, _convert_="all")
    stats: CovarianceStore = instantiate(cfg.stats)
    templates = context_templates(lm, [tuple(s) for s in cfg.templates.specs], seed=seed)
    ctx = EditContext(lm=lm, stats=stats, templates=templates)
    method.prepare(ctx)  # covariance etc. from the unedited model
    evaluation = Evaluation(evaluator, Scorer(lm, int(cfg.eval_batch_size)), planned,
                            schedule.retention_sample, seed)

    # 3. outputs and trackers
    run_dir.mkdir(parents=True, exist_ok=True)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    atomic_write(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    # partial first: instantiate would otherwise recurse into the config's own _target_s
    trackers = Trackers(instantiate(t, _partial_=True)(run_dir=str(run_dir), run_config=resolved)
                        for t in (cfg.logger or {}).values())
    retention_rows: list[dict[str, Any]] = []
    outcomes: list[StepOutcome] = []
    total: Deltas = {}
    last_row: dict[str, Any] = {}
    guard = cfg.guard
    t_start = time.perf_counter()
    try:
        n_steps = len(batches)
        made_at = [s for s, r in enumerate(batches, start=1) for _ in r]  # per planned edit

        def evaluate(step: int, batch: Sequence[int], n_done: int, extra: Mapping):
            t0 = time.perf_counter()
            row, seen, per_seen = evaluation(batch, n_done)
            row = {"step": step, "edits_done": n_done, **extra, **row,
                   "time/eval_s": time.perf_counter() - t0}
            trackers.log(row, step)
            for j, i in enumerate(seen):
                retention_rows.append({"step": step, "case_id": planned[i].case_id,
                                       "step_made": made_at[i] if i < n_done else 0,
                                       **{k: float(v[j]) for k, v in per_seen.items()}})
            return row

        last_row = evaluate(0, list(range(len(batches[0]))), 0, {})
        bar = tqdm(total=n_steps, desc="editing", unit="step", disable=None)
        n_done = 0
        for step, idx in enumerate(batches, start=1):
            batch = [records[i] for i in idx]
            t0 = time.perf_counter()
            deltas = method.compute_deltas(ctx, batch)
            t_compute = time.perf_counter() - t0
            fused = fusion(deltas, step_generator(seed, step))
            problem = delta_problem(fused, guard.max_delta_norm)
            if problem is None:
                apply_deltas(lm.model, fused)
                method.commit(ctx, batch, fused)
                total = add_into(total, fused)
            else:
                log.warning("step %d not applied: %s", step, problem)
                if guard.on_fault == "stop":
                    raise FloatingPointError(f"step {step}: {problem}")
            outcomes.append(StepOutcome(step, len(batch), problem is None, problem or ""))
            n_done += len(batch)
            extra = {"applied": int(problem is None), "time/compute_s": t_compute,
                     "time/step_s": time.perf_counter() - t0}
            if schedule.evaluate_at(step, n_steps):
                last_row = evaluate(step, list(range(n_done - len(batch), n_done)), n_done, extra)
                bar.set_postfix(edits=n_done, eff=f"{last_row['seen/efficacy']:.1f}",
                                spec=f"{last_row['seen/specificity']:.1f}")
            bar.update(1)
        bar.close()

        summary = {k: v for k, v in last_row.items()}
        summary.update({
            "steps": n_steps, "edits_done": n_done,
            "steps_failed": sum(not o.applied for o in outcomes),
            "wall_s": time.perf_counter() - t_start,
            "stats_compute_s": stats.compute_seconds,
        })
        _write_retention(run_dir / "retention.csv", retention_rows)
        if cfg.save_deltas:
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in total.items()},
                      str(run_dir / "deltas.safetensors"))
        trackers.summary(summary)
        return summary
    finally:
        trackers.finish()


def _write_retention(path: Path, rows: list[dict[str, Any]]) -> None:
    import pandas as pd

    df = pd.DataFrame(rows)
    atomic_write(path, df.to_csv(index=False, float_format="%.6g"))

