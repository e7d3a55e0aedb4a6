"""``python -m kaedit.ka_study publish RUN_DIR ... --out DIR``: the KA study's results.

Publishes finished (or unfinished: what they reached) runs of ``experiment=ka_study``
(or any kaedit runs) as small, committable files, without loading a model:

* ``summary.csv`` -- one row per run: :func:`kaedit.sweep.job_result`'s row (status, final
  ``seen/*``, first-batch efficacy ``retention/first_batch``, edits, steps, wall time of
  the last segment, attenuation) with the run's method, fusion, drop rate ``p``, scope
  and batch size from its ``config.yaml``, the values at the start (step 0, the unedited
  model) and at the end (the last logged value) of fluency, consistency, WikiText-2
  perplexity and the fixed set's specificity, ``drift_end`` (‖W − W₀‖ / ‖W₀‖ of the
  edited weights at the end) and ``fusion_change_ratio`` (‖f(Δ) − Δ‖ / ‖Δ‖, the mean
  over steps: 0 for ``add``, about √(p/(1 − p)) for drop-and-rescale; both NaN for runs
  that did not log ``update/*``), ``time_s`` (edit and evaluation seconds
  summed over every step's row, all resumed segments included) and ``machine``;
* ``<run>/`` -- the run's ``metrics.csv``, ``retention.csv``, ``retention_by_batch.csv``,
  ``summary.json`` and ``config.yaml`` (whichever exist), and ``retention.png``
  (:func:`kaedit.analyze.plot_retention`: efficacy of the edits made at step s measured at
  step t);
* ``paired.csv`` -- :func:`paired`: each run against the baseline fusion (``add``) of the
  same config but for the fusion (:data:`SETTINGS`), record by record on the edits both
  tracked at their last common step (every tracked edit, and the first batch alone): the
  mean of each metric in either run, how many records each run scored higher, and the
  two-sided exact sign test's p-value over those records (McNemar's test for efficacy,
  which is 0/1 per record). With one seed and one order of edits per row, a difference of
  a few points between two rows is within what chance gives; this says which are not;
* ``paired_methods.csv`` -- the same, each run against the baseline method (``memit``) of
  the same config but for the method: which method holds its edits better, per fusion;
* ``figures/`` -- one plot per metric with a line per run (:func:`kaedit.analyze.plot_metric`):
  ``seen_efficacy.png``, ``seen_generalization.png``, ``seen_specificity.png``,
  ``seen_score.png``, ``fixed_specificity.png``, ``first_batch.png``, and
  ``compare.png`` (the three seen metrics side by side).

Run names are the run directories' names (``hydra.run.dir=outputs/ka-1k/memit-add``);
publishing again overwrites, so it can follow each finished run.
"""

from __future__ import annotations

import argparse
import logging
import math
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from kaedit.errors import EXIT_BAD_INPUT, ConfigError

if TYPE_CHECKING:
    from kaedit.analyze import Run

log = logging.getLogger(__name__)

SUMMARY = "summary.csv"
#: Per-record metrics of ``retention.csv`` compared by :func:`paired`.
PAIRED_METRICS = ("efficacy", "generalization", "specificity")
#: Config nodes that decide the edits and how they are scored. Two runs are compared
#: record by record when they differ in one of them, the compared one (:data:`COMPARED`),
#: and all the others are equal.
SETTINGS = ("model", "dataset", "method", "fusion", "schedule", "seed", "templates", "stats")
#: What :func:`paired` can compare (a ``summary.csv`` column and config node), the file
#: it goes to, the default baseline and the ``publish`` option that picks another:
#: fusions against ``add`` within each method, methods against ``memit`` within each fusion.
COMPARED = {"fusion": ("paired.csv", "add", "--baseline"),
            "method": ("paired_methods.csv", "memit", "--method-baseline")}
#: Files copied from each run directory (all small: rows per step, not per token).
COPIED = ("metrics.csv", "retention.csv", "retention_by_batch.csv", "summary.json",
          "config.yaml")
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


