"""The KA study's results:
``python -m kaedit.results.ka_study publish RUN_DIR ... --out DIR``, and
``python -m kaedit.results.ka_study compare BASELINE_DIR RUN_DIR ... --out FILE.csv``
(:func:`compare_runs`: any runs, rescored ones too, against one, record by record).

Publishes finished (or unfinished: what they reached) runs of ``experiment=ka_study``
(or any kaedit runs) as small, committable files, without loading a model:

* ``summary.csv`` -- one row per run: :func:`kaedit.results.sweep.job_result`'s row
  (status, final ``seen/*``, first-batch efficacy ``retention/first_batch``, edits, steps,
  wall time of the last segment, attenuation: ``unedited_efficacy``,
  ``immediate_efficacy`` and ``batch_minus_seen_efficacy``, the mean immediate batch
  efficacy minus the last seen efficacy, called ``ka_drop`` before issue 27) and
  ``retained_aged`` (the share of the tracked edits that succeeded at their own step and
  still succeed at the last step, over every age ≥ 1; ``retained_aged_n`` of them,
  ``retained_aged_no_own_step`` left out for want of an own-step row:
  :func:`kaedit.results.plots.retention_by_age`; ``wild_retained_aged``,
  ``wild_retained_aged_n``, ``wild_retained_aged_no_own_step``: the same for the WILD
  exact match, from the steps that scored it; ``wild_retained_aged_tf``: of those same
  ``wild_retained_aged_n`` edits, the share still succeeding teacher-forced), with the
  run's method, fusion, drop rate ``p``, scope and batch size from its ``config.yaml``,
  the values at the start (step 0, the unedited model) and at the end (the last logged
  value) of fluency, consistency, WikiText-2 perplexity and the fixed set's specificity,
  the WILD scores of the seen sample at the start and the end and of the first batch at
  the end (:func:`wild_end`; runs with WILD only), ``drift_end`` (‖W − W₀‖ / ‖W₀‖ of the
  edited weights at the end) and ``fusion_change_ratio`` (‖f(Δ) − Δ‖ / ‖Δ‖, the mean over
  steps: 0 for ``add``, about √(p/(1 − p)) for drop-and-rescale; both NaN for runs that
  did not log ``update/*``), ``drift_norm_end`` (‖W − W₀‖ itself, for those runs too: from
  their last checkpoint, :func:`drift_norm_end`), ``time_s`` (the run's seconds, all
  resumed segments included: ``summary.json``'s ``elapsed_s``, or for runs made before it
  existed the edit and evaluation seconds summed over the metrics rows, which miss the
  steps that logged no row) and ``machine``;
* ``<run>/`` -- the run's ``metrics.csv``, ``retention.csv``, ``retention_by_batch.csv``,
  ``summary.json`` and ``config.yaml`` (whichever exist), and ``retention.png``
  (:func:`kaedit.results.plots.plot_retention`: efficacy of the edits made at step s
  measured at step t);
* ``paired.csv`` -- :func:`paired`: each run against the baseline fusion (``add``) of the
  same config but for the fusion (:data:`SETTINGS`), record by record on the edits both
  tracked at their last common step (every tracked edit, and the first batch alone): the
  mean of each metric (efficacy, generalization, specificity, and the WILD scores
  ``wild_efficacy``, ``wild_generalization``, ``wild_locality`` where both runs have them
  at that step, :func:`paired_metrics`) in either run, how many records each run scored
  higher, and the two-sided exact sign test's p-value over those records (McNemar's test
  for efficacy, which is 0/1 per record), and ``p_holm``, that p-value Holm-adjusted
  (:func:`holm`) over the family of every comparison this ``publish`` call writes to
  ``paired.csv``, ``paired_methods.csv`` and ``paired_p.csv`` together. With one seed and
  one order of edits per row, a difference of a few points between two rows is within what
  chance gives; this says which are not. Every record of a run shares its one trajectory
  (one order of edits, one seed and so one set of drop masks): the p-values cover the
  choice of records, not of seeds;
* ``paired_methods.csv`` -- the same, each run against the baseline method (``memit``) of
  the same config but for the method: which method holds its edits better, per fusion;
* ``paired_p.csv`` -- the same, each drop-and-rescale run against the one at p = 0.8 of
  the same config but for ``fusion.p`` (the paper's Fig. 6 sweep);
* ``retention_by_age.csv`` -- per run, metric, evaluated step and age (steps since the
  edit): of the tracked edits of that age, how many succeeded at their own step (``n``),
  how many of those still succeed (``kept``) and ``retained`` = 100·kept / n
  (:func:`kaedit.results.plots.retention_by_age`). ``metric`` is ``efficacy``
  (teacher-forced) for every run and ``wild_efficacy`` (WILD exact match, from the steps
  WILD scored) for the runs where some aged edit was scored by WILD at its own step
  (``wild.every=1``: :func:`wild_by_age`); ``figures/retained_by_age.png`` draws both at
  each run's last step (WILD dashed);
* ``figures/`` -- one plot per metric with a line per run
  (:func:`kaedit.results.plots.plot_metric`):
  ``seen_efficacy.png``, ``seen_generalization.png``, ``seen_specificity.png``,
  ``seen_score.png``, ``fixed_specificity.png``, ``first_batch.png``, and
  ``compare.png`` (the three seen metrics side by side), and ``drop_rate.png``
  (:func:`plot_drop_rate`, Fig. 6: the end-of-run metrics against p, ``add`` at p = 0,
  when some runs differ only in p or in DR against add).

Run names are the run directories' names (``hydra.run.dir=outputs/ka-1k/memit-add``);
publishing again overwrites, so it can follow each finished run.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from kaedit.errors import EXIT_BAD_INPUT, ConfigError
from kaedit.results.plots import (
    BY_AGE,
    Run,
    class_name,
    load_run,
    plot_comparison,
    plot_metric,
    plot_retention,
    pyplot,
    retained_aged,
    retention_by_age,
    run_labels,
    save_figure,
)

log = logging.getLogger(__name__)

SUMMARY = "summary.csv"
#: Per-record metrics of ``retention.csv`` compared by :func:`paired`.
PAIRED_METRICS = ("efficacy", "generalization", "specificity")
#: Per-record generation-based (WILD) scores of ``retention.csv`` (:mod:`kaedit.wild`),
#: compared as well where both runs scored every compared record with them at that step.
WILD_PAIRED_METRICS = ("wild_efficacy", "wild_generalization", "wild_locality")
#: Config nodes that decide the edits and how they are scored. Two runs are compared
#: record by record when they differ in one of them, or in one key of one (the compared
#: setting, :data:`COMPARED`), and everything else in them is equal.
SETTINGS = ("model", "dataset", "method", "fusion", "schedule", "seed", "templates", "stats")


@dataclass(frozen=True)
class Comparison:
    """What :func:`paired` compares: the runs' ``column`` of ``summary.csv``, which is the
    config value at ``node`` (dotted, inside :data:`SETTINGS`); the file it goes to; the
    default baseline; the ``publish`` option that picks another (read with ``parse``); and
    the column that names what each pair shares (the file's first column)."""

    column: str
    node: str
    file: str
    default: Any
    option: str
    shared: str
    parse: Callable[[str], Any] = str


#: Fusions against ``add`` within each method, methods against ``memit`` within each
#: fusion, and drop rates against p = 0.8 within each method and drop-and-rescale scope
#: (the paper's Fig. 6 sweep; runs without a ``p`` are not in it).
COMPARED = {
    "fusion": Comparison("fusion", "fusion", "paired.csv", "add", "--baseline", "method"),
    "method": Comparison("method", "method", "paired_methods.csv", "memit",
                         "--method-baseline", "fusion"),
    "p": Comparison("p", "fusion.p", "paired_p.csv", 0.8, "--p-baseline", "method", float),
}
#: Old names of ``summary.csv`` columns: ``ka_drop`` (before issue 27) is
#: ``batch_minus_seen_efficacy``, the mean immediate batch efficacy minus the last seen
#: efficacy (the newest batch included, and floored by the unedited model's success rate),
#: not a drop of any one edit's; :func:`read_summary` reads either.
RENAMED = {"ka_drop": "batch_minus_seen_efficacy"}
#: Per-edit retention by age of every run (:func:`kaedit.results.plots.retention_by_age`).
BY_AGE_FILE = "retention_by_age.csv"
#: Files copied from each run directory (all small: rows per step, not per token).
#: With ``resume.json`` and Hydra's overrides a published copy publishes again as its run
#: did (status, the override columns).
COPIED = ("metrics.csv", "retention.csv", "retention_by_batch.csv", "summary.json",
          "config.yaml", "resume.json", ".hydra/overrides.yaml", ".hydra/hydra.yaml")
#: Logged columns reported at the start (step 0) and at the end (last logged value).
START_END = {"fluency": "seen/fluency", "consistency": "seen/consistency",
             "perplexity": "general/perplexity", "fixed_specificity": "fixed/specificity"}
#: Columns drawn one per figure, a line per run: (column, file, title, log y axis).
FIGURES = (
    *((f"seen/{m}", f"seen_{m}.png", f"{m} of the edits made so far (seen sample)", False)
      for m in ("efficacy", "generalization", "specificity", "score")),
    ("fixed/specificity", "fixed_specificity.png",
     "specificity of one fixed set of neighbourhood prompts", False),
    ("retention/first_batch", "first_batch.png", "efficacy of the first batch's edits", False),
    ("general/perplexity", "perplexity.png", "WikiText-2 perplexity (log scale)", True),
)


def read_summary(path: str | Path) -> pd.DataFrame:
    """A ``summary.csv`` written by :func:`publish`, old ones (before issue 27) with their
    columns renamed as now (:data:`RENAMED`)."""
    table = pd.read_csv(path)
    return table.rename(columns={k: v for k, v in RENAMED.items() if v not in table})


def start_end(metrics: pd.DataFrame, column: str) -> tuple[float, float]:
    """``column`` at step 0 and its last logged value (NaN where not logged)."""
    if column not in metrics:
        return math.nan, math.nan
    start = metrics.loc[metrics["step"] == 0, column].dropna()
    logged = metrics[column].dropna()
    return (float(start.iloc[0]) if len(start) else math.nan,
            float(logged.iloc[-1]) if len(logged) else math.nan)


def drift_norm_end(run: Run) -> float:
    """‖W − W₀‖_F of the edited weights at the run's last step: its last logged
    ``update/total_norm``, or, for runs that did not log it, the norm of its last
    checkpoint's ``deltas.safetensors`` when that checkpoint is of the last step (the
    checkpoint keeps exactly W − W₀ of the edited weights, what ``update/total_norm``
    measures; :mod:`kaedit.checkpoint`); NaN when neither is there."""
    from kaedit import checkpoint
    from kaedit.weights import frobenius

    logged = start_end(run.metrics, "update/total_norm")[1]
    if not math.isnan(logged):
        return logged
    saved = checkpoint.load(run.path)
    if saved is None or saved.state.step != int(run.metrics["step"].max()):
        return math.nan
    return frobenius(saved.deltas)


def by_age(run: Run, metric: str = "efficacy", kept_by: str | None = None) -> pd.DataFrame:
    """:func:`kaedit.results.plots.retention_by_age` of the run's ``metric`` (``kept`` by
    ``kept_by``, default ``metric``; empty without ``retention.csv`` or those columns)."""
    if run.retention is None or not {metric, kept_by or metric} <= set(run.retention):
        return pd.DataFrame(columns=["step", "age", "step_made", *BY_AGE])
    return retention_by_age(run.retention, metric, kept_by)


def wild_by_age(run: Run) -> pd.DataFrame:
    """:func:`by_age` of the WILD exact match (``wild_efficacy``), empty unless some aged
    edit was scored by WILD at its own step as well (``wild.every=1``): a run with WILD at
    the start and the end only has nothing to say by age."""
    table = by_age(run, "wild_efficacy")
    return table if len(table) and table["n"].sum() > 0 else table.iloc[:0]


def wild_end(run: Run) -> dict[str, float]:
    """The WILD scores (:mod:`kaedit.wild`) of the seen sample, ``wild_<metric>_start`` at
    step 0 and ``wild_<metric>_end`` at the last step that scored them, for every
    ``wild/seen/<metric>`` the run logged (none for runs without WILD), and
    ``wild_first_batch_end``: the WILD exact match (x100) of the first batch's tracked
    edits at the last step that scored it (NaN without)."""
    row: dict[str, float] = {}
    for column in [c for c in run.metrics if c.startswith("wild/seen/")]:
        name = f"wild_{column.rsplit('/', 1)[1]}"
        row[f"{name}_start"], row[f"{name}_end"] = start_end(run.metrics, column)
    ret = run.retention
    if ret is not None and "wild_efficacy" in ret:
        scored = ret[ret["step_made"].eq(1) & ret["step"].gt(0) & ret["wild_efficacy"].notna()]
        last = scored[scored["step"] == scored["step"].max()]["wild_efficacy"]
        row["wild_first_batch_end"] = 100.0 * float(last.mean()) if len(last) else math.nan
    return row


def run_row(run: Run) -> dict[str, Any]:
    """One row of ``summary.csv`` (see the module docstring) for a loaded run."""
    from kaedit.results.sweep import job_result

    cfg, metrics = run.config, run.metrics
    fusion = cfg.get("fusion") or {}
    schedule = cfg.get("schedule") or {}
    choices = (cfg.get("tracking") or {}).get("choices") or {}
    row: dict[str, Any] = {
        "run": run.name,
        "method": choices.get("method") or class_name(cfg.get("method")).lower(),
        "fusion": choices.get("fusion") or class_name(fusion).lower(),
        "p": fusion.get("p", math.nan),
        "scope": fusion.get("scope"),
        "batch_size": schedule.get("batch_size"),
        "model": (cfg.get("model") or {}).get("name"),
        "dataset": (cfg.get("dataset") or {}).get("name"),
    }
    result = job_result(run.path)  # kaedit.results.sweep: every -m sweep's table
    result.pop("job"), result.pop("overrides")
    row.update(result)
    row.update(retained_aged(by_age(run)))
    # the same for the WILD exact match, from the steps that scored it (every step for a
    # retention by age: wild.every=1); NaN and 0 for runs without WILD at their own steps
    row.update({f"wild_{k}": v for k, v in retained_aged(by_age(run, "wild_efficacy")).items()})
    # the same edits (generated exactly at their own step), kept by teacher forcing
    row["wild_retained_aged_tf"] = retained_aged(
        by_age(run, "wild_efficacy", kept_by="efficacy"))["retained_aged"]
    for name, column in START_END.items():
        row[f"{name}_start"], row[f"{name}_end"] = start_end(metrics, column)
    row.update(wild_end(run))
    # update sizes (kaedit.experiment.update_sizes; NaN for runs that did not log them):
    # the edited weights' relative drift ‖W − W₀‖ / ‖W₀‖ at the end, and what the fusion
    # changed relative to the update, ‖f(Δ) − Δ‖ / ‖Δ‖, averaged over the steps
    row["drift_end"] = start_end(metrics, "update/total_rel")[1]
    row["drift_norm_end"] = drift_norm_end(run)
    row["fusion_change_ratio"] = math.nan
    if {"update/fusion_change_norm", "update/computed_norm"} <= set(metrics):
        ratio = (metrics["update/fusion_change_norm"] / metrics["update/computed_norm"]).dropna()
        row["fusion_change_ratio"] = float(ratio.mean()) if len(ratio) else math.nan
    # the run's own clock (every resumed segment: summary.json's elapsed_s) where it has one;
    # before issue 30, the rows' times, which miss the steps that logged no row (eval_every)
    summary_file = run.path / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
    timed = [c for c in ("time/step_s", "time/eval_s") if c in metrics]
    row["time_s"] = (float(summary["elapsed_s"]) if summary.get("elapsed_s") is not None
                     else float(metrics[timed].sum().sum()) if timed else math.nan)
    row["machine"] = summary.get("machine")
    return row


def compare_records(a: pd.DataFrame, b: pd.DataFrame, metric: str) -> dict[str, Any]:
    """Record-by-record comparison of ``metric`` between two runs' retention rows of one
    step (matched on ``case_id``; records only one run tracked are left out): the means
    (x100), how many records each run scored higher, and the two-sided exact sign test's
    p-value on those records (ties dropped; 1.0 when no record differs)."""
    from scipy.stats import binomtest

    both = a[["case_id", metric]].merge(b[["case_id", metric]], on="case_id",
                                        suffixes=("_a", "_b"), validate="one_to_one")
    diff = both[f"{metric}_b"] - both[f"{metric}_a"]
    b_higher, a_higher = int((diff > 0).sum()), int((diff < 0).sum())
    differing = a_higher + b_higher
    return {
        "n": len(both),
        "mean_a": 100.0 * float(both[f"{metric}_a"].mean()),
        "mean_b": 100.0 * float(both[f"{metric}_b"].mean()),
        "diff": 100.0 * float(diff.mean()),
        "b_higher": b_higher,
        "a_higher": a_higher,
        "p_sign": binomtest(b_higher, differing).pvalue if differing else 1.0,
    }


def holm(p_values: Sequence[float]) -> np.ndarray:
    """Holm–Bonferroni step-down adjusted p-values (Holm 1979, *Scand. J. Statist.* 6:65–70),
    in the given order. With the m p-values sorted ascending, p₍₁₎ ≤ … ≤ p₍ₘ₎, the i-th
    becomes max over j ≤ i of min(1, (m − j + 1)·p₍ⱼ₎): monotone in p, never below the raw
    value, at most 1; it controls the family-wise error rate under any dependence between
    the tests. NaN stays NaN and is not counted in m. (Neither scipy nor this project's
    other dependencies have it: scipy.stats.false_discovery_control is Benjamini–Hochberg;
    statsmodels' multipletests(method="holm") computes the same.)"""
    p = np.asarray(p_values, dtype=float)
    out = np.full(p.shape, np.nan)
    ok = np.flatnonzero(~np.isnan(p))
    order = ok[np.argsort(p[ok], kind="stable")]  # ascending; ties keep their order
    scaled = (len(order) - np.arange(len(order))) * p[order]  # (m − j + 1)·p₍ⱼ₎
    out[order] = np.minimum(1.0, np.maximum.accumulate(scaled))
    return out


def adjust_family(tables: Mapping[str, pd.DataFrame]) -> None:
    """Adds ``p_holm`` beside ``p_sign`` in every table, in place: :func:`holm` over the
    family of every comparison in all of ``tables`` together (one ``publish`` call's
    paired files), so a p_holm below α holds at α family-wise across all of them."""
    adjusted = iter(holm([p for t in tables.values() for p in t["p_sign"]]))
    for table in tables.values():
        table.insert(table.columns.get_loc("p_sign") + 1, "p_holm",
                     [next(adjusted) for _ in range(len(table))])


def _non_null(value: Any) -> Any:
    """``value`` with every null setting left out, at any depth, as new dicts (``value`` is
    not changed): a setting added later with a null default (``fusion.seed``) is the same
    as its absence from an older run's config."""
    if isinstance(value, dict):
        return {k: _non_null(v) for k, v in value.items() if v is not None}
    return value


def without(config: dict[str, Any], *nodes: str) -> dict[str, Any]:
    """The :data:`SETTINGS` nodes of a run's config with each dotted ``nodes`` and every
    null setting (:func:`_non_null`) left out: two runs that differ only in those give equal
    results."""
    kept = {k: _non_null(config.get(k)) for k in SETTINGS}  # new dicts: safe to pop from
    for node in nodes:
        *parents, leaf = node.split(".")
        at: Any = kept
        for key in parents:
            at = at.get(key) if isinstance(at, dict) else None
        if isinstance(at, dict):
            at.pop(leaf, None)
    return kept


def check_ignored(ignore: Sequence[str]) -> tuple[str, ...]:
    """``ignore`` (dotted config keys :func:`paired` leaves out) checked: each must lie
    inside one of :data:`SETTINGS` (a :class:`ConfigError` naming them otherwise)."""
    bad = [k for k in ignore if k.split(".")[0] not in SETTINGS or "." not in k]
    if bad:
        raise ConfigError(f"--ignore {bad}: each ignored key is a dotted key inside one of "
                          f"the compared config nodes {list(SETTINGS)}, e.g. "
                          "model.modules.mlp_gate")
    return tuple(ignore)


def _present(value: Any) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value))


