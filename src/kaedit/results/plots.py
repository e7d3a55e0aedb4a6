"""Figures and tables the results tools share: a saved run, its label, the figures.

Read without loading a model, from what a run wrote (``metrics.csv``, ``retention.csv``,
``config.yaml``):

* :class:`Run` / :func:`load_run` -- a run directory's saved outputs; :func:`class_name`,
  :func:`run_label`, :func:`run_labels` -- how runs are named in figures and tables;
* :func:`pyplot` (matplotlib on the file-only Agg backend) and :func:`save_figure`;
* :func:`plot_comparison` (``compare.png``: seen efficacy, generalization and specificity
  against edits, a line per run), :func:`plot_metric` (one logged column, a line per run),
  :func:`plot_retention` (``retention.png``: the knowledge-attenuation heat-map);
* :func:`retention_matrix`, :func:`retention_by_age`, :func:`retained_aged` -- tables
  from ``retention.csv``.

Used by :mod:`kaedit.results.analyze`, :mod:`kaedit.results.sweep`,
:mod:`kaedit.results.ka_study` and :mod:`kaedit.results.reproduce`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

#: The paper's five CounterFact metrics, in its column order.
FIVE = ("efficacy", "generalization", "specificity", "fluency", "consistency")
HEADLINE = FIVE[:3]


@dataclass
class Run:
    """A saved run: its folder, ``metrics.csv`` and ``retention.csv`` (None where absent)
    and its ``config.yaml`` (unresolved)."""

    path: Path
    metrics: pd.DataFrame
    retention: pd.DataFrame | None
    config: dict[str, Any]

    @property
    def name(self) -> str:
        return self.path.resolve().name

    @property
    def label(self) -> str:
        return run_label(self.config)


def load_run(path: str | Path) -> Run:
    """A run directory's saved outputs (``metrics.csv`` is required)."""
    from omegaconf import OmegaConf

    path = Path(path)
    if not (path / "metrics.csv").is_file():
        raise FileNotFoundError(f"{str(path)!r} has no metrics.csv: not a kaedit run directory")
    config = {}
    if (path / "config.yaml").is_file():
        config = OmegaConf.to_container(OmegaConf.load(path / "config.yaml"), resolve=False)
    retention = pd.read_csv(path / "retention.csv") if (path / "retention.csv").is_file() else None
    return Run(path, pd.read_csv(path / "metrics.csv"), retention, config)


def class_name(node: Any) -> str:
    """The class a config node's ``_target_`` names (``DropRescale``), or ``?``."""
    target = node.get("_target_", "?") if isinstance(node, dict) else "?"
    return str(target).rsplit(".", 1)[-1]


def run_label(config: dict[str, Any]) -> str:
    """``METHOD / Fusion(param=value)``, e.g. ``MEMIT / DropRescale(p=0.8)``."""
    fusion = config.get("fusion") or {}
    params = ", ".join(f"{k}={v}" for k, v in fusion.items() if not str(k).startswith("_"))
    return f"{class_name(config.get('method'))} / {class_name(fusion)}" + (
        f"({params})" if params else "")