def start_end(metrics: pd.DataFrame, column: str) -> tuple[float, float]:
    """``column`` at step 0 and its last logged value (NaN where not logged)."""
    if column not in metrics:
        return math.nan, math.nan
    start = metrics.loc[metrics["step"] == 0, column].dropna()
    logged = metrics[column].dropna()
    return (float(start.iloc[0]) if len(start) else math.nan,
            float(logged.iloc[-1]) if len(logged) else math.nan)


def run_row(run: Run) -> dict[str, Any]:
    """One row of ``summary.csv`` (see the module docstring) for a loaded run."""
    import json

    from kaedit.analyze import _class_name
    from kaedit.sweep import job_result

    cfg, metrics = run.config, run.metrics
    fusion = cfg.get("fusion") or {}
    schedule = cfg.get("schedule") or {}
    choices = (cfg.get("tracking") or {}).get("choices") or {}
    row: dict[str, Any] = {
        "run": run.name,
        "method": choices.get("method") or _class_name(cfg.get("method")).lower(),
        "fusion": choices.get("fusion") or _class_name(fusion).lower(),
        "p": fusion.get("p", math.nan),
        "scope": fusion.get("scope"),
        "batch_size": schedule.get("batch_size"),
        "model": (cfg.get("model") or {}).get("name"),
        "dataset": (cfg.get("dataset") or {}).get("name"),
    }
    result = job_result(run.path)  # kaedit.sweep: the table every -m sweep ends with
    result.pop("job"), result.pop("overrides")
    row.update(result)
    for name, column in START_END.items():
        row[f"{name}_start"], row[f"{name}_end"] = start_end(metrics, column)
    # update sizes (kaedit.experiment.update_sizes; NaN for runs that did not log them):
    # the edited weights' relative drift ‖W − W₀‖ / ‖W₀‖ at the end, and what the fusion
    # changed relative to the update, ‖f(Δ) − Δ‖ / ‖Δ‖, averaged over the steps
    row["drift_end"] = start_end(metrics, "update/total_rel")[1]
    row["fusion_change_ratio"] = math.nan
    if {"update/fusion_change_norm", "update/computed_norm"} <= set(metrics):
        ratio = (metrics["update/fusion_change_norm"] / metrics["update/computed_norm"]).dropna()
        row["fusion_change_ratio"] = float(ratio.mean()) if len(ratio) else math.nan
    timed = [c for c in ("time/step_s", "time/eval_s") if c in metrics]
    row["time_s"] = float(metrics[timed].sum().sum()) if timed else math.nan
    summary = run.path / "summary.json"
    row["machine"] = (json.loads(summary.read_text()).get("machine")
                      if summary.is_file() else None)
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


def paired(runs: Sequence[Run], rows: Sequence[dict[str, Any]],
           baseline: str = "add", compared: str = "fusion") -> pd.DataFrame:
    """Every run against the run whose ``compared`` setting (:data:`COMPARED`: ``fusion``
    or ``method``) is ``baseline`` and whose other :data:`SETTINGS` nodes are equal, at the
    last step both reached, on the edits both tracked there (``subset=tracked``: the seen
    sample and the first batch) and on the first batch alone (``subset=first_batch``);
    one row per (pair, subset, metric) with :func:`compare_records`' columns. ``rows``
    are the runs' :func:`run_row` rows. Runs without ``retention.csv``, or with no
    baseline, are not compared. The first column is the setting the pair shares (the
    method when fusions are compared, the fusion when methods are)."""
    if compared not in COMPARED:
        raise ConfigError(f"compared={compared!r}: paired compares one of {sorted(COMPARED)}")
    shared = "method" if compared == "fusion" else "fusion"
    key = [k for k in SETTINGS if k != compared]
    table = []
    for run, row in zip(runs, rows, strict=True):
        base = [(r, s) for r, s in zip(runs, rows, strict=True)
                if s[compared] == baseline and r is not run
                and all(r.config.get(k) == run.config.get(k) for k in key)]
        if row[compared] == baseline or not base or run.retention is None:
            continue
        for ref, ref_row in base:
            if ref.retention is None:
                continue
            step = min(run.retention["step"].max(), ref.retention["step"].max())
            at = [r.retention[(r.retention["step"] == step) & (r.retention["step_made"] > 0)]
                  for r in (ref, run)]
            for subset, pick in (("tracked", lambda df: df),
                                 ("first_batch", lambda df: df[df["step_made"] == 1])):
                for metric in PAIRED_METRICS:
                    table.append({
                        shared: row[shared], "a": ref.name, "b": run.name,
                        f"{compared}_a": ref_row[compared], f"{compared}_b": row[compared],
                        "step": int(step), "subset": subset, "metric": metric,
                        **compare_records(pick(at[0]), pick(at[1]), metric)})
    return pd.DataFrame(table, columns=[
        shared, "a", "b", f"{compared}_a", f"{compared}_b", "step", "subset", "metric", "n",
        "mean_a", "mean_b", "diff", "b_higher", "a_higher", "p_sign"])