def paired_metrics(*frames: pd.DataFrame) -> tuple[str, ...]:
    """The metrics :func:`paired` compares on these retention rows (one step of each run):
    :data:`PAIRED_METRICS`, and each of :data:`WILD_PAIRED_METRICS` that every frame has
    for every row (WILD runs on some steps only; NaN elsewhere)."""
    return PAIRED_METRICS + tuple(
        m for m in WILD_PAIRED_METRICS
        if all(m in f and len(f) and bool(f[m].notna().all()) for f in frames))


#: The record subsets :func:`compare_pair` compares: every edit both runs tracked, and the
#: first batch's edits alone.
SUBSETS = (("tracked", lambda df: df), ("first_batch", lambda df: df[df["step_made"] == 1]))


def compare_pair(a: pd.DataFrame, b: pd.DataFrame,
                 steps: tuple[int, int] | None = None) -> list[dict[str, Any]]:
    """Two runs' ``retention.csv`` rows compared record by record at the last step both
    reached (or at ``steps``, one step of each run), on the edits both tracked there
    (``subset=tracked``) and on the edits of both first batches (``first_batch``), for
    each of :func:`paired_metrics`: one dict per (subset, metric) with ``step`` (run
    ``a``'s), ``subset``, ``metric`` and :func:`compare_records`' columns."""
    if steps is None:
        steps = (min(a["step"].max(), b["step"].max()),) * 2
    at = [r[(r["step"] == s) & (r["step_made"] > 0)] for r, s in zip((a, b), steps, strict=True)]
    return [{"step": int(steps[0]), "subset": subset, "metric": metric,
             **compare_records(pick(at[0]), pick(at[1]), metric)}
            for subset, pick in SUBSETS for metric in paired_metrics(*at)]