def pyplot():
    """``matplotlib.pyplot`` on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def retention_matrix(retention: pd.DataFrame, metric: str = "efficacy") -> pd.DataFrame:
    """Mean ``metric`` x100 by step made (rows; edits made so far) and step measured."""
    made = retention[retention["step_made"] > 0]
    return made.pivot_table(index="step_made", columns="step", values=metric,
                            aggfunc="mean") * 100


#: Columns of :func:`retention_by_age`, after the step, age and step made.
BY_AGE = ("tracked", "no_own_step", "failed_own_step", "n", "kept", "retained")


def retention_by_age(retention: pd.DataFrame, metric: str = "efficacy",
                     kept_by: str | None = None) -> pd.DataFrame:
    """Per-edit retention of the edits that succeeded at their own step, by age.

    For each evaluated step t and each batch made at step s < t (age a = t − s ≥ 1), over
    the edits of that batch that ``retention.csv`` tracked at t:

    * ``tracked`` -- how many there are;
    * ``no_own_step`` -- of those, how many have no row at their own step (t = s): their
      step was not evaluated (``schedule.eval_every`` > 1) or they were not tracked then.
      With the seen sample (the first N of one seeded order among the edits made so far)
      and every step evaluated this is 0: an edit's rank in the order among the edits made
      by s is at most its rank among those made by t, so an edit in the sample at t was
      in it at s; the first batch in full is tracked from step 1 on;
    * ``failed_own_step`` -- of the rest, how many did not succeed at their own step;
    * ``n`` -- the others: those that succeeded at their own step (``metric`` = 1, the
      whole value: CounterFact's 0/1 efficacy, zsRE's every answer token);
    * ``kept`` -- of those ``n``, how many still succeed at t; ``retained`` = 100·kept / n
      (NaN when n = 0).

    Unlike the batch's efficacy minus the seen sample's (``batch_minus_seen_efficacy``),
    this leaves out the newest, unaged batch and the edits that never took: it is the
    share of learnt edits that later edits have not undone. An edit undone entirely falls
    back to what the model preferred before it, which is the new object for some (the
    unedited SmolLM2 prefers it on about a third of CounterFact's rewrite prompts), so
    total forgetting still reads above 0.

    Rows where ``metric`` was not scored (NaN: the WILD scores exist only on the steps
    ``wild.every`` runs) are left out: an edit whose own step was not scored counts in
    ``no_own_step``, and a step that scored nothing has no row.

    ``kept_by`` (default: ``metric``) judges ``kept`` by another column of the same rows:
    ``retention_by_age(r, "wild_efficacy", kept_by="efficacy")`` asks, of the edits the
    model generated exactly at their own step, how many it still prefers teacher-forced,
    the same edits as ``retention_by_age(r, "wild_efficacy")`` (NaN counts as not kept)."""
    kept_by = kept_by or metric
    columns = ["step", "case_id", "step_made", *dict.fromkeys([metric, kept_by])]
    made = retention.loc[retention["step_made"] > 0, columns].dropna(subset=[metric])
    own = made[made["step"] == made["step_made"]]
    own = own[["case_id", "step_made", metric]].rename(columns={metric: "own"})
    later = made[made["step"] > made["step_made"]].merge(
        own, on=["case_id", "step_made"], how="left", validate="many_to_one")
    later["age"] = later["step"] - later["step_made"]
    took = later["own"] >= 1.0
    later = later.assign(no_own_step=later["own"].isna(),
                         failed_own_step=later["own"].notna() & ~took,
                         n=took, kept=took & (later[kept_by] >= 1.0))
    keys = ["step", "age", "step_made"]
    table = later.groupby(keys)[["no_own_step", "failed_own_step", "n", "kept"]].sum()
    table.insert(0, "tracked", later.groupby(keys).size())
    table = table.astype(int).reset_index()
    table["retained"] = 100.0 * table["kept"] / table["n"].where(table["n"] > 0)
    return table[[*keys, *BY_AGE]].sort_values(["step", "age"], ignore_index=True)


def retained_aged(by_age: pd.DataFrame) -> dict[str, float]:
    """At the last evaluated step of :func:`retention_by_age`'s table, over every age ≥ 1:
    ``retained_aged`` = 100·Σ kept / Σ n (NaN when Σ n = 0), ``retained_aged_n`` = Σ n and
    ``retained_aged_no_own_step`` = Σ no_own_step (the tracked edits left out)."""
    if by_age.empty:
        return {"retained_aged": np.nan, "retained_aged_n": 0, "retained_aged_no_own_step": 0}
    last = by_age[by_age["step"] == by_age["step"].max()]
    n, kept = int(last["n"].sum()), int(last["kept"].sum())
    return {"retained_aged": 100.0 * kept / n if n else np.nan, "retained_aged_n": n,
            "retained_aged_no_own_step": int(last["no_own_step"].sum())}


def plot_retention(run: Run, out: Path, metric: str = "efficacy") -> Path | None:
    if run.retention is None or metric not in run.retention or not (
            run.retention["step_made"] > 0).any():
        return None
    plt = pyplot()
    mat = retention_matrix(run.retention, metric)
    fig, ax = plt.subplots(figsize=(5, 4))
    im = ax.imshow(np.ma.masked_invalid(mat.to_numpy(float)), vmin=0, vmax=100,
                   cmap="viridis", aspect="auto", origin="lower")
    ax.set_xticks(range(len(mat.columns)), [str(c) for c in mat.columns], fontsize=7)
    ax.set_yticks(range(len(mat.index)), [str(i) for i in mat.index], fontsize=7)
    ax.set_xlabel("step measured")
    ax.set_ylabel("step made")
    ax.set_title(f"{metric} of earlier edits\n{run.label}", fontsize=9)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    return save_figure(fig, out / "retention.png")


def run_labels(runs: Sequence[Run]) -> list[str]:
    """Each run's label; runs with the same method and fusion told apart by their dir."""
    labels = [r.label for r in runs]
    if len(set(labels)) < len(labels):
        labels = [f"{lab} [{r.name}]" for lab, r in zip(labels, runs, strict=True)]
    return labels


def draw_curves(ax, runs: Sequence[Run], labels: Sequence[str], column: str) -> bool:
    """``column`` against edits on ``ax``, a line per run that logged it; whether any did."""
    drawn = False
    for run, lab in zip(runs, labels, strict=True):
        if column in run.metrics:
            df = run.metrics[["edits_done", column]].dropna()
            ax.plot(df["edits_done"], df[column], marker="o", ms=3, label=lab)
            drawn = drawn or not df.empty
    ax.set_xlabel("edits")
    ax.grid(alpha=0.3)
    return drawn


def plot_comparison(runs: Sequence[Run], out: Path) -> Path:
    """Fig. 5-7: seen efficacy / generalization / specificity vs edits, a line per run."""
    plt = pyplot()
    labels = run_labels(runs)
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    for ax, m in zip(axes, HEADLINE, strict=True):
        draw_curves(ax, runs, labels, f"seen/{m}")
        ax.set_title(m)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, out / "compare.png")


def plot_metric(runs: Sequence[Run], column: str, path: Path, title: str = "",
                log: bool = False) -> Path | None:
    """One logged ``column`` against edits, a line per run (None: no run logged it);
    ``log``: a logarithmic y axis (perplexity, which spans orders of magnitude when a
    model collapses)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    if not draw_curves(ax, runs, run_labels(runs), column):
        plt.close(fig)
        return None
    if log:
        ax.set_yscale("log")
    ax.set_title(title or column, fontsize=9)
    ax.set_ylabel(column)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path)


def save_figure(fig, path: Path) -> Path:
    """Save ``fig`` to ``path`` (folders made) at 120 dpi and close it."""
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path
