"""The sequential-edit recipe, top to bottom (paper §2.3).

Build the parts in order (data, schedule, model, statistics, method, fusion, evaluation,
trackers), evaluate the unedited model (step 0), then for each step t: compute Δ on
M_{t-1} → fuse → check → apply → evaluate → log. Everything the run owns (statistics,
tokenisation caches, random generators, the fusion's state) is created here; nothing is
module-level. A fusion may serve other weights than the method edits (Lookahead's slow
weights, WiSE-FT's interpolation): evaluations and ``save_deltas`` see the served ones.
"""

from __future__ import annotations

import hashlib
import itertools
import json
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

from kaedit import checkpoint, data
from kaedit.errors import ConfigError
from kaedit.evaluate import Evaluator, Scorer, TextMetrics, aggregate, check_tokenisation
from kaedit.fusion import FusionState, FusionStrategy
from kaedit.methods.base import EditContext, EditMethod
from kaedit.methods.core import context_templates
from kaedit.models import LoadedModel, load_model
from kaedit.records import Deltas, EditRequest
from kaedit.schedule import Schedule
from kaedit.stats import CovarianceStore
from kaedit.trace import resolve_from_trace
from kaedit.tracking import Trackers, atomic_write
from kaedit.weights import EditedWeights, delta_problem

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
CONF_DIR = REPO_ROOT / "conf"


def compose(overrides: Sequence[str] = (), name: str = "config", *,
            hydra_config: bool = False) -> DictConfig:
    """The config that ``python -m kaedit.run`` (``name="config"``), ``kaedit.trace``
    (``"trace"``) or ``kaedit.train_mend`` (``"train_mend"``) would run with ``overrides``,
    composed without starting a Hydra job: for scripts, notebooks and tests.
    ``hydra_config=True`` keeps the ``hydra`` node (``hydra.runtime.choices``, ...)."""
    import hydra

    with hydra.initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra.compose(name, overrides=list(overrides), return_hydra_config=hydra_config)


def resolve_data_root(cfg: DictConfig) -> None:
    """Make a relative ``data_root`` absolute: from the working dir, else the repo root."""
    root = Path(str(cfg.data_root)).expanduser()
    if not root.is_absolute():
        here = Path.cwd() / root
        root = here if here.exists() or not (REPO_ROOT / root).exists() else REPO_ROOT / root
    cfg.data_root = str(root.resolve())


