"""``python -m kaedit.rescore RUN_DIR [RUN_DIR ...] --out DIR [KEY=VALUE ...]``: score
finished runs' final weights again, with evaluations they did not run.

A 1,000-edit row takes one to two hours to edit; scoring its final weights with WILD
(:mod:`kaedit.wild`) or WikiText-2 perplexity takes minutes. ``rescore`` rebuilds each run's
served weights at its last checkpoint (:func:`kaedit.export.served_deltas`: W₀ + the applied
deltas + the fusion's served offset) and evaluates them with the runner's own evaluation
(:func:`kaedit.experiment.evaluate`), on the run's own records, batches, seen sample, first
batch and fixed prompts, with the evaluation settings changed by the ``KEY=VALUE``
overrides (only ``wild.*``, ``perplexity.*``, ``eval_batch_size`` and ``model.device``:
anything else would change what the weights mean).

Several runs are scored in one call when they share every setting that decides the
evaluation (:data:`kaedit.evaluation.PLAN_KEYS`: the model, the records, the schedule,
the seed and the evaluation settings): the model is loaded once, the unedited model is
evaluated once (step 0, and WILD's unedited answers, which every run's locality compares
with), and each run's weights are then served in turn and taken off again.

``DIR`` gets:

* ``unedited/`` -- the step-0 evaluation: ``metrics.csv``, ``retention.csv`` and WILD's
  ``wild_references.json``;
* ``<run>/`` -- per run, its last step scored again: ``metrics.csv`` (one row),
  ``retention.csv``;
* ``rescored.csv`` -- one row per run (and ``unedited``): its metrics at its last step,
  ``wild/first_batch`` (WILD efficacy of the first batch's tracked edits),
  ``check/max_abs_diff``, the largest difference between a percentage score of the run's
  own last ``metrics.csv`` row and the same score recomputed here, at the CSV's 6
  significant digits (0 when the weights are rebuilt as the run served them; on another
  machine a near-tie flipped by float rounding moves one record).

Bad input (no such run, an unfinished run, runs that do not share
:data:`kaedit.evaluation.PLAN_KEYS`, an override outside the evaluation, an existing
non-empty ``--out``) is one error line and exit status 2, with nothing written.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
from omegaconf import DictConfig, OmegaConf

from kaedit.errors import ConfigError, user_errors_exit
from kaedit.evaluation import PLAN_KEYS, plan_difference

log = logging.getLogger("kaedit.rescore")

#: What the ``KEY=VALUE`` overrides may change: the evaluation only (dotted prefixes).
OVERRIDABLE = ("wild.", "perplexity.", "eval_batch_size", "model.device")
#: ``metrics.csv`` columns compared with the run's own last row (0/1 or 0-100 scores).
CHECKED = ("batch/efficacy", "batch/generalization", "batch/specificity",
           "seen/efficacy", "seen/generalization", "seen/specificity",
           "fixed/specificity", "retention/first_batch")
#: Evaluation-only config nodes a run made before they existed lacks: taken from the
#: current defaults (``conf/config.yaml``) before the overrides apply.
ADDED_LATER = ("wild", "perplexity")
UNEDITED = "unedited"
SUMMARY = "rescored.csv"


def check_overrides(overrides: Sequence[str]) -> DictConfig:
    """The ``KEY=VALUE`` overrides as a config, each checked against :data:`OVERRIDABLE`."""
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ConfigError(f"override {bad[0]!r} is not KEY=VALUE")
    keys = [o.split("=", 1)[0].lstrip("+") for o in overrides]
    outside = [k for k in keys if not any(k == p or k.startswith(p) for p in OVERRIDABLE)]
    if outside:
        raise ConfigError(f"override {outside[0]!r}: rescore changes only how the final weights "
                          f"are evaluated: keys under {list(OVERRIDABLE)}")
    return OmegaConf.from_dotlist([o.lstrip("+") for o in overrides])


def check_shared(names: Sequence[str], cfgs: Sequence[DictConfig]) -> None:
    """Every run's :data:`kaedit.evaluation.PLAN_KEYS` equal the first run's (a
    :class:`ConfigError` naming the first key that differs and the two runs otherwise)."""
    for name, cfg in zip(names[1:], cfgs[1:], strict=True):
        key = plan_difference(cfgs[0], cfg)
        if key is not None:
            raise ConfigError(
                f"runs {names[0]!r} and {name!r} differ in {key}: rescore scores runs "
                f"together only when they share {list(PLAN_KEYS)}; rescore them in "
                "separate calls")


def load_runs(run_dirs: Sequence[str | Path], overrides: DictConfig
              ) -> list[tuple[str, DictConfig, dict, int]]:
    """Per run ``(name, config with the overrides, served deltas, last step)``; every run
    must have finished (``resume.json`` marked done: its last checkpoint is its last step)."""
    from kaedit.export import served_deltas
    from kaedit.setup import compose

    defaults = None
    runs = []
    for d in run_dirs:
        path = Path(d)
        if not path.is_dir():
            raise ConfigError(f"RUN_DIR {str(path)!r} is not a directory")
        marker = path / "resume.json"
        if not (marker.is_file() and json.loads(marker.read_text()).get("done")):
            raise ConfigError(f"RUN_DIR {str(path)!r} has not finished (its resume.json is not "
                              "marked done): rescore scores a finished run's final weights; "
                              "resume it first (python -m kaedit.run ... resume=RUN_DIR)")
        cfg, served, step = served_deltas(path)
        missing = [k for k in ADDED_LATER if cfg.get(k) is None]
        if missing:  # an older run: the evaluation nodes it lacks, as they are now
            defaults = defaults if defaults is not None else compose()
            OmegaConf.set_struct(cfg, False)
            for key in missing:
                cfg[key] = defaults[key]
        runs.append((path.resolve().name, OmegaConf.merge(cfg, overrides), served, step))
    names = [r[0] for r in runs]
    if len(set(names)) < len(names):
        raise ConfigError(f"runs named {sorted({n for n in names if names.count(n) > 1})} "
                          "more than once: give the runs distinct directory names")
    if UNEDITED in names:
        raise ConfigError(f"a run named {UNEDITED!r}: that name is the step-0 folder; "
                          "rename the run directory")
    check_shared(names, [r[1] for r in runs])
    return runs


def _outputs(cfg: DictConfig, folder: Path) -> Any:
    """A CSV-only :class:`~kaedit.experiment.Outputs` in ``folder``."""
    from kaedit.experiment import RETENTION, Outputs
    from kaedit.files import CsvRows
    from kaedit.setup import build_trackers

    cfg = cfg.copy()
    cfg.logger = {"csv": {"_target_": "kaedit.tracking.CsvTracker"}}
    trackers, named = build_trackers(cfg, folder)
    return Outputs(folder, trackers, named, CsvRows(folder / RETENTION), time.perf_counter(),
                   0.0)


def _first_batch(out: Any, step: int, n_first: int) -> float:
    """WILD efficacy (x100) of the first batch's tracked edits at ``step`` (NaN: none)."""
    rows = pd.read_csv(out.retention.path)
    rows = rows[(rows["step"] == step) & (rows["step_made"] == 1)]
    if "wild_efficacy" not in rows or rows.empty or n_first == 0:
        return math.nan
    return 100.0 * float(rows["wild_efficacy"].mean())