#: Columns of each :func:`compare_pair` record, in the paired tables' order.
RECORD_COLUMNS = ("step", "subset", "metric", "n", "mean_a", "mean_b", "diff", "b_higher",
                  "a_higher", "p_sign")
#: Columns of :func:`compare_runs`' table: ``step`` is the baseline's, ``step_b`` the other
#: run's (the same step unless ``final``).
COMPARE_COLUMNS = ("a", "b", *RECORD_COLUMNS[:1], "step_b", *RECORD_COLUMNS[1:], "p_holm")


def repeated(names: Sequence[str]) -> list[str]:
    """The names given more than once, sorted: runs are named by their folders' names,
    which must be distinct (:func:`publish`, :func:`compare_runs`)."""
    return sorted({n for n in names if names.count(n) > 1})


def compare_runs(baseline: str | Path, run_dirs: Sequence[str | Path],
                 final: bool = False, step: int | None = None) -> pd.DataFrame:
    """Each of ``run_dirs`` against ``baseline``, record by record (:func:`compare_pair`),
    whatever their configs: for pairs :func:`paired` does not make (two fusions other than
    ``add``, or runs rescored by :mod:`kaedit.rescore`, whose folders hold ``metrics.csv``
    and ``retention.csv`` only), with ``p_holm`` over this call's comparisons alone. At
    the last step both runs reached, or with ``final`` at each run's own last step: the
    final models of runs whose steps do not line up (other batch sizes), or with ``step``
    at that step of both (an earlier point of the same runs: 1,000 of 2,000 edits); a step
    either run did not evaluate is a :class:`ConfigError` naming the steps both evaluated,
    as is ``step`` with ``final``. Directories are
    named by their folder name (``a``, ``b``); a folder without ``retention.csv``, two
    folders of one name, or a run with no tracked edit in common with the baseline is a
    :class:`ConfigError` naming it."""
    runs = [load_run(d) for d in (baseline, *run_dirs)]  # FileNotFoundError without metrics
    if dup := repeated([run.name for run in runs]):
        raise ConfigError(f"runs named {dup} more than once: compare names runs by their "
                          "folder names; give them distinct folders")
    if missing := [str(run.path) for run in runs if run.retention is None]:
        raise ConfigError(f"{missing}: no retention.csv, nothing to compare record by record")
    if final and step is not None:
        raise ConfigError(f"step={step} with final: compare at one given step or at each "
                          "run's last step, not both")
    ref, *others = runs
    table = []
    for run in others:
        last = (int(ref.retention["step"].max()), int(run.retention["step"].max()))
        if step is not None:
            both = sorted(set(ref.retention["step"]) & set(run.retention["step"]) - {0})
            if step not in both:
                raise ConfigError(f"step={step}: {ref.name!r} and {run.name!r} both evaluated "
                                  f"their edits at steps {[int(s) for s in both]} only")
            steps, where = (step, step), f"step {step}"
        elif final:
            steps, where = last, "their own last steps"
        else:
            steps, where = (min(last),) * 2, "their last common step"
        records = compare_pair(ref.retention, run.retention, steps)
        if records[0]["n"] == 0:  # the first record: every tracked edit, first metric
            raise ConfigError(f"{run.name!r} and the baseline {ref.name!r} tracked no edit in "
                              f"common at {where}")
        table += [{"a": ref.name, "b": run.name, "step_b": steps[1], **r} for r in records]
    out = pd.DataFrame(table, columns=list(COMPARE_COLUMNS[:-1]))
    adjust_family({"compare": out})  # p_holm over this call alone
    return out


