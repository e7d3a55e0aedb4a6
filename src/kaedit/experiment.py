"""The sequential-edit recipe, top to bottom (paper §2.3).

Build the parts in order (data, schedule, model, statistics, method, fusion, evaluation,
trackers), evaluate the unedited model (step 0), then for each step t: compute Δ on
M_{t-1} → fuse → check → apply → evaluate → log → checkpoint. Everything the run owns
(statistics, tokenisation caches, random generators, the fusion's state) is created here;
nothing is module-level. A fusion may serve other weights than the method edits
(Lookahead's slow weights, WiSE-FT's interpolation): evaluations and ``save_deltas`` see
the served ones.

Errors by phase (:mod:`kaedit.errors`): building the parts raises bad input as a
``ConfigError`` before anything is written (exit 2, one line); an error inside the loop
keeps its traceback (exit 1) and leaves the last checkpoint to resume from. Metric and
retention rows are appended to ``metrics.csv`` / ``retention.csv`` as they are produced;
a checkpoint holds the :class:`~kaedit.checkpoint.RunState` (step, counters, faults,
tracker states, row counts), not the history.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import platform
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from kaedit import checkpoint, wild
from kaedit.checkpoint import RunState
from kaedit.errors import ConfigError
from kaedit.evaluate import Evaluator, Scorer, TextMetrics, aggregate, check_tokenisation
from kaedit.fusion import FusionState, FusionStrategy, bind_weights
from kaedit.methods.base import EditContext, EditMethod
from kaedit.methods.core import context_templates
from kaedit.models import LoadedModel
from kaedit.perplexity import Perplexity
from kaedit.records import Deltas, EditRequest
from kaedit.schedule import Schedule
from kaedit.setup import (  # noqa: F401 - compose, resolve_data_root: kaedit.experiment's API
    build,
    build_model,
    build_records,
    build_schedule,
    build_stats,
    build_trackers,
    compose,
    resolve_data_root,
    resolve_from_trace,
)
from kaedit.stats import CovarianceStore
from kaedit.tracking import CsvRows, atomic_write, progress_line
from kaedit.weights import EditedWeights, delta_problem, difference, frobenius

log = logging.getLogger(__name__)

#: Files of a run directory the runner writes besides the trackers' ones.
RETENTION = "retention.csv"
REFERENCES = "references.json"
#: The final efficacy / generalization / specificity of each batch (x100, one row per step
#: that made edits), written at the end: the dashboard's retention table.
RETENTION_BY_BATCH = "retention_by_batch.csv"


def step_generator(seed: int, step: int) -> torch.Generator:
    """The generator for step ``step``'s randomness (drop masks): a pure function of both."""
    return torch.Generator().manual_seed(int(seed) * 1_000_003 + int(step))


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

    def wild_scores(self, batch: Sequence[int], n_done: int) -> tuple[dict, dict]:
        """WILD scores (:attr:`wild`) of the batch and the tracked edits, each request
        once: ``wild/batch/*`` and ``wild/seen/*`` for the metrics row, and the tracked
        edits' values (:meth:`tracked_indices` order) as ``wild_<metric>`` for
        ``retention.csv``."""
        assert self.wild is not None
        tracked = self.tracked_indices(n_done)
        scored = sorted(set(batch) | set(tracked))
        values = self.wild([self.planned[i] for i in scored])
        at = {i: k for k, i in enumerate(scored)}

        def pick(idx: Sequence[int]) -> dict:
            return {k: v[[at[i] for i in idx]] for k, v in values.items()}

        row = {**wild.aggregate(pick(batch), "wild/batch"),
               **wild.aggregate(pick(self.seen_indices(n_done)), "wild/seen")}
        return row, {f"wild_{k}": v for k, v in pick(tracked).items()}


@dataclass
class StepDone:
    """What one edit step did (:func:`edit_step`)."""

    deltas: Deltas  # as the method computed them
    fused: Deltas  # after the fusion
    fusion_state: FusionState  # the state to continue from (unchanged if not applied)
    problem: str | None  # why the fused deltas were not applied (guard), or None
    t_compute: float
    t_fuse: float
    stages: dict[str, float]  # targets / keys / solve, for methods that report them


