"""``python -m kaedit.results.reproduce``: the CPU-scale drop-rate sweep and fusion
comparison.

``make reproduce-cpu`` runs this. It makes the runs of two experiments at ``scale=cpu``
(SmolLM2-135M, AdaPLE, the first 40 CounterFact records in 10 sequential batches of 4,
every edit re-checked after every step) and writes, under ``--out``
(default ``outputs/reproduce-cpu``):

* ``runs/<name>/`` -- one run directory each (metrics.csv, retention.csv, summary.json,
  the offline W&B run; all runs in the W&B group ``reproduce-cpu``);
* ``results.md`` -- both tables, the settings, the command and the wall times;
  ``results.csv`` -- :mod:`kaedit.results.sweep`'s table (the one every ``-m`` sweep ends with:
  ``runs/`` is laid out as a sweep directory), one row per run: its overrides, status,
  final seen metrics, first-batch retention, wall time, immediate efficacy and
  batch − seen efficacy;
* ``figures/`` -- ``drop_rate.png`` (final metrics against p, Fig. 6),
  ``drop_rate_curves.png`` and ``fusion_curves.png`` (the edits made so far against the
  number of edits, one line per run: Fig. 6 and Fig. 5 as curves, via
  :func:`kaedit.results.plots.plot_comparison`), ``<run>/retention.png`` (efficacy of the edits
  made at step s, measured at step t).

Runs (:data:`PLAN`): ``drop_rate_sweep`` at p = 0, 0.5, 0.8, 0.9 and ``fusion_strategies``
with average, Lookahead and WiSE-FT. The fusion comparison's vanilla addition *is* the
p = 0 run (drop-and-rescale with p = 0 adds Δ unchanged) and its DR line the p = 0.8
run: both experiments have the same CPU settings apart from the fusion (checked before
anything runs), so seven runs cover nine lines.

Interrupted? Run the same command again: finished runs are kept, unfinished ones resume
from their last checkpoint. Extra arguments are Hydra overrides applied to every run
(e.g. ``schedule.n_edits=4 schedule.batch_size=2`` for a quick check of the pipeline);
``--runs`` picks a subset; invocations with disjoint ``--runs`` and the same ``--out`` can
run in parallel (then one more invocation without ``--runs`` writes the full tables).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

GROUP = "reproduce-cpu"


@dataclass(frozen=True)
class PlannedRun:
    """One run: its directory name, the overrides that define it, its line labels."""

    name: str
    overrides: tuple[str, ...]
    #: Its label in the drop-rate table (None: not part of it).
    drop_rate: float | None = None
    #: Its label in the fusion table (None: not part of it).
    fusion: str | None = None


SWEEP = ("experiment=drop_rate_sweep", "scale=cpu")
FUSIONS = ("experiment=fusion_strategies", "scale=cpu")
PLAN: tuple[PlannedRun, ...] = (
    PlannedRun("dr-p0.0", (*SWEEP, "fusion.p=0.0"), 0.0, "vanilla addition (= DR p=0)"),
    PlannedRun("dr-p0.5", (*SWEEP, "fusion.p=0.5"), 0.5),
    PlannedRun("dr-p0.8", (*SWEEP, "fusion.p=0.8"), 0.8, "DR p=0.8 (AdaPLE)"),
    PlannedRun("dr-p0.9", (*SWEEP, "fusion.p=0.9"), 0.9),
    PlannedRun("fusion-average", (*FUSIONS, "fusion=average"), None, "vanilla averaging"),
    PlannedRun("fusion-lookahead", (*FUSIONS, "fusion=lookahead"), None,
               "Lookahead (k=5, α=0.5, slow weights)"),
    PlannedRun("fusion-wise_ft", (*FUSIONS, "fusion=wise_ft"), None, "WiSE-FT (α=0.5)"),
)
#: Runs the fusion table shares with the sweep, and the fusion each stands for.
SHARED = {"dr-p0.0": "fusion=add", "dr-p0.8": "fusion=drop_rescale"}


def compose(overrides: Sequence[str]):
    """The composed run config and Hydra's group choices (for the W&B tags)."""
    from omegaconf import open_dict

    from kaedit.setup import compose as compose_config

    cfg = compose_config(overrides, hydra_config=True)
    choices = dict(cfg.hydra.runtime.choices)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg, choices


def check_shared(extra: Sequence[str]) -> None:
    """Fail unless each shared run equals the fusion experiment's run but for the fusion."""
    from omegaconf import OmegaConf

    from kaedit.errors import ConfigError

    for name, fusion in SHARED.items():
        run = next(r for r in PLAN if r.name == name)
        a = OmegaConf.to_container(compose([*run.overrides, *extra])[0], resolve=True)
        b = OmegaConf.to_container(compose([*FUSIONS, fusion, *extra])[0], resolve=True)
        a.pop("fusion"), b.pop("fusion")
        if a != b:
            diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
            raise ConfigError(f"run {name!r} cannot stand for fusion_strategies {fusion}: "
                              f"their configs differ in {diff}")