def paired(runs: Sequence[Run], rows: Sequence[dict[str, Any]],
           baseline: Any = "add", compared: str = "fusion",
           ignore: Sequence[str] = ()) -> pd.DataFrame:
    """Every run against the run whose ``compared`` setting (:data:`COMPARED`: ``fusion``,
    ``method`` or ``p``) is ``baseline`` and whose config is otherwise equal (:func:`without`),
    at the last step both reached, on the edits both tracked there (``subset=tracked``: the
    seen sample and the first batch) and on the first batch alone (``subset=first_batch``);
    one row per (pair, subset, metric) with :func:`compare_records`' columns. ``rows``
    are the runs' :func:`run_row` rows. Runs without ``retention.csv``, without the
    setting (``p`` of ``add``) or with no baseline are not compared. The first column is
    what the pair shares (the method when fusions or drop rates are compared, the fusion
    when methods are). ``ignore``: dotted config keys left out of "otherwise equal" as
    well (settings the runs differ in that cannot change their results, e.g. a module
    path added to the model config after the older runs, which their method never
    reads)."""
    if compared not in COMPARED:
        raise ConfigError(f"compared={compared!r}: paired compares one of {sorted(COMPARED)}")
    c = COMPARED[compared]
    rest = [without(run.config, c.node, *ignore) for run in runs]
    table = []
    for i, (run, row) in enumerate(zip(runs, rows, strict=True)):
        if row[c.column] == baseline or not _present(row[c.column]) or run.retention is None:
            continue
        for j, (ref, ref_row) in enumerate(zip(runs, rows, strict=True)):
            if j == i or ref_row[c.column] != baseline or rest[j] != rest[i] \
                    or ref.retention is None:
                continue
            table += [{c.shared: row[c.shared], "a": ref.name, "b": run.name,
                       f"{compared}_a": ref_row[c.column], f"{compared}_b": row[c.column],
                       **record} for record in compare_pair(ref.retention, run.retention)]
    return pd.DataFrame(table, columns=[
        c.shared, "a", "b", f"{compared}_a", f"{compared}_b", *RECORD_COLUMNS])