def fuse_step(fusion: FusionStrategy, state: FusionState, deltas: Deltas, seed: int,
              step: int) -> tuple[FusionState, Deltas]:
    """Step ``step``'s fusion of the method's deltas: ``(next state, increment)``.

    At ``fusion.scope=layer`` it is the same per-(seed, step, weight) fusion the method
    applied inside its layer loop (:meth:`~kaedit.fusion.Stateless.layer_fusion`), so the
    increment is exactly what the later layers were solved against; at step scope, the
    fusion with the step's generator (:func:`step_generator`). Used by :func:`edit_step`
    and by ``kaedit.export``'s replay of saved step deltas."""
    layer = fusion.layer_fusion(seed, step)
    return (layer or fusion).step(state, deltas, step_generator(seed, step))


def edit_step(method: EditMethod, ctx: EditContext, fusion: FusionStrategy,
              fusion_state: FusionState, edits: EditedWeights, batch: Sequence[EditRequest],
              seed: int, step: int, max_delta_norm: float | None) -> StepDone:
    """One step of the recipe on ``M_{t-1}``: compute Δ → fuse → check → apply (or not).

    Shared by :func:`run` and :class:`kaedit.editor.Editor`, so a notebook edits exactly as
    a run does. With ``fusion.scope=layer`` the method fuses each layer's Δ inside its layer
    loop (``ctx.layer_fusion``); step scope: ``None``, and the fusion runs once after it.
    Deltas that fail the guard (:func:`~kaedit.weights.delta_problem`) are not applied,
    the fusion state is not advanced and the method is not told of them."""
    fusion = bind_weights(fusion, edits)  # RECT / PRUNE read W₀ and W_{t-1} (issue 26)
    layer = fusion.layer_fusion(seed, step)
    ctx.layer_fusion = None if layer is None else layer.fuse
    ctx.clock.take()
    t0 = time.perf_counter()
    deltas = method.compute_deltas(ctx, batch)
    t_compute = time.perf_counter() - t0
    stages = ctx.clock.take()
    t_fuse = time.perf_counter()
    next_state, fused = fuse_step(fusion, fusion_state, deltas, seed, step)
    t_fuse = time.perf_counter() - t_fuse
    problem = delta_problem(fused, max_delta_norm)
    if problem is None:
        edits.add(fused)
        fusion_state = next_state
        method.commit(ctx, batch, fused)
    return StepDone(deltas, fused, fusion_state, problem, t_compute, t_fuse, stages)


def update_sizes(done: StepDone, edits: EditedWeights) -> dict[str, float]:
    """How large step t's update was and how far the edited weights have moved, all
    Frobenius norms over every edited weight together (:func:`~kaedit.weights.frobenius`):

    * ``update/computed_norm`` -- ‖Δ_t‖, the method's deltas (at ``fusion.scope=layer``
      the undropped Δˡ, solved against the earlier layers' fused updates);
    * ``update/applied_norm`` -- ‖f(Δ_t)‖, what the fusion made of them (0 when the guard
      refused the step: nothing was applied);
    * ``update/fusion_change_norm`` -- ‖f(Δ_t) − Δ_t‖, what the fusion changed; for
      drop-and-rescale the noise it adds, E‖f(Δ) − Δ‖² = p/(1 − p)·‖Δ‖²;
    * ``update/total_norm`` -- ‖W_t − W₀‖ after the step; ``update/total_rel`` -- that
      over ‖W₀‖ (the relative drift of the edited weights)."""
    total, base = edits.drift()
    return {"update/computed_norm": frobenius(done.deltas),
            "update/applied_norm": frobenius(done.fused) if done.problem is None else 0.0,
            "update/fusion_change_norm": frobenius(difference(done.fused, done.deltas)),
            "update/total_norm": total,
            "update/total_rel": total / base if base else 0.0}


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