def execute(run: PlannedRun, out: Path, extra: Sequence[str]) -> float:
    """Make (or finish) one run in ``out/runs/<name>``; returns the seconds it took now."""
    from kaedit import checkpoint
    from kaedit.errors import ConfigError
    from kaedit.experiment import config_fingerprint, effective_config
    from kaedit.experiment import run as run_experiment
    from kaedit.run import tracking_info

    run_dir = out / "runs" / run.name
    cfg, choices = compose([*run.overrides, *extra, f"tracking.group={GROUP}"])
    info = tracking_info(choices, cfg.fusion)
    cfg.tracking.tags, cfg.tracking.name = info["tags"], info["name"]
    cfg.tracking.choices = info["choices"]
    meta = run_dir / "resume.json"
    if meta.is_file():
        saved = json.loads(meta.read_text())
        if saved.get("fingerprint") != config_fingerprint(effective_config(cfg)):
            raise ConfigError(f"{str(run_dir)!r} holds a run with another config; remove it "
                              "or choose another --out")
        if saved.get("done"):
            log.info("%s: done already", run.name)
            return 0.0
        if (run_dir / checkpoint.CKPT_DIR / checkpoint.POINTER).is_file():
            log.info("%s: resuming", run.name)
            cfg.resume = str(run_dir)
    log.info("%s: %s", run.name, " ".join([*run.overrides, *extra]))
    # what defines the run, where a Hydra job keeps it: out/runs is a sweep directory
    # for kaedit.results.sweep, which makes results.csv
    from omegaconf import OmegaConf

    (run_dir / ".hydra").mkdir(parents=True, exist_ok=True)
    OmegaConf.save(OmegaConf.create([*run.overrides, *extra]),
                   run_dir / ".hydra" / "overrides.yaml")
    t0 = time.perf_counter()
    run_experiment(cfg, run_dir=str(run_dir))
    return time.perf_counter() - t0


# ----------------------------------------------------------------------------- results
METRICS = ("efficacy", "generalization", "specificity", "score")


def run_results(row: dict[str, Any]) -> dict[str, Any]:
    """A run's row of :func:`kaedit.results.sweep.results_table` (the sweep table every ``-m``
    sweep ends with) in the terms of the tables here: final metrics of all edits (the
    seen sample is every edit at this scale), immediate efficacy, batch − seen efficacy and the
    efficacy of the step-1 edits after the last step."""
    return {**{m: float(row[f"seen/{m}"]) for m in METRICS},
            "unedited_efficacy": float(row["unedited_efficacy"]),
            "immediate_efficacy": float(row["immediate_efficacy"]),
            "batch_minus_seen_efficacy": float(row["batch_minus_seen_efficacy"]),
            "first_batch_at_end": float(row["retention/first_batch"])}


def _fmt(v: float) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.1f}"


def markdown_table(rows: list[dict[str, Any]], first: str) -> str:
    head = (f"| {first} | efficacy | generalization | specificity | score | "
            "immediate efficacy | batch − seen efficacy | step-1 edits at end |")
    lines = [head, "|" + "---|" * 8]
    for r in rows:
        lines.append(f"| {r['label']} | " + " | ".join(
            _fmt(r[k]) for k in (*METRICS, "immediate_efficacy", "batch_minus_seen_efficacy",
                                 "first_batch_at_end")) + " |")
    return "\n".join(lines)