def baselines_for(rows: Sequence[dict[str, Any]],
                  chosen: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Each :data:`COMPARED` setting's baseline: ``chosen``'s where given, else the
    default. A chosen one that no run has is a :class:`ConfigError` naming the runs' values
    (a default no run has just gives an empty file)."""
    chosen = dict(chosen or {})
    if unknown := sorted(set(chosen) - set(COMPARED)):
        raise ConfigError(f"baselines for {unknown}: the compared settings are "
                          f"{sorted(COMPARED)}")
    out = {}
    for name, c in COMPARED.items():
        out[name] = chosen.get(name, c.default)
        have = sorted({r[c.column] for r in rows if _present(r[c.column])}, key=str)
        if name in chosen and out[name] not in have:
            raise ConfigError(f"{c.option} {out[name]!r}: no run has {c.column} = "
                              f"{out[name]!r}; the runs' values of {c.column} are {have}")
    return out


#: The fusion that is drop-and-rescale at p = 0 (every entry kept, rescaled by 1): drawn
#: at p = 0 in ``drop_rate.png``.
ZERO_DROP = "add"
#: Panels of ``drop_rate.png``: ``summary.csv`` columns (the end of each run) and titles.
DROP_RATE_PANELS = (("seen/efficacy", "efficacy (seen)"),
                    ("seen/generalization", "generalization (seen)"),
                    ("seen/specificity", "specificity (seen)"),
                    ("retention/first_batch", "first batch efficacy"))


def drop_rate_groups(runs: Sequence[Run], rows: Sequence[dict[str, Any]],
                     ignore: Sequence[str] = ()) -> list[tuple[str, list[dict[str, Any]]]]:
    """The runs that differ only in the drop rate ``p``, grouped, each group with the
    :data:`ZERO_DROP` run of its config at p = 0 where there is one: ``(label, rows)``
    with ``rows`` sorted by ``p`` (0 for the ``add`` run) and two runs or more."""
    def key(config: dict[str, Any]) -> str:
        return json.dumps(config, sort_keys=True, default=str)

    by_p = [key(without(r.config, COMPARED["p"].node, *ignore)) for r in runs]
    by_fusion = [key(without(r.config, COMPARED["fusion"].node, *ignore)) for r in runs]
    groups: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        if _present(row["p"]):
            groups.setdefault(by_p[i], []).append(i)
    out = []
    for members in groups.values():
        zero = [j for j, row in enumerate(rows) if row["fusion"] == ZERO_DROP
                and by_fusion[j] == by_fusion[members[0]]]
        points = [{**rows[j], "p": 0.0} for j in zero] + [rows[i] for i in members]
        if len(points) >= 2:
            first = rows[members[0]]
            out.append((f"{first['method']}, {first['fusion']} {first['scope']} scope",
                        sorted(points, key=lambda r: r["p"])))
    return out


def plot_drop_rate(runs: Sequence[Run], rows: Sequence[dict[str, Any]],
                   path: Path, ignore: Sequence[str] = ()) -> Path | None:
    """The paper's Fig. 6: the end-of-run metrics (:data:`DROP_RATE_PANELS`) against the
    drop rate p, a line per :func:`drop_rate_groups` group (None: no group)."""
    groups = drop_rate_groups(runs, rows, ignore)
    if not groups:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(1, len(DROP_RATE_PANELS), figsize=(14, 3.6))
    for ax, (column, title) in zip(axes, DROP_RATE_PANELS, strict=True):
        for label, points in groups:
            ax.plot([r["p"] for r in points], [r[column] for r in points], marker="o",
                    label=label)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(f"drop rate p (0: {ZERO_DROP})")
        ax.set_xlim(-0.05, 1.0)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"after {max(r['edits_done'] for _, g in groups for r in g):,} edits",
                 fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_retained_by_age(runs: Sequence[Run], ages: Sequence[pd.DataFrame],
                         path: Path, wild_ages: Sequence[pd.DataFrame]) -> Path | None:
    """At each run's last evaluated step, the share (x100) of the edits that succeeded at
    their own step and still succeed, against their age (steps since the edit), a line per
    run, and a dashed one in the same colour for the WILD exact match where ``wild_ages``
    (one table per run, empty for none) has it (None: no run has an aged edit)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    drawn = False
    for table, wild, label in zip(ages, wild_ages, run_labels(runs), strict=True):
        last = table[table["step"] == table["step"].max()] if len(table) else table
        colour = None
        if len(last):
            colour = ax.plot(last["age"], last["retained"], marker="o", ms=3,
                             label=label)[0].get_color()
            drawn = True
        last = wild[wild["step"] == wild["step"].max()] if len(wild) else wild
        if len(last):
            ax.plot(last["age"], last["retained"], marker="x", ms=4, ls="--", color=colour,
                    label=f"{label} (WILD EM)")
            drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("age (steps since the edit) at the last step")
    ax.set_ylabel("still succeeding, of those that succeeded at once (%)")
    ax.set_ylim(0, 102)
    ax.set_title("retention of learnt edits by age", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path)


def publish(run_dirs: Sequence[str | Path], out: str | Path,
            baselines: Mapping[str, Any] | None = None,
            ignore: Sequence[str] = ()) -> list[Path]:
    """Write ``summary.csv``, the paired files, the copies and the figures into ``out``;
    returns the paths. ``baselines`` picks, per :data:`COMPARED` setting, the baseline the
    others are compared with (by default ``add``, ``memit`` and p = 0.8); ``ignore``: config
    keys the pairing leaves out (:func:`paired`)."""
    ignore = check_ignored(ignore)
    out = Path(out)
    if dup := repeated([Path(d).resolve().name for d in run_dirs]):
        raise FileNotFoundError(f"runs named {dup} more than once: each run's files go to "
                                "OUT/<run dir name>; give the runs distinct directory names")
    runs = [load_run(d) for d in run_dirs]  # fails on a directory without metrics.csv
    rows = [run_row(run) for run in runs]
    chosen = baselines_for(rows, baselines)  # checked before anything is written
    out.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(out / SUMMARY, index=False, float_format="%.6g")
    written = [out / SUMMARY]
    tables = {COMPARED[compared].file: paired(runs, rows, baseline, compared, ignore)
              for compared, baseline in chosen.items()}
    adjust_family(tables)  # p_holm: one family, every comparison of this call
    for file, table in tables.items():
        written.append(out / file)
        table.to_csv(written[-1], index=False, float_format="%.6g")
    ages = [by_age(run) for run in runs]
    wild_ages = [wild_by_age(run) for run in runs]
    table = pd.concat([t.assign(run=run.name, metric=metric)
                       for metric, tables in (("efficacy", ages), ("wild_efficacy", wild_ages))
                       for t, run in zip(tables, runs, strict=True)], ignore_index=True)
    table.insert(0, "metric", table.pop("metric"))
    table.insert(0, "run", table.pop("run"))
    written.append(out / BY_AGE_FILE)
    table.to_csv(written[-1], index=False, float_format="%.6g")
    for run in runs:
        dest = out / run.name
        dest.mkdir(exist_ok=True)
        for name in COPIED:
            if (run.path / name).is_file():
                (dest / name).parent.mkdir(exist_ok=True)
                shutil.copyfile(run.path / name, dest / name)
                written.append(dest / name)
        written += [p for p in (plot_retention(run, dest),) if p]
    figures = out / "figures"
    written += [p for column, name, title, log in FIGURES
                if (p := plot_metric(runs, column, figures / name, title, log))]
    written.append(plot_comparison(runs, figures))
    written += [p for p in (plot_drop_rate(runs, rows, figures / "drop_rate.png", ignore),
                            plot_retained_by_age(runs, ages, figures / "retained_by_age.png",
                                                 wild_ages))
                if p]
    return written


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(prog="python -m kaedit.results.ka_study",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    pub = sub.add_parser("publish", help="summary.csv, the runs' small files and figures")
    pub.add_argument("runs", nargs="+", metavar="RUN_DIR", help="kaedit run directories")
    pub.add_argument("--out", required=True, help="e.g. docs/results/ka-1k")
    for name, c in COMPARED.items():
        pub.add_argument(c.option, dest=f"baseline_{name}", type=c.parse, default=None,
                         metavar=c.column.upper(),
                         help=f"{c.column} the other runs are compared with in {c.file} "
                              f"(default: {c.default})")
    pub.add_argument("--ignore", action="append", default=[], metavar="KEY",
                     help="a dotted config key (e.g. model.modules.mlp_gate) the pairing "
                          "leaves out of 'otherwise equal': a setting the runs differ in "
                          "that cannot change their results; repeatable")
    cmp = sub.add_parser("compare", help="runs against one baseline run, record by record, "
                                          "Holm-adjusted within the call (any two runs, "
                                          "rescored ones too)")
    cmp.add_argument("baseline", metavar="BASELINE_DIR",
                     help="the run the others are compared with")
    cmp.add_argument("others", nargs="+", metavar="RUN_DIR", help="run or rescore directories")
    cmp.add_argument("--out", required=True, help="the CSV file to write")
    cmp.add_argument("--final", action="store_true",
                     help="compare each run at its own last step (the final models of runs "
                          "whose steps differ, e.g. other batch sizes), not at the last "
                          "step both reached")
    cmp.add_argument("--step", type=int, default=None, metavar="STEP",
                     help="compare both runs at this evaluated step (e.g. 10: 1,000 edits "
                          "of a 2,000-edit run in batches of 100), not at the last step "
                          "both reached")
    args = parser.parse_args(argv)
    if args.command == "compare":
        try:
            table = compare_runs(args.baseline, args.others, final=args.final, step=args.step)
        except (FileNotFoundError, ConfigError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_BAD_INPUT
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        table.to_csv(args.out, index=False, float_format="%.6g")
        print(table.to_string(index=False))
        return 0
    chosen = {name: getattr(args, f"baseline_{name}") for name in COMPARED}
    try:
        written = publish(args.runs, args.out,
                          {k: v for k, v in chosen.items() if v is not None}, args.ignore)
    except (FileNotFoundError, ConfigError) as exc:  # bad input; other errors keep their traceback
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    for p in written:
        print(p)
    print(read_summary(Path(args.out) / SUMMARY).to_string(index=False))
    for c in COMPARED.values():
        pairs = pd.read_csv(Path(args.out) / c.file)
        if len(pairs):
            print(pairs.to_string(index=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