def save_step_deltas(folder: Path, step: int, deltas: Deltas, fused: Deltas) -> None:
    """``step-NNNN.safetensors`` (as computed) and ``step-NNNN-fused.safetensors``.

    With ``fusion.scope=layer`` "as computed" is each layer's undropped Δˡ, solved with the
    earlier layers' *fused* updates in place, and "fused" the Δ̂ˡ actually applied."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    for suffix, d in (("", deltas), ("-fused", fused)):
        save_file({k: v.detach().contiguous().cpu() for k, v in d.items()},
                  str(folder / f"step-{step:04d}{suffix}.safetensors"))


def config_fingerprint(cfg: DictConfig) -> str:
    """Identifies what a run computes (not where it logs): resume only a matching run."""
    keep = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items()
            if k not in ("resume", "run_dir", "logger", "hydra", "cache_dir", "tracking",
                         "cluster")}
    return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:16]


def effective_config(cfg: DictConfig) -> DictConfig:
    """A copy with ``data_root`` made absolute and ``method.layers=from_trace:`` read: the
    config a run actually uses (and fingerprints)."""
    cfg = cfg.copy()
    resolve_data_root(cfg)
    return resolve_from_trace(cfg)  # method.layers=from_trace:RUN_DIR (python -m kaedit.trace)


def resume_dir(cfg: DictConfig, fingerprint: str) -> Path | None:
    """The run directory ``resume`` points at: a path, the newest matching run, or None."""
    value = cfg.get("resume")
    if value in (None, False, "false", "False"):
        return None
    if value in (True, "true", "True"):
        found = checkpoint.find_resumable(Path(str(cfg.outputs_root)), fingerprint)
        if found is None:
            raise ConfigError(
                f"resume=true: no unfinished run with a checkpoint and this config under "
                f"{cfg.outputs_root!r}; pass resume=RUN_DIR to choose one"
            )
        return found
    path = Path(str(value)).expanduser()
    if not (path / checkpoint.CKPT_DIR / checkpoint.POINTER).is_file():
        raise ConfigError(f"resume={value!r}: no checkpoint in that directory "
                          f"(expected {checkpoint.CKPT_DIR}/{checkpoint.POINTER})")
    return path


def run(cfg: DictConfig, run_dir: str | None = None) -> dict[str, Any]:
    """Run one sequential-editing experiment; returns the final metrics (``summary.json``)."""
    cfg = effective_config(cfg)
    seed = int(cfg.seed)
    fingerprint = config_fingerprint(cfg)
    resuming = resume_dir(cfg, fingerprint)
    run_dir = resuming or Path(run_dir or cfg.get("run_dir") or "outputs/manual")
    if resuming:
        saved = json.loads((run_dir / "resume.json").read_text())
        if saved.get("fingerprint") != fingerprint:
            raise ConfigError(f"resume={str(run_dir)!r}: that run was made with a different "
                              "config (compare its config.yaml); resume needs the same one")
        log.info("resuming %s", run_dir)

    # ---- build phase: bad input raises ConfigError here, before anything is written ----
    # 1. data and plan: fail on bad input before anything is loaded
    records = build_records(cfg)
    schedule = build_schedule(cfg)
    batches = schedule.batches(len(records))
    planned = [records[i] for r in batches for i in r]
    evaluator: Evaluator = build(cfg.dataset.evaluator)
    fusion: FusionStrategy = build(cfg.fusion)
    if not isinstance(fusion, FusionStrategy):
        raise ConfigError(f"fusion._target_={cfg.fusion._target_!r} is not a fusion strategy "
                          "(kaedit.fusion: init_state, step, served_offset)")
    if cfg.guard.on_fault not in ("skip", "stop"):
        raise ConfigError(f"guard.on_fault={cfg.guard.on_fault!r} is not one of ['skip', 'stop']")

    # 2. model, statistics, method (all derived from the unedited model)
    lm: LoadedModel = build_model(cfg)
    check_tokenisation(lm.tokenizer, evaluator, planned)  # bad input: before any statistics
    torch.manual_seed(seed)
    method: EditMethod = build(cfg.method, _convert_="all")
    lm.spec.check(lm.model, [int(x) for x in method.layers])  # the layers it declares
    stats: CovarianceStore = build_stats(cfg)
    templates = context_templates(lm, [tuple(s) for s in cfg.templates.specs], seed=seed)
    ctx = EditContext(lm=lm, stats=stats, templates=templates)
    method.prepare(ctx)
    texts: TextMetrics = build(cfg.generation, _partial_=True)(lm=lm)  # lm: not a config
    evaluation = Evaluation(evaluator, Scorer(lm, int(cfg.eval_batch_size)), planned,
                            schedule.retention_sample, seed, texts,
                            first_batch=range(len(batches[0])) if schedule.first_batch_in_full
                            else (), fixed=schedule.fixed_sample)
    edits = EditedWeights(lm.model)
    # WikiText-2 perplexity on the steps perplexity.every picks (0: never)
    perplexity: Perplexity | None = build(cfg.perplexity) if cfg.get("perplexity") else None

    # 3. state to continue from (resume), outputs and trackers
    state = RunState()
    fusion_state = fusion.init_state()
    if resuming:
        ckpt = checkpoint.load(run_dir)
        edits.load(ckpt.deltas)
        method.load_state_dict(ckpt.method_state)
        if ckpt.fusion_state:
            fusion_state = FusionState.from_flat(ckpt.fusion_state)
        ckpt.restore_rng()
        state = ckpt.state
    run_dir.mkdir(parents=True, exist_ok=True)
    if texts.needs_references:
        # Consistency's fallback reference text comes from the unedited model: generate it
        # once, before the first edit, for every request a generation step will evaluate.
        if resuming:
            texts.references = json.loads((run_dir / REFERENCES).read_text())
        else:
            due = [planned[i] for i in generation_indices(schedule, batches, evaluation)]
            texts.references = texts.make_references(due)
            atomic_write(run_dir / REFERENCES, json.dumps(texts.references) + "\n")
    atomic_write(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    atomic_write(run_dir / "resume.json", json.dumps({"fingerprint": fingerprint}) + "\n")
    trackers, named = build_trackers(cfg, run_dir, state.trackers)
    retention = CsvRows(run_dir / RETENTION, keep=state.retention_rows)
    n_steps = len(batches)
    made_at = [s for s, r in enumerate(batches, start=1) for _ in r]  # per planned edit
    t_start, elapsed_before = time.perf_counter(), state.elapsed_s

    def evaluate(step: int, batch: Sequence[int], n_done: int, extra: Mapping) -> dict:
        t0, pairs0 = time.perf_counter(), evaluation.scorer.pairs_scored
        with edits.serving(fusion.served_offset(fusion_state)):
            row, tracked, per_tracked = evaluation(batch, n_done,
                                                   schedule.generation_at(step, n_steps))
            if perplexity is not None and perplexity.due(step, n_steps):
                row["general/perplexity"] = perplexity(lm)
            if evaluation.wild is None:  # WILD (kaedit.wild): answers of the unedited model
                evaluation.wild = wild.start(cfg.get("wild"), lm, run_dir, step, evaluation,
                                             schedule, batches)
            if evaluation.wild is not None and evaluation.wild.due(step, n_steps):
                t_wild = time.perf_counter()
                more, per_edit = evaluation.wild_scores(batch, n_done)
                row.update({**more, "time/wild_s": time.perf_counter() - t_wild})
                per_tracked.update(per_edit)
        t_eval = time.perf_counter() - t0
        state.eval_s += t_eval
        row = {"step": step, "edits_done": n_done, **extra, **row,
               "time/eval_s": t_eval,
               "eval/prompts": evaluation.scorer.pairs_scored - pairs0}
        # first-batch retention: efficacy (x100) of the step-1 edits tracked (the seen
        # sample's, or all of them with schedule.first_batch_in_full)
        first = [j for j, i in enumerate(tracked) if i < n_done and made_at[i] == 1]
        if first and "efficacy" in per_tracked:
            row["retention/first_batch"] = 100.0 * float(per_tracked["efficacy"][first].mean())
        trackers.log(row, step)
        retention.append({"step": step, "case_id": planned[i].case_id,
                          "step_made": made_at[i] if i < n_done else 0,
                          **{k: float(v[j]) for k, v in per_tracked.items()}}
                         for j, i in enumerate(tracked))
        return row

    # ---- the loop: an error keeps its traceback; the last checkpoint stays resumable ----
    try:
        if state.step == 0:
            state.last_row = evaluate(0, list(range(len(batches[0]))), 0, {})
        bar = tqdm(total=n_steps, initial=state.step, desc="editing", unit="step",
                   disable=None)
        t_loop, done_before = time.perf_counter(), state.step  # s/step: this segment's steps
        for step in range(state.step + 1, n_steps + 1):
            batch = [records[i] for i in batches[step - 1]]
            t0 = time.perf_counter()
            done = edit_step(method, ctx, fusion, fusion_state, edits, batch, seed, step,
                             cfg.guard.max_delta_norm)
            fusion_state, problem = done.fusion_state, done.problem
            if cfg.save_step_deltas:
                save_step_deltas(run_dir / "deltas", step, done.deltas, done.fused)
            if problem is not None:
                log.warning("step %d not applied: %s", step, problem)
                state.faults.append({"step": step, "reason": problem})
                if cfg.guard.on_fault == "stop":
                    raise FloatingPointError(f"step {step} not applied: {problem}")
            state.n_done += len(batch)
            n_done = state.n_done
            extra = {"applied": int(problem is None), "time/compute_s": done.t_compute,
                     **{f"time/{k}_s": v for k, v in done.stages.items()},
                     "time/fusion_s": done.t_fuse, "time/step_s": time.perf_counter() - t0,
                     **update_sizes(done, edits)}
            # seconds per edit by stage: comparable across batch sizes (the dashboard's)
            extra.update({f"time/per_edit/{k[len('time/'):]}": v / len(batch)
                          for k, v in list(extra.items()) if k.startswith("time/")})
            if schedule.evaluate_at(step, n_steps):
                state.last_row = evaluate(step, list(range(n_done - len(batch), n_done)),
                                          n_done, extra)
                bar.set_postfix(edits=n_done, eff=f"{state.last_row['seen/efficacy']:.1f}",
                                spec=f"{state.last_row['seen/specificity']:.1f}")
            state.step = step
            if schedule.checkpoint_every and (step % schedule.checkpoint_every == 0
                                              or step == n_steps):
                state.trackers = {n: t.state() for n, t in named.items()}
                state.retention_rows = retention.n_rows
                state.elapsed_s = elapsed_before + time.perf_counter() - t_start
                checkpoint.save(run_dir, state, edits.total, method.state_dict(),
                                fusion_state.flat())
            bar.update(1)
            log.info(progress_line(step, n_steps, n_done, state.last_row,
                                   (time.perf_counter() - t_loop) / (step - done_before)))
        bar.close()

        summary = dict(state.last_row)
        wall = time.perf_counter() - t_start
        elapsed = elapsed_before + wall
        summary.update({
            "steps": n_steps, "edits_done": state.n_done,
            "steps_failed": len(state.faults), "faults": state.faults,
            # wall_s: this segment (since the last resume); elapsed_s and eval_s: the whole
            # run, every segment; eval_share: evaluation's share of it (issue 30)
            "wall_s": wall, "elapsed_s": elapsed, "eval_s": state.eval_s,
            "eval_share": state.eval_s / elapsed if elapsed > 0 else 0.0,
            "stats_compute_s": stats.compute_seconds,
            "machine": machine(lm),
        })
        if "seen/consistency" in summary:
            summary.update(consistency_source=texts.source, generation_protocol=texts.protocol)
        if cfg.save_deltas:
            from safetensors.torch import save_file

            served = fusion.served_offset(fusion_state)  # W_served − W₀ = total + offset
            save_file({k: (v + served[k] if k in served else v).contiguous()
                       for k, v in edits.total.items()}, str(run_dir / "deltas.safetensors"))
        # Local files first (summary.json: the csv tracker comes first), then what W&B
        # may refuse: a failure at W&B's end loses nothing of the run's ending.
        trackers.summary(summary)
        atomic_write(run_dir / "resume.json",
                     json.dumps({"fingerprint": fingerprint, "done": True}) + "\n")
        by_batch = retention_by_batch(retention.path)
        by_batch.to_csv(run_dir / RETENTION_BY_BATCH, index=False, float_format="%.6g")
        trackers.table("retention", retention.path)  # every row: a file artifact
        trackers.table(Path(RETENTION_BY_BATCH).stem, run_dir / RETENTION_BY_BATCH)
        if cfg.save_deltas:
            trackers.files("deltas", [run_dir / "deltas.safetensors"])
        return summary
    finally:
        trackers.finish()


def machine(lm: LoadedModel) -> str:
    """Where the run (its last segment, when resumed) ran: host, device, threads, torch."""
    return (f"{platform.node()}: {lm.device}, {torch.get_num_threads()} torch threads of "
            f"{os.cpu_count()} CPUs, torch {torch.__version__}")


def retention_by_batch(path: Path):
    """Per batch (``step_made``), the mean of each retention metric (x100) of its edits in
    the seen sample at the last evaluated step, and how many were sampled."""
    import pandas as pd

    rows = pd.read_csv(path)
    last = rows[(rows["step"] == rows["step"].max()) & (rows["step_made"] > 0)]
    metrics = [c for c in ("efficacy", "generalization", "specificity") if c in last]  # 0/1
    table = last.groupby("step_made")[metrics].mean() * 100.0
    table.insert(0, "n_sampled", last.groupby("step_made").size())
    return table.reset_index()