def plot_drop_rate(rows: list[dict[str, Any]], path: Path) -> Path:
    """Fig. 6: final efficacy / generalization / specificity / score against p."""
    from kaedit.results.plots import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ps = [r["p"] for r in rows]
    for m in METRICS:
        ax.plot(ps, [r[m] for r in rows], marker="o", ms=4, label=m)
    ax.plot(ps, [r["batch_minus_seen_efficacy"] for r in rows], marker="x", ls="--",
            label="batch − seen efficacy")
    ax.set_xlabel("drop rate p")
    ax.set_ylabel("after the last step (x100)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def write_results(out: Path, plan: Sequence[PlannedRun], timings: dict[str, float],
                  command: str, total_s: float) -> Path:
    from omegaconf import OmegaConf

    from kaedit.results.plots import load_run, plot_comparison, plot_retention
    from kaedit.results.sweep import RESULTS, results_table

    table = results_table(out / "runs")  # kaedit.results.sweep: every -m sweep's table
    table = table[table["job"].isin([r.name for r in plan])] if len(table) else table
    rows = {row["job"]: row for row in table.to_dict("records") if row["status"] == "done"}
    done = [r for r in plan if r.name in rows]
    results = {r.name: run_results(rows[r.name]) for r in done}
    sweep = [{"label": f"p = {r.drop_rate}", "p": r.drop_rate, **results[r.name]}
             for r in done if r.drop_rate is not None]
    fusions = [{"label": r.fusion, **results[r.name]} for r in done if r.fusion]
    figures = out / "figures"
    runs = {r.name: load_run(out / "runs" / r.name) for r in done}
    for name, run in runs.items():
        plot_retention(run, figures / name)
    if len(sweep) > 1:
        plot_drop_rate(sweep, figures / "drop_rate.png")
        plot_comparison([runs[r.name] for r in done if r.drop_rate is not None],
                        figures / "drop_rate_curves")
    if len(fusions) > 1:
        plot_comparison([runs[r.name] for r in done if r.fusion], figures / "fusion_curves")
    for sub in ("drop_rate_curves", "fusion_curves"):  # plot_comparison names its file
        if (figures / sub / "compare.png").is_file():
            (figures / sub / "compare.png").replace(figures / f"{sub}.png")
            (figures / sub).rmdir()

    cfg = OmegaConf.load(out / "runs" / done[0].name / "config.yaml") if done else None
    table.rename(columns={"job": "run"}).to_csv(out / RESULTS, index=False,
                                                float_format="%.4g")
    per_run = ", ".join(f"{n} {timings.get(n, 0) / 60:.1f}" for n in results)
    wall = (f"Wall time: {total_s / 60:.1f} min for this invocation ({platform.node()}, "
            f"{os.cpu_count()} CPUs); per run (min, all invocations): {per_run}.")
    lines = ["# kaedit: CPU-scale drop-rate sweep and fusion comparison", "",
             f"Command: `{command}`", "", wall, ""]
    if cfg is not None:
        s, method = cfg.schedule, cfg.method._target_.rsplit(".", 1)[-1]
        n_steps = math.ceil(s.n_edits / s.batch_size)
        settings = (f"Settings: {cfg.model.name}, {method}, the first {s.n_edits} records of "
                    f"{cfg.dataset.name} in {n_steps} sequential batches of {s.batch_size}, "
                    f"seed {cfg.seed}; after the last step all {s.n_edits} edits are scored "
                    f"(one edit = {100 / s.n_edits:.1f} points of efficacy).")
        lines += [settings, ""]
    columns = ("Columns: efficacy, generalization, specificity and score (their harmonic "
               "mean) of all edits after the last step, on the weights the fusion serves; "
               "immediate efficacy = mean over steps of the efficacy of the batch just "
               "applied; batch − seen efficacy = immediate efficacy − final efficacy; "
               "step-1 edits at end "
               "= efficacy of the first batch after the last step.")
    lines += [columns, ""]
    if sweep:
        unedited = (f"Unedited model: efficacy {sweep[0]['unedited_efficacy']:.1f} on the same "
                    "edits; p = 1 would apply nothing (the unedited model).")
        lines += ["## Drop rate (Fig. 6)", "", markdown_table(sweep, "drop rate"), "",
                  unedited, ""]
    if fusions:
        lines += ["## Fusion strategy (Fig. 5)", "", markdown_table(fusions, "fusion"), ""]
    missing = [r.name for r in plan if r.name not in results]
    if missing:
        lines += [f"Not run (yet): {', '.join(missing)}.", ""]
    lines += ["Figures: " + ", ".join(sorted(str(p.relative_to(out))
                                             for p in figures.rglob("*.png"))), ""]
    path = out / "results.md"
    path.write_text("\n".join(lines))
    return path


def read_timings(path: Path) -> dict[str, float]:
    """Seconds spent per run over all invocations (``timings.json``)."""
    return json.loads(path.read_text()) if path.is_file() else {}


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m kaedit.results.reproduce",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="outputs/reproduce-cpu")
    parser.add_argument("--runs", default=None,
                        help="comma-separated subset of: " + ", ".join(r.name for r in PLAN))
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every run")
    args = parser.parse_args(argv)

    from kaedit.errors import EXIT_BAD_INPUT, ConfigError
    from kaedit.files import atomic_write

    names = [r.name for r in PLAN]
    wanted = args.runs.split(",") if args.runs else names
    unknown = [n for n in wanted if n not in names]
    if unknown:
        print(f"error: --runs {unknown} not among {names}", file=sys.stderr)
        return 2
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    out = Path(args.out)
    plan = [r for r in PLAN if r.name in wanted]
    command = shlex.join(["python", "-m", "kaedit.results.reproduce", *argv])
    timings_file = out / "timings.json"
    try:
        check_shared(args.overrides)
        t0 = time.perf_counter()
        for run in plan:
            seconds = execute(run, out, args.overrides)
            if seconds:  # re-read: invocations with other --runs may share the file
                timings = read_timings(timings_file)
                timings[run.name] = timings.get(run.name, 0.0) + seconds
                atomic_write(timings_file, json.dumps(timings, indent=2) + "\n")
        path = write_results(out, plan, read_timings(timings_file), command,
                             time.perf_counter() - t0)
    except ConfigError as exc:  # bad input (build phase); a failed run keeps its traceback
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(path.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