def publish(run_dirs: Sequence[str | Path], out: str | Path, baseline: str = "add",
            method_baseline: str = "memit") -> list[Path]:
    """Write ``summary.csv``, the copies and the figures into ``out``; returns the paths.
    ``baseline`` is the fusion ``paired.csv`` compares the others with, ``method_baseline``
    the method ``paired_methods.csv`` compares the others with."""
    from kaedit.analyze import load_run, plot_comparison, plot_metric, plot_retention

    out = Path(out)
    names = [Path(d).resolve().name for d in run_dirs]
    if len(set(names)) < len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise FileNotFoundError(f"runs named {dup} more than once: each run's files go to "
                                "OUT/<run dir name>; give the runs distinct directory names")
    runs = [load_run(d) for d in run_dirs]  # fails on a directory without metrics.csv
    rows = [run_row(run) for run in runs]
    baselines = {"fusion": baseline, "method": method_baseline}
    for compared, chosen in baselines.items():  # checked before anything is written
        have = sorted({str(r[compared]) for r in rows})
        _, default, option = COMPARED[compared]
        if chosen != default and chosen not in have:
            raise ConfigError(f"{option} {chosen!r}: no run has that {compared}; the runs' "
                              f"{compared}s are {have}")
    out.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(out / SUMMARY, index=False, float_format="%.6g")
    written = [out / SUMMARY]
    for compared, chosen in baselines.items():
        written.append(out / COMPARED[compared][0])
        paired(runs, rows, chosen, compared).to_csv(written[-1], index=False,
                                                    float_format="%.6g")
    for run in runs:
        dest = out / run.name
        dest.mkdir(exist_ok=True)
        for name in COPIED:
            if (run.path / name).is_file():
                shutil.copyfile(run.path / name, dest / name)
                written.append(dest / name)
        written += [p for p in (plot_retention(run, dest),) if p]
    figures = out / "figures"
    written += [p for column, name, title, log in FIGURES
                if (p := plot_metric(runs, column, figures / name, title, log))]
    written.append(plot_comparison(runs, figures))
    return written


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(prog="python -m kaedit.ka_study", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    pub = sub.add_parser("publish", help="summary.csv, the runs' small files and figures")
    pub.add_argument("runs", nargs="+", metavar="RUN_DIR", help="kaedit run directories")
    pub.add_argument("--out", required=True, help="e.g. docs/results/ka-1k")
    pub.add_argument("--baseline", default="add",
                     help="fusion the other runs of a method are compared with in "
                          "paired.csv (default: add)")
    pub.add_argument("--method-baseline", default="memit",
                     help="method the other runs of a fusion are compared with in "
                          "paired_methods.csv (default: memit)")
    args = parser.parse_args(argv)
    try:
        written = publish(args.runs, args.out, args.baseline, args.method_baseline)
    except (FileNotFoundError, ConfigError) as exc:  # bad input; other errors keep their traceback
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    for p in written:
        print(p)
    print(pd.read_csv(Path(args.out) / SUMMARY).to_string(index=False))
    for file, *_ in COMPARED.values():
        pairs = pd.read_csv(Path(args.out) / file)
        if len(pairs):
            print(pairs.to_string(index=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