def build(node: Any, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate``, re-raising our own errors unwrapped (one clear line)."""
    from hydra.errors import InstantiationException

    from kaedit.errors import USER_ERRORS

    try:
        return instantiate(node, **kwargs)
    except InstantiationException as exc:
        cause = exc.__cause__
        if isinstance(cause, (*USER_ERRORS, ValueError)):
            raise cause from None
        raise


def step_generator(seed: int, step: int) -> torch.Generator:
    """The generator for step ``step``'s randomness (drop masks): a pure function of both."""
    return torch.Generator().manual_seed(int(seed) * 1_000_003 + int(step))


class Evaluation:
    """Scores this step's batch and a stable sample of all edits so far; on generation
    steps also their text metrics (``texts``)."""

    def __init__(self, evaluator: Evaluator, scorer: Scorer, planned: Sequence[EditRequest],
                 sample: int | None, seed: int, texts: TextMetrics | None = None) -> None:
        self.evaluator, self.scorer, self.texts = evaluator, scorer, texts
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

    def indices(self, batch: Sequence[int], n_done: int) -> list[int]:
        """The planned edits an evaluation scores: the batch and the ``seen`` sample."""
        return sorted(set(batch) | set(self.seen_indices(n_done)))

    def __call__(self, batch: Sequence[int], n_done: int,
                 generate: bool = False) -> tuple[dict, list[int], dict]:
        """``batch``: indices into the planned edits. Each request is scored once."""
        seen = self.seen_indices(n_done)
        both = self.indices(batch, n_done)
        values = self.evaluator(self.scorer, [self.planned[i] for i in both],
                                texts=self.texts if generate else None)
        at = {i: k for k, i in enumerate(both)}

        def pick(idx: Sequence[int]) -> dict:
            rows = [at[i] for i in idx]
            return {k: v[rows] for k, v in values.items()}

        per_seen = pick(seen)
        row = {**aggregate(pick(batch), "batch"), **aggregate(per_seen, "seen")}
        return row, seen, per_seen


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
    """``step-NNNN.safetensors`` (as computed) and ``step-NNNN-fused.safetensors``."""
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

    # 1. data and plan: fail on bad input before anything is loaded or written
    records = data.from_config(cfg.dataset, cache_dir=str(Path(cfg.cache_dir) / "data"))
    schedule = Schedule(**OmegaConf.to_container(cfg.schedule, resolve=True))
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
    lm: LoadedModel = load_model(cfg.model, lambda: build(cfg.model.load))
    lm.spec.check(lm.model, [int(x) for x in cfg.method.get("layers", cfg.model.edit.layers)])
    check_tokenisation(lm.tokenizer, evaluator, planned)  # bad input: before any statistics
    torch.manual_seed(seed)
    method: EditMethod = build(cfg.method, _convert_="all")
    stats: CovarianceStore = build(cfg.stats)
    templates = context_templates(lm, [tuple(s) for s in cfg.templates.specs], seed=seed)
    ctx = EditContext(lm=lm, stats=stats, templates=templates)
    method.prepare(ctx)
    texts: TextMetrics = build(cfg.generation, _partial_=True)(lm=lm)  # lm: not a config
    evaluation = Evaluation(evaluator, Scorer(lm, int(cfg.eval_batch_size)), planned,
                            schedule.retention_sample, seed, texts)
    edits = EditedWeights(lm.model)

    # 3. state to continue from (resume), outputs and trackers
    state: dict[str, Any] = {"step": 0, "n_done": 0, "retention": [], "faults": [],
                             "trackers": {}, "last_row": {}}
    fusion_state = fusion.init_state()
    if resuming:
        ckpt = checkpoint.load(run_dir)
        edits.load(ckpt.deltas)
        method.load_state_dict(ckpt.method_tensors)
        if ckpt.fusion_state:
            fusion_state = FusionState.from_flat(ckpt.fusion_state)
        checkpoint.restore_rng(ckpt.state)
        state.update(ckpt.state)
    if texts.needs_references:
        # Consistency's fallback reference text comes from the unedited model: generate it
        # now, before the first edit, for every request a generation step will evaluate.
        if state["step"] == 0:
            due = [planned[i] for i in generation_indices(schedule, batches, evaluation)]
            state["references"] = texts.make_references(due)
        texts.references = state.setdefault("references", {})
    run_dir.mkdir(parents=True, exist_ok=True)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    atomic_write(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    atomic_write(run_dir / "resume.json", json.dumps({"fingerprint": fingerprint}) + "\n")
    logger_cfg = cfg.logger or {}
    # partial first: instantiate would otherwise recurse into the config's own _target_s
    named = {name: instantiate(t, _partial_=True)(
        run_dir=str(run_dir), run_config=resolved, resume=state["trackers"].get(name))
        for name, t in logger_cfg.items()}
    trackers = Trackers(named.values())
    n_steps = len(batches)
    made_at = [s for s, r in enumerate(batches, start=1) for _ in r]  # per planned edit
    t_start = time.perf_counter()

    def evaluate(step: int, batch: Sequence[int], n_done: int, extra: Mapping) -> dict:
        t0, pairs0 = time.perf_counter(), evaluation.scorer.pairs_scored
        with edits.serving(fusion.served_offset(fusion_state)):
            row, seen, per_seen = evaluation(batch, n_done,
                                             schedule.generation_at(step, n_steps))
        row = {"step": step, "edits_done": n_done, **extra, **row,
               "time/eval_s": time.perf_counter() - t0,
               "eval/prompts": evaluation.scorer.pairs_scored - pairs0}
        trackers.log(row, step)
        for j, i in enumerate(seen):
            state["retention"].append({"step": step, "case_id": planned[i].case_id,
                                       "step_made": made_at[i] if i < n_done else 0,
                                       **{k: float(v[j]) for k, v in per_seen.items()}})
        return row

    try:
        if state["step"] == 0:
            state["last_row"] = evaluate(0, list(range(len(batches[0]))), 0, {})
        bar = tqdm(total=n_steps, initial=state["step"], desc="editing", unit="step",
                   disable=None)
        for step in range(state["step"] + 1, n_steps + 1):
            batch = [records[i] for i in batches[step - 1]]
            ctx.clock.take()
            t0 = time.perf_counter()
            deltas = method.compute_deltas(ctx, batch)
            t_compute = time.perf_counter() - t0
            stages = ctx.clock.take()  # targets / keys / solve, for methods that report them
            t_fuse = time.perf_counter()
            next_fusion_state, fused = fusion.step(fusion_state, deltas,
                                                   step_generator(seed, step))
            t_fuse = time.perf_counter() - t_fuse
            if cfg.save_step_deltas:
                save_step_deltas(run_dir / "deltas", step, deltas, fused)
            problem = delta_problem(fused, cfg.guard.max_delta_norm)
            if problem is None:
                edits.add(fused)
                fusion_state = next_fusion_state
                method.commit(ctx, batch, fused)
            else:
                log.warning("step %d not applied: %s", step, problem)
                state["faults"].append({"step": step, "reason": problem})
                if cfg.guard.on_fault == "stop":
                    raise FloatingPointError(f"step {step} not applied: {problem}")
            state["n_done"] += len(batch)
            n_done = state["n_done"]
            extra = {"applied": int(problem is None), "time/compute_s": t_compute,
                     **{f"time/{k}_s": v for k, v in stages.items()},
                     "time/fusion_s": t_fuse, "time/step_s": time.perf_counter() - t0}
            if schedule.evaluate_at(step, n_steps):
                state["last_row"] = evaluate(step, list(range(n_done - len(batch), n_done)),
                                             n_done, extra)
                bar.set_postfix(edits=n_done, eff=f"{state['last_row']['seen/efficacy']:.1f}",
                                spec=f"{state['last_row']['seen/specificity']:.1f}")
            state["step"] = step
            if schedule.checkpoint_every and (step % schedule.checkpoint_every == 0
                                              or step == n_steps):
                state["trackers"] = {n: t.state() for n, t in named.items()}
                checkpoint.save(run_dir, step, edits.total, method.state_dict(), state,
                                fusion_state.flat())
            bar.update(1)
        bar.close()

        summary = dict(state["last_row"])
        summary.update({
            "steps": n_steps, "edits_done": state["n_done"],
            "steps_failed": len(state["faults"]), "faults": state["faults"],
            "wall_s": time.perf_counter() - t_start,
            "stats_compute_s": stats.compute_seconds,
        })
        if "seen/consistency" in summary:
            summary.update(consistency_source=texts.source, generation_protocol=texts.protocol)
        _write_retention(run_dir / "retention.csv", state["retention"])
        trackers.table("retention", state["retention"])  # W&B: step made x step measured
        if cfg.save_deltas:
            from safetensors.torch import save_file

            served = fusion.served_offset(fusion_state)  # W_served − W₀ = total + offset
            save_file({k: (v + served[k] if k in served else v).contiguous()
                       for k, v in edits.total.items()}, str(run_dir / "deltas.safetensors"))
        trackers.summary(summary)
        atomic_write(run_dir / "resume.json",
                     json.dumps({"fingerprint": fingerprint, "done": True}) + "\n")
        return summary
    finally:
        trackers.finish()


def _write_retention(path: Path, rows: list[dict[str, Any]]) -> None:
    import pandas as pd

    df = pd.DataFrame(rows)
    atomic_write(path, df.to_csv(index=False, float_format="%.6g"))

