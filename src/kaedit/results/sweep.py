"""Every ``-m`` sweep ends with a table: ``results.csv`` and a comparison figure.

:class:`SweepResults` is a Hydra callback (``hydra.callbacks.sweep_results`` in
``conf/config.yaml``): when a multirun ends, with any launcher or sweeper, it writes into
the sweep directory

* ``results.csv`` -- one row per job: its folder, its overrides (one column per
  overridden key, and all of them as ``overrides``), status (``done``, ``unfinished``:
  resumable with ``resume=JOB_DIR``, ``failed``: no checkpoint), final seen metrics
  (``seen/*``), first-batch retention (``retention/first_batch``: efficacy of the step-1
  edits after the last step), edits, steps, failed steps, wall time, and the attenuation
  (:func:`attenuation`: unedited, immediate efficacy and the KA drop);
* ``compare.png`` -- seen efficacy, generalization and specificity against the number of
  edits, one line per job (:func:`kaedit.results.plots.plot_comparison`);

and logs both through the sweep's trackers (``logger``): with ``logger=wandb``, a run
named ``sweep-results`` in the sweep's W&B group, holding the table (as a table and a
file artifact) and the figure. A sweep whose jobs failed ends before Hydra calls the
callback: ``python -m kaedit.results.sweep SWEEP_DIR`` writes the same files for what is
there.

Job folders are named by their overrides (``hydra.sweep.subdir``,
:func:`kaedit.jobdirs.job_dir_name`): ``3_fusion.p=0.8,schedule.batch_size=10``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict

from kaedit.jobdirs import sweep_group
from kaedit.results.plots import load_run, plot_comparison

log = logging.getLogger(__name__)

RESULTS = "results.csv"
#: The name results.csv is logged under (a W&B table and artifact; kaedit.results.dashboard).
TABLE = "sweep_results"
FIGURE = "compare.png"
#: Summary values of a job that results.csv keeps, after the seen metrics.
KEPT = ("retention/first_batch", "edits_done", "steps", "steps_failed", "wall_s")
def job_dirs(sweep_dir: Path) -> list[Path]:
    """The job folders of a sweep (those Hydra wrote ``.hydra/overrides.yaml`` into), in
    job-number order."""
    found = [p.parent.parent for p in Path(sweep_dir).glob("*/.hydra/overrides.yaml")]

    def number(p: Path) -> tuple[int, str]:
        head = p.name.split("_", 1)[0]
        return (int(head) if head.isdigit() else math.inf, p.name)  # type: ignore[return-value]

    return sorted(found, key=number)


def job_result(job_dir: Path) -> dict[str, Any]:
    """One row of ``results.csv`` (see the module docstring)."""
    given = job_dir / ".hydra" / "overrides.yaml"  # none: a run made without Hydra
    overrides = [str(o) for o in OmegaConf.load(given)] if given.is_file() else []
    hydra_yaml = job_dir / ".hydra" / "hydra.yaml"  # paths and resources: not a column
    skip = set(OmegaConf.select(OmegaConf.load(hydra_yaml),
                                "hydra.job.config.override_dirname.exclude_keys",
                                default=[]) if hydra_yaml.is_file() else [])
    row: dict[str, Any] = {"job": job_dir.name}
    pairs = (o.lstrip("+~").split("=", 1) for o in overrides if "=" in o)
    row.update({k: v for k, v in pairs if k not in skip})
    row["overrides"] = " ".join(overrides)
    summary_file, resume_file = job_dir / "summary.json", job_dir / "resume.json"
    # summary.json is written once, when the run ends; resume.json then says "done" (a
    # published copy of a finished run may have only the summary)
    done = summary_file.is_file() and (not resume_file.is_file()
                                       or json.loads(resume_file.read_text()).get("done"))
    if done and summary_file.is_file():
        summary = json.loads(summary_file.read_text())
        row["status"] = "done"
    else:
        from kaedit import checkpoint

        resumable = (job_dir / checkpoint.CKPT_DIR / checkpoint.POINTER).is_file()
        row["status"] = "unfinished" if resumable else "failed"
        metrics = job_dir / "metrics.csv"  # what it reached
        summary = pd.read_csv(metrics).iloc[-1].to_dict() if metrics.is_file() else {}
    row.update({k: v for k, v in summary.items() if k.startswith("seen/")
                and isinstance(v, (int, float))})
    row.update({k: summary.get(k) for k in KEPT})
    if (job_dir / "metrics.csv").is_file():
        row.update(attenuation(pd.read_csv(job_dir / "metrics.csv")))
    return row


def attenuation(metrics: pd.DataFrame) -> dict[str, float]:
    """How much of the edits' immediate success is lost (knowledge attenuation):
    ``immediate_efficacy`` = mean of ``batch/efficacy`` over the edited steps (each batch
    scored right after it was applied), ``batch_minus_seen_efficacy`` = that − the last
    seen efficacy (``ka_drop`` before issue 27: it includes the newest, unaged batch and is
    floored by the unedited model's success rate, so it is not any edit's loss; per-edit
    retention by age is :func:`kaedit.results.plots.retention_by_age`);
    ``unedited_efficacy`` = seen efficacy at step 0."""
    nan = math.nan
    if "seen/efficacy" not in metrics or metrics.empty:
        return {"unedited_efficacy": nan, "immediate_efficacy": nan,
                "batch_minus_seen_efficacy": nan}
    edited = metrics[metrics["step"] > 0]
    immediate = (float(edited["batch/efficacy"].mean())
                 if len(edited) and "batch/efficacy" in edited else nan)
    return {"unedited_efficacy": float(metrics["seen/efficacy"].iloc[0]),
            "immediate_efficacy": immediate,
            "batch_minus_seen_efficacy": immediate - float(metrics["seen/efficacy"].iloc[-1])}


def results_table(sweep_dir: Path) -> pd.DataFrame:
    """``results.csv``'s rows for the jobs in ``sweep_dir``."""
    return pd.DataFrame([job_result(d) for d in job_dirs(sweep_dir)])


