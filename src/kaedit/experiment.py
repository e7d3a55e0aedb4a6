"""The sequential-edit recipe, top to bottom (paper §2.3).

Build the session (:func:`kaedit.setup.build_session`: data, schedule, model, statistics,
method, fusion, evaluation, in that order), restore the state to continue from (resume),
write the run's files and build its trackers, evaluate the unedited model (step 0), then
for each step t: compute Δ on M_{t-1} → fuse → check → apply (:func:`edit_step`) →
evaluate → log → checkpoint (:func:`run`). Everything the run owns
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
import json
import logging
import os
import platform
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from kaedit import checkpoint, wild
from kaedit.checkpoint import RunState
from kaedit.errors import ConfigError
from kaedit.evaluation import PLAN_KEYS, generation_indices, plan_difference
from kaedit.files import CsvRows, atomic_write
from kaedit.fusion import FusionState, FusionStrategy, bind_weights, constrained
from kaedit.methods.base import EditContext, EditMethod
from kaedit.models import LoadedModel
from kaedit.records import Deltas, EditRequest
from kaedit.setup import (  # noqa: F401 - compose, resolve_data_root: re-exported
    Session,
    build_session,
    build_trackers,
    compose,
    effective_config,
    resolve_data_root,
)
from kaedit.tracking import Tracker, Trackers, progress_line
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


def step_fusion(method: EditMethod | None, ctx: EditContext | None, fusion: FusionStrategy,
                edits: EditedWeights) -> FusionStrategy:
    """The fusion as a step applies it: bound to the edited weights (RECT and PRUNE read
    W₀ and W_{t-1}, :func:`~kaedit.fusion.bind_weights`, issue 26) and followed by the
    method's ``fused_constraint(ctx)`` where it has one (AlphaEdit's ``project_fused``,
    :func:`~kaedit.fusion.constrained`, issue 28). Shared by :func:`edit_step` and the
    replay of saved step deltas (:mod:`kaedit.export`)."""
    fusion = bind_weights(fusion, edits)
    constraint = getattr(method, "fused_constraint", None)
    return constrained(fusion, None if constraint is None or ctx is None else constraint(ctx))


def edit_step(method: EditMethod, ctx: EditContext, fusion: FusionStrategy,
              fusion_state: FusionState, edits: EditedWeights, batch: Sequence[EditRequest],
              seed: int, step: int, max_delta_norm: float | None) -> StepDone:
    """One step of the recipe on ``M_{t-1}``: compute Δ → fuse → check → apply (or not).

    Shared by :func:`run` and :class:`kaedit.editor.Editor`, so a notebook edits exactly as
    a run does. With ``fusion.scope=layer`` the method fuses each layer's Δ inside its layer
    loop (``ctx.layer_fusion``); step scope: ``None``, and the fusion runs once after it.
    A method with ``fused_constraint(ctx)`` has it applied to what the fusion made of its
    deltas (:func:`~kaedit.fusion.constrained`: AlphaEdit's ``project_fused``, issue 28).
    Deltas that fail the guard (:func:`~kaedit.weights.delta_problem`) are not applied,
    the fusion state is not advanced and the method is not told of them."""
    fusion = step_fusion(method, ctx, fusion, edits)
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
    """Identifies what a run computes (not where it logs): resume only a matching run.
    ``paths`` is left out: it only supplies the defaults of the top-level ``data_root``,
    ``cache_dir`` and ``outputs_root`` (conf/paths/default.yaml), which every config reads;
    so is ``step0_from``, which reads step 0 from a run that computed the same one."""
    keep = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items()
            if k not in ("resume", "run_dir", "logger", "hydra", "cache_dir", "tracking",
                         "cluster", "paths", "step0_from")}
    return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:16]


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


def run_directory(cfg: DictConfig, fingerprint: str,
                  run_dir: str | None) -> tuple[Path, bool]:
    """``(the run directory, whether the run resumes there)``; a resumed run must have been
    made with the same config (``resume.json``'s fingerprint)."""
    resuming = resume_dir(cfg, fingerprint)
    if resuming is None:
        return Path(run_dir or cfg.get("run_dir") or "outputs/manual"), False
    saved = json.loads((resuming / "resume.json").read_text())
    if saved.get("fingerprint") != fingerprint:
        raise ConfigError(f"resume={str(resuming)!r}: that run was made with a different "
                          "config (compare its config.yaml); resume needs the same one")
    log.info("resuming %s", resuming)
    return resuming, True


def step0_source(session: Session, resuming: bool) -> Path | None:
    """The run directory ``step0_from`` names (None when unset or when resuming: step 0 is
    done), checked before anything is written: it holds a step-0 row in ``metrics.csv``,
    ``retention.csv``, the unedited answers this run's evaluation needs, and a
    ``config.yaml`` that agrees on every key that decides the evaluation
    (:data:`kaedit.evaluation.PLAN_KEYS`: model, dataset, schedule, seed, generation, perplexity,
    WILD, ...); a :class:`ConfigError` naming what is missing or the first key that
    differs otherwise."""
    cfg = session.cfg
    value = cfg.get("step0_from")
    if value in (None, False, "", "null") or resuming:
        return None
    path = Path(str(value)).expanduser()
    needed = ["config.yaml", "metrics.csv", RETENTION]
    needed += [wild.REFERENCES] if session.wild is not None else []
    needed += [REFERENCES] if session.texts.needs_references else []
    missing = [f for f in needed if not (path / f).is_file()]
    if missing:
        raise ConfigError(f"step0_from={str(value)!r}: no {missing[0]} there (step0_from "
                          f"needs a run directory with {needed})")
    metrics = pd.read_csv(path / "metrics.csv")
    if not (metrics["step"] == 0).any():
        raise ConfigError(f"step0_from={str(value)!r}: its metrics.csv has no step-0 row")
    theirs = OmegaConf.load(path / "config.yaml")
    key = plan_difference(theirs, cfg)
    if key is not None:
        raise ConfigError(f"step0_from={str(value)!r}: that run differs in {key}, so its "
                          f"step 0 is not this run's; it must share {list(PLAN_KEYS)}")
    return path


def copy_step0(session: Session, out: Outputs, source: Path) -> dict:
    """Step 0 of ``source`` (:func:`step0_source`) as this run's: its metrics row, logged
    as this run's (its ``time/*`` and ``eval/prompts`` replaced by the seconds the copy
    took: this run scored nothing), its step-0 ``retention.csv`` rows and the unedited
    model's WILD answers (read by :func:`kaedit.wild.start` at the first WILD step)."""
    import csv

    t0 = time.perf_counter()
    metrics = pd.read_csv(source / "metrics.csv")
    first = metrics[metrics["step"] == 0].iloc[0].dropna()
    row = {k: (int(v) if k in ("step", "edits_done") else float(v)) for k, v in first.items()
           if not k.startswith("time/") and k != "eval/prompts"}
    if session.wild is not None:
        atomic_write(out.run_dir / wild.REFERENCES, (source / wild.REFERENCES).read_text())
    with (source / RETENTION).open(newline="") as f:
        out.retention.append(r for r in csv.DictReader(f) if r["step"] == "0")
    row["time/eval_s"] = time.perf_counter() - t0
    out.trackers.log(row, 0)
    log.info("step 0 taken from %s", source)
    return row


def resume_state(session: Session, run_dir: Path, resuming: bool) -> tuple[RunState,
                                                                          FusionState]:
    """The run state and fusion state to continue from: a fresh run's, or the checkpoint's
    (whose deltas, method state and random generators are restored into ``session``)."""
    if not resuming:
        return RunState(), session.fusion.init_state()
    ckpt = checkpoint.load(run_dir)
    session.edits.load(ckpt.deltas)
    session.method.load_state_dict(ckpt.method_state)
    fusion_state = (FusionState.from_flat(ckpt.fusion_state) if ckpt.fusion_state
                    else session.fusion.init_state())
    ckpt.restore_rng()
    return ckpt.state, fusion_state


def write_run_files(session: Session, run_dir: Path, fingerprint: str, resuming: bool,
                    step0: Path | None = None) -> None:
    """``config.yaml``, ``resume.json`` and (text metrics with fallback references) the
    unedited model's reference texts, generated once before the first edit for every
    request a generation step will evaluate (read back on resume, or from the run
    ``step0`` that step 0 is taken from)."""
    texts = session.texts
    run_dir.mkdir(parents=True, exist_ok=True)
    if texts.needs_references:
        if resuming or step0 is not None:
            texts.references = json.loads(((step0 or run_dir) / REFERENCES).read_text())
            if step0 is not None:
                atomic_write(run_dir / REFERENCES, json.dumps(texts.references) + "\n")
        else:
            due = generation_indices(session.schedule, session.batches, session.evaluation)
            texts.references = texts.make_references([session.planned[i] for i in due])
            atomic_write(run_dir / REFERENCES, json.dumps(texts.references) + "\n")
    atomic_write(run_dir / "config.yaml", OmegaConf.to_yaml(session.cfg, resolve=True))
    atomic_write(run_dir / "resume.json", json.dumps({"fingerprint": fingerprint}) + "\n")


@dataclass
class Outputs:
    """Where a run's results go: its directory, its trackers (by name: their states are
    checkpointed) and ``retention.csv``; and its clock (``elapsed_before``: the seconds of
    the segments before a resume)."""

    run_dir: Path
    trackers: Trackers
    named: dict[str, Tracker]
    retention: CsvRows
    t_start: float
    elapsed_before: float

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.t_start


def evaluate(session: Session, out: Outputs, state: RunState, fusion_state: FusionState,
             step: int, batch: Sequence[int], n_done: int, extra: Mapping) -> dict:
    """Evaluate the served weights after step ``step`` (``batch``: the step's planned
    edits; ``n_done``: edits made so far), log the metrics row and the tracked edits'
    ``retention.csv`` rows; returns the row."""
    evaluation, schedule, n_steps = session.evaluation, session.schedule, len(session.batches)
    t0, pairs0 = time.perf_counter(), evaluation.scorer.pairs_scored
    with session.edits.serving(session.fusion.served_offset(fusion_state)):
        row, tracked, per_tracked = evaluation(batch, n_done,
                                               schedule.generation_at(step, n_steps))
        if session.perplexity is not None and session.perplexity.due(step, n_steps):
            row["general/perplexity"] = session.perplexity(session.lm)
        if evaluation.wild is None:  # WILD (kaedit.wild): answers of the unedited model
            evaluation.wild = wild.start(session.wild, out.run_dir, step, evaluation,
                                         schedule, session.batches)
        if evaluation.wild is not None and evaluation.wild.due(step, n_steps):
            t_wild = time.perf_counter()
            more, per_edit = evaluation.wild_scores(
                batch, n_done, locality=evaluation.wild.locality_due(step, n_steps))
            row.update({**more, "time/wild_s": time.perf_counter() - t_wild})
            per_tracked.update(per_edit)
    t_eval = time.perf_counter() - t0
    state.eval_s += t_eval
    row = {"step": step, "edits_done": n_done, **extra, **row, "time/eval_s": t_eval,
           "eval/prompts": evaluation.scorer.pairs_scored - pairs0}
    made_at = [s for s, r in enumerate(session.batches, start=1) for _ in r]  # per edit
    # first-batch retention: efficacy (x100) of the step-1 edits tracked (the seen
    # sample's, or all of them with schedule.first_batch_in_full)
    first = [j for j, i in enumerate(tracked) if i < n_done and made_at[i] == 1]
    if first and "efficacy" in per_tracked:
        row["retention/first_batch"] = 100.0 * float(per_tracked["efficacy"][first].mean())
    out.trackers.log(row, step)
    out.retention.append({"step": step, "case_id": session.planned[i].case_id,
                          "step_made": made_at[i] if i < n_done else 0,
                          **{k: float(v[j]) for k, v in per_tracked.items()}}
                         for j, i in enumerate(tracked))
    return row


def step_columns(done: StepDone, edits: EditedWeights, n_edits: int, t0: float) -> dict:
    """The step's own columns of its metrics row: applied, times, update sizes."""
    extra = {"applied": int(done.problem is None), "time/compute_s": done.t_compute,
             **{f"time/{k}_s": v for k, v in done.stages.items()},
             "time/fusion_s": done.t_fuse, "time/step_s": time.perf_counter() - t0,
             **update_sizes(done, edits)}
    # seconds per edit by stage: comparable across batch sizes (the dashboard's)
    extra.update({f"time/per_edit/{k[len('time/'):]}": v / n_edits
                  for k, v in list(extra.items()) if k.startswith("time/")})
    return extra


def save_checkpoint(session: Session, out: Outputs, state: RunState,
                    fusion_state: FusionState) -> None:
    state.trackers = {n: t.state() for n, t in out.named.items()}
    state.retention_rows = out.retention.n_rows
    state.elapsed_s = out.elapsed()
    checkpoint.save(out.run_dir, state, session.edits.total, session.method.state_dict(),
                    fusion_state.flat())


def run(cfg: DictConfig, run_dir: str | None = None) -> dict[str, Any]:
    """Run one sequential-editing experiment; returns the final metrics (``summary.json``)."""
    cfg = effective_config(cfg)
    fingerprint = config_fingerprint(cfg)
    path, resuming = run_directory(cfg, fingerprint, run_dir)
    # ---- build phase: bad input raises ConfigError here, before anything is written ----
    s = build_session(cfg)
    step0 = step0_source(s, resuming)
    state, fusion_state = resume_state(s, path, resuming)
    write_run_files(s, path, fingerprint, resuming, step0)
    trackers, named = build_trackers(s.cfg, path, state.trackers)
    out = Outputs(path, trackers, named, CsvRows(path / RETENTION, keep=state.retention_rows),
                  time.perf_counter(), state.elapsed_s)
    n_steps, schedule, guard = len(s.batches), s.schedule, s.cfg.guard

    # ---- the loop: an error keeps its traceback; the last checkpoint stays resumable ----
    try:
        if state.step == 0 and step0 is not None:
            state.last_row = copy_step0(s, out, step0)
        elif state.step == 0:
            state.last_row = evaluate(s, out, state, fusion_state, 0,
                                      list(range(len(s.batches[0]))), 0, {})
        bar = tqdm(total=n_steps, initial=state.step, desc="editing", unit="step",
                   disable=None)
        t_loop, done_before = time.perf_counter(), state.step  # s/step: this segment's steps
        for step in range(state.step + 1, n_steps + 1):
            batch = [s.records[i] for i in s.batches[step - 1]]
            t0 = time.perf_counter()
            done = edit_step(s.method, s.ctx, s.fusion, fusion_state, s.edits, batch,
                             s.fusion_seed, step, guard.max_delta_norm)
            fusion_state = done.fusion_state
            if s.cfg.save_step_deltas:
                save_step_deltas(path / "deltas", step, done.deltas, done.fused)
            if done.problem is not None:
                log.warning("step %d not applied: %s", step, done.problem)
                state.faults.append({"step": step, "reason": done.problem})
                if guard.on_fault == "stop":
                    raise FloatingPointError(f"step {step} not applied: {done.problem}")
            state.n_done += len(batch)
            extra = step_columns(done, s.edits, len(batch), t0)
            if schedule.evaluate_at(step, n_steps):
                state.last_row = evaluate(s, out, state, fusion_state, step,
                                          list(range(state.n_done - len(batch), state.n_done)),
                                          state.n_done, extra)
                bar.set_postfix(edits=state.n_done,
                                eff=f"{state.last_row['seen/efficacy']:.1f}",
                                spec=f"{state.last_row['seen/specificity']:.1f}")
            state.step = step
            if schedule.checkpoint_every and (step % schedule.checkpoint_every == 0
                                              or step == n_steps):
                save_checkpoint(s, out, state, fusion_state)
            bar.update(1)
            log.info(progress_line(step, n_steps, state.n_done, state.last_row,
                                   (time.perf_counter() - t_loop) / (step - done_before)))
        bar.close()
        return finish(s, out, state, fusion_state, fingerprint)
    finally:
        trackers.finish()


def finish(session: Session, out: Outputs, state: RunState, fusion_state: FusionState,
           fingerprint: str) -> dict[str, Any]:
    """The run's end: ``summary.json`` (through the trackers), the final deltas
    (``save_deltas``), ``resume.json`` marked done, ``retention_by_batch.csv`` and the
    trackers' tables and files. Returns the summary."""
    s, run_dir, trackers = session, out.run_dir, out.trackers
    summary = dict(state.last_row)
    wall = time.perf_counter() - out.t_start
    elapsed = out.elapsed_before + wall
    summary.update({
        "steps": len(s.batches), "edits_done": state.n_done,
        "steps_failed": len(state.faults), "faults": state.faults,
        # wall_s: this segment (since the last resume); elapsed_s and eval_s: the whole
        # run, every segment; eval_share: evaluation's share of it (issue 30)
        "wall_s": wall, "elapsed_s": elapsed, "eval_s": state.eval_s,
        "eval_share": state.eval_s / elapsed if elapsed > 0 else 0.0,
        "stats_compute_s": s.stats.compute_seconds,
        "machine": machine(s.lm),
    })
    if "seen/consistency" in summary:
        summary.update(consistency_source=s.texts.source, generation_protocol=s.texts.protocol)
    if s.cfg.save_deltas:
        from safetensors.torch import save_file

        served = s.fusion.served_offset(fusion_state)  # W_served − W₀ = total + offset
        save_file({k: (v + served[k] if k in served else v).contiguous()
                   for k, v in s.edits.total.items()}, str(run_dir / "deltas.safetensors"))
    # Local files first (summary.json: the csv tracker comes first), then what W&B
    # may refuse: a failure at W&B's end loses nothing of the run's ending.
    trackers.summary(summary)
    atomic_write(run_dir / "resume.json",
                 json.dumps({"fingerprint": fingerprint, "done": True}) + "\n")
    by_batch = retention_by_batch(out.retention.path)
    by_batch.to_csv(run_dir / RETENTION_BY_BATCH, index=False, float_format="%.6g")
    trackers.table("retention", out.retention.path)  # every row: a file artifact
    trackers.table(Path(RETENTION_BY_BATCH).stem, run_dir / RETENTION_BY_BATCH)
    if s.cfg.save_deltas:
        trackers.files("deltas", [run_dir / "deltas.safetensors"])
    return summary


def machine(lm: LoadedModel) -> str:
    """Where the run (its last segment, when resumed) ran: host, device, threads, torch."""
    return (f"{platform.node()}: {lm.device}, {torch.get_num_threads()} torch threads of "
            f"{os.cpu_count()} CPUs, torch {torch.__version__}")


def retention_by_batch(path: Path):
    """Per batch (``step_made``), the mean of each retention metric (x100) of its edits in
    the seen sample at the last evaluated step, and how many were sampled."""
    rows = pd.read_csv(path)
    last = rows[(rows["step"] == rows["step"].max()) & (rows["step_made"] > 0)]
    metrics = [c for c in ("efficacy", "generalization", "specificity") if c in last]  # 0/1
    table = last.groupby("step_made")[metrics].mean() * 100.0
    table.insert(0, "n_sampled", last.groupby("step_made").size())
    return table.reset_index()