def own_row(run_dir: Path, step: int) -> dict[str, Any]:
    """The run's own ``metrics.csv`` row at ``step`` (empty when it has none)."""
    path = run_dir / "metrics.csv"
    if not path.is_file():
        return {}
    rows = pd.read_csv(path)
    rows = rows[rows["step"] == step]
    return rows.iloc[-1].to_dict() if len(rows) else {}


def rescore(run_dirs: Sequence[str | Path], out: str | Path,
            overrides: Sequence[str] = ()) -> pd.DataFrame:
    """Score ``run_dirs``' final weights (see the module docstring) into ``out``; returns
    ``rescored.csv``'s table."""
    from kaedit.checkpoint import RunState
    from kaedit.experiment import evaluate
    from kaedit.fusion import Add
    from kaedit.setup import build_session

    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out {str(out)!r} exists and is not an empty directory")
    if not run_dirs:
        raise ConfigError("no RUN_DIR given")
    runs = load_runs(run_dirs, check_overrides(overrides))
    # One session for all: the first run's model and plan; no method (nothing is edited
    # here). The served deltas already hold each run's fusion offset, so the session
    # serves them as they are (fusion add).
    session = build_session(runs[0][1], templates=False, method=False)
    session = dataclasses.replace(session, fusion=Add())
    add_state = session.fusion.init_state()
    batches, n_first = session.batches, len(session.batches[0])
    rows = []

    t0 = time.perf_counter()
    o = _outputs(session.cfg, out / UNEDITED)
    try:
        row = evaluate(session, o, RunState(), add_state, 0, list(range(n_first)), 0, {})
    finally:
        o.trackers.finish()
    rows.append({"run": UNEDITED, "method": None, "fusion": None, **row,
                 "wild/first_batch": math.nan, "check/max_abs_diff": math.nan,
                 "time/rescore_s": time.perf_counter() - t0})
    for (name, cfg, served, step), run_dir in zip(runs, run_dirs, strict=True):
        t0 = time.perf_counter()
        n_done = sum(len(b) for b in batches[:step])
        o = _outputs(session.cfg, out / name)
        try:
            with session.edits.serving(served):  # W₀ + served, W₀ again after the block
                row = evaluate(session, o, RunState(), add_state, step,
                               list(batches[step - 1]), n_done, {})
        finally:
            o.trackers.finish()
        own = own_row(Path(run_dir), step)
        # at the CSV's own precision (kaedit.files.CsvRows writes %.6g)
        diffs = [abs(float(f"{float(row[k]):.6g}") - float(own[k])) for k in CHECKED
                 if k in row and k in own and not pd.isna(own[k])]
        rows.append({"run": name, "method": _class(cfg.method), "fusion": _class(cfg.fusion),
                     **row, "wild/first_batch": _first_batch(o, step, n_first),
                     "check/max_abs_diff": max(diffs) if diffs else math.nan,
                     "time/rescore_s": time.perf_counter() - t0})
        log.info("%s: step %d rescored in %.0f s (largest difference from its own row %s)",
                 name, step, rows[-1]["time/rescore_s"], rows[-1]["check/max_abs_diff"])
    table = pd.DataFrame(rows)
    table.to_csv(out / SUMMARY, index=False, float_format="%.6g")
    return table


def _class(node: DictConfig) -> str:
    """The last part of a config node's ``_target_`` (``DropRescale``)."""
    return str(node.get("_target_", "?")).rsplit(".", 1)[-1]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m kaedit.rescore",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("items", nargs="+", metavar="RUN_DIR|KEY=VALUE",
                        help="run directories of python -m kaedit.run, then evaluation "
                             "overrides, e.g. wild.every=null")
    parser.add_argument("--out", required=True, help="the folder to write (new or empty)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s")
    overrides = [i for i in args.items if "=" in i]
    run_dirs = [i for i in args.items if "=" not in i]
    with user_errors_exit(log):
        table = rescore(run_dirs, args.out, overrides)
        shown = [c for c in ("run", "seen/efficacy", "seen/specificity", "wild/seen/efficacy",
                             "wild/seen/generalization", "wild/seen/locality",
                             "wild/first_batch", "check/max_abs_diff") if c in table]
        print(table[shown].to_string(index=False))


if __name__ == "__main__":
    main(sys.argv[1:])