def write_results(sweep_dir: Path) -> tuple[Path, Path | None]:
    """Write ``results.csv`` and (when a job logged metrics) ``compare.png`` into
    ``sweep_dir``; returns their paths."""
    sweep_dir = Path(sweep_dir)
    table = results_table(sweep_dir)
    path = sweep_dir / RESULTS
    table.to_csv(path, index=False, float_format="%.6g")
    runs = [load_run(d) for d in job_dirs(sweep_dir) if (d / "metrics.csv").is_file()]
    figure = plot_comparison(runs, sweep_dir) if runs else None
    log.info("sweep results: %s (%d jobs)%s", path, len(table),
             f", {figure}" if figure else "")
    return path, figure


def sweep_config(config: DictConfig, sweep_dir: Path) -> DictConfig:
    """The sweep's config without its ``hydra`` node, tracked as the sweep's own run:
    the sweep's W&B group, named ``sweep-results``."""

    cfg = config.copy()
    with open_dict(cfg):
        cfg.pop("hydra", None)
        cfg.tracking.group = sweep_group(str(sweep_dir))
        cfg.tracking.name = "sweep-results"
        cfg.tracking.tags = ["sweep-results"]
    return cfg


def log_results(cfg: DictConfig, sweep_dir: Path, table: Path, figure: Path | None) -> None:
    """Log the table and the figure through the trackers ``cfg.logger`` lists."""
    from kaedit.setup import build_trackers

    trackers, _ = build_trackers(cfg, sweep_dir)
    try:
        trackers.table(TABLE, table)
        if figure is not None:
            trackers.images({"sweep/compare": str(figure)})
    finally:
        trackers.finish()


class SweepResults(Callback):
    """Hydra callback: ``results.csv`` and ``compare.png`` at the end of every multirun.

    ``track``: also log them through the sweep's trackers (W&B: the sweep's group).
    """

    def __init__(self, track: bool = True) -> None:
        self.track = track

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        table, figure = write_results(sweep_dir)
        if not self.track:
            return
        try:
            log_results(sweep_config(config, sweep_dir), sweep_dir, table, figure)
        except Exception as exc:  # the jobs and the table are done
            log.error("sweep results written to %s, but logging them failed: %s: %s",
                      sweep_dir, type(exc).__name__, exc)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m kaedit.results.sweep SWEEP_DIR``: write results.csv and compare.png."""
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="python -m kaedit.results.sweep",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_dir")
    args = parser.parse_args(argv)
    if not job_dirs(Path(args.sweep_dir)):
        print(f"error: {args.sweep_dir!r} holds no Hydra job folders "
              "(*/.hydra/overrides.yaml)", file=sys.stderr)
        return 2
    table, _ = write_results(Path(args.sweep_dir))
    print(pd.read_csv(table).to_string(index=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
