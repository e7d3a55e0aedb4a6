"""Figures from saved runs:
``python -m kaedit.results.analyze RUN_DIR [RUN_DIR ...] [--out DIR]``.

Reads what a run wrote (``metrics.csv``, ``retention.csv``, ``config.yaml`` and, with
``save_step_deltas=true``, ``deltas/``) and draws, without loading a model:

* ``scaling.png`` -- the five metrics of the edits made so far (``seen/*``) against the
  number of edits (paper Fig. 2); fluency and consistency where they were generated, the
  fixed set's specificity and first-batch efficacy where logged;
* ``retention.png`` -- efficacy of the edits made at step *s* (rows) measured at step *t*
  (columns), from ``retention.csv``: the knowledge-attenuation heat-map;
* ``delta_similarity.png`` -- pairwise cosine similarity of the per-step edit weights
  before and after fusion (Fig. 3, e.g. before/after drop-and-rescale), each step's deltas
  flattened over all edited layers; the first ``--max-steps`` steps;
* ``compare.png`` -- seen efficacy, generalization and specificity against edits, one line
  per run, labelled by method / fusion and its parameters (Fig. 5-7);
* ``fixed_specificity.png`` and ``first_batch.png`` -- beside it, one line per run, where
  the runs logged ``fixed/specificity`` (one set of neighbourhood prompts scored at every
  step: ``schedule.fixed_sample``) and ``retention/first_batch`` (efficacy of the step-1
  edits; exact with ``schedule.first_batch_in_full``).

Per-run figures go to ``RUN_DIR/figures/`` (or ``DIR/<run name>/`` with ``--out``);
``compare.png`` to ``--out``, or beside the first run's figures. ``--wandb offline`` (or
``online``) also logs each run's figures and ``compare.png`` to that run's own W&B run,
reopened by its id (``analysis/<figure>``); ``wandb sync`` uploads offline ones as usual.

``python -m kaedit.results.analyze topk RUN_DIR --k 0.1,0.2,0.5,1`` (Fig. 4, edit
performance vs the top-k% of parameters retained) loads the run's model again: for each k
it keeps the k fraction of largest-magnitude entries of every saved pre-fusion step delta,
adds their sum to the unedited weights and scores all the edits of those steps; it writes
``topk.csv`` and ``topk.png``. For a one-step run (the paper's setting: one batch of
100-500 edits) this is exactly Fig. 4; for longer runs it is an approximation, since each
step's delta was computed on the model as the run itself had edited it.

The figures the other results tools draw too (``compare.png``, ``retention.png``, one
metric per figure) come from :mod:`kaedit.results.plots`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from kaedit.errors import EXIT_BAD_INPUT, ConfigError
from kaedit.results.plots import (
    FIVE,
    HEADLINE,
    Run,
    class_name,
    load_run,
    plot_comparison,
    plot_metric,
    plot_retention,
    pyplot,
    run_label,
    save_figure,
)

log = logging.getLogger(__name__)

#: Panels of ``scaling.png`` beside the seen metrics, when the run logged them.
CURVE_TITLES = {"fixed/specificity": "fixed specificity",
                "retention/first_batch": "first batch efficacy"}


def plot_scaling(run: Run, out: Path) -> Path:
    """Fig. 2: ``seen/*`` of the five metrics against ``edits_done`` (x100 as logged), and
    the fixed set's specificity and first-batch efficacy where logged."""
    plt = pyplot()
    present = [(f"seen/{m}", m) for m in FIVE if f"seen/{m}" in run.metrics]
    present += [(c, CURVE_TITLES[c]) for c in CURVE_TITLES if c in run.metrics]
    fig, axes = plt.subplots(1, len(present), figsize=(3.2 * len(present), 3), squeeze=False)
    for ax, (column, title) in zip(axes[0], present, strict=True):
        df = run.metrics[["edits_done", column]].dropna()
        ax.plot(df["edits_done"], df[column], marker="o", ms=3)
        ax.set_title(title)
        ax.set_xlabel("edits")
        ax.grid(alpha=0.3)
    fig.suptitle(f"{run.label} ({run.name})", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, out / "scaling.png")


def step_delta_files(folder: Path, fused: bool) -> list[Path]:
    """``deltas/step-NNNN[-fused].safetensors`` in step order."""
    files = [f for f in folder.glob("step-*.safetensors") if f.stem.endswith("-fused") == fused]
    return sorted(files, key=lambda f: int(f.stem.split("-")[1]))


def cosine_matrix(files: Sequence[Path]) -> np.ndarray:
    """Pairwise cosine similarity of the deltas in ``files``, each flattened over all of
    its tensors (in name order) into one vector."""
    import torch
    from safetensors.torch import load_file

    vecs = []
    for f in files:
        d = load_file(str(f))
        v = torch.cat([d[k].float().reshape(-1) for k in sorted(d)])
        vecs.append(v / v.norm().clamp_min(1e-30))
    mat = torch.stack(vecs)  # [steps, n_params]
    return (mat @ mat.T).numpy()


def plot_delta_similarity(run: Run, out: Path, max_steps: int = 20) -> Path | None:
    """Fig. 3: cosine similarity of per-step deltas before (left) and after fusion."""
    folder = run.path / "deltas"
    pre, post = (step_delta_files(folder, fused)[:max_steps] for fused in (False, True))
    if len(pre) < 2:
        return None
    plt = pyplot()
    panels = [("before fusion", pre), (f"after {class_name(run.config.get('fusion'))}", post)]
    fig, axes = plt.subplots(1, 2, figsize=(9, 4))
    for ax, (title, files) in zip(axes, panels, strict=True):
        if len(files) < 2:
            ax.set_axis_off()
            continue
        sim = cosine_matrix(files)
        off = sim[~np.eye(len(sim), dtype=bool)]
        im = ax.imshow(sim, vmin=-1, vmax=1, cmap="RdBu_r")
        steps = [f.stem.split("-")[1].lstrip("0") or "0" for f in files]
        ax.set_xticks(range(len(steps)), steps, fontsize=6)
        ax.set_yticks(range(len(steps)), steps, fontsize=6)
        ax.set_xlabel("step")
        ax.set_title(f"{title}\nmean off-diagonal cos {off.mean():.3f}", fontsize=9)
    fig.colorbar(im, ax=axes, shrink=0.8)
    fig.suptitle(run.label, fontsize=9)
    return save_figure(fig, out / "delta_similarity.png")


#: Curves :func:`plot_metric` draws beside ``compare.png`` when a run logged them.
CURVES = {
    "fixed/specificity": ("fixed_specificity.png",
                          "specificity of one fixed set of neighbourhood prompts"),
    "retention/first_batch": ("first_batch.png", "efficacy of the first batch's edits"),
}


def figure_dirs(run_dirs: Sequence[str | Path], out: str | Path | None) -> list[Path]:
    """Where each run's own figures go: ``RUN_DIR/figures``, or ``out/<run name>``
    (prefixed by its index when two runs share a name)."""
    names = [Path(d).resolve().name for d in run_dirs]
    return [Path(out) / (n if names.count(n) == 1 else f"{i}-{n}") if out
            else Path(d) / "figures" for i, (d, n) in enumerate(zip(run_dirs, names, strict=True))]


def analyze(run_dirs: Sequence[str | Path], out: str | Path | None = None,
            max_steps: int = 20) -> list[Path]:
    """Draw every figure the runs' saved files allow; returns the PNG paths written."""
    runs = [load_run(d) for d in run_dirs]
    written: list[Path] = []
    for run, dest in zip(runs, figure_dirs(run_dirs, out), strict=True):
        written.append(plot_scaling(run, dest))
        written += [p for p in (plot_retention(run, dest),
                                plot_delta_similarity(run, dest, max_steps)) if p]
    dest = Path(out) if out else runs[0].path / "figures"
    written.append(plot_comparison(runs, dest))
    written += [p for column, (name, title) in CURVES.items()
                if (p := plot_metric(runs, column, dest / name, title))]
    return written


def wandb_run_id(run_dir: Path) -> str | None:
    """The id of the W&B run a kaedit run logged to (``RUN_DIR/wandb/*run-DATE-ID``)."""
    found = sorted((Path(run_dir) / "wandb").glob("*run-*-*"))
    return found[-1].name.rsplit("-", 1)[1] if found else None


def log_to_wandb(run_dirs: Sequence[str | Path], written: Sequence[Path], mode: str,
                 out: str | Path | None = None) -> int:
    """Log each run's figures (and the comparison) to its W&B run; returns how many runs.
    ``out`` as given to :func:`analyze`."""
    from kaedit.tracking import WandbTracker

    compare = [p for p in written if p.name == "compare.png"]
    logged = 0
    for d, dest in zip(map(Path, run_dirs), figure_dirs(run_dirs, out), strict=True):
        run_id = wandb_run_id(d)
        if run_id is None:
            log.warning("%s has no W&B run (it ran without logger=wandb): not logged", d)
            continue
        own = [p for p in written if p not in compare and p.parent == dest]
        wb = load_run(d).config.get("logger", {}).get("wandb", {}) or {}
        tracker = WandbTracker(str(d), project=wb.get("project", "kaedit"),
                               entity=wb.get("entity"), mode=mode, resume={"run_id": run_id},
                               log_artifacts=bool(wb.get("log_artifacts", False)))
        try:
            tracker.images({f"analysis/{p.stem}": str(p) for p in [*own, *compare]})
        finally:
            tracker.finish()
        logged += 1
    return logged


def topk_performance(run_dir: str | Path, ks: Sequence[float]) -> pd.DataFrame:
    """Fig. 4: scores of the run's edits with each step delta pruned to its top-k fraction.

    W = W₀ + Σ_t top_k(Δ_t, k) over the saved pre-fusion deltas (steps the run did not
    apply are left out); efficacy, generalization, specificity and score, x100, per k.
    """
    import json

    from omegaconf import OmegaConf
    from safetensors.torch import load_file

    from kaedit.evaluate import Scorer, aggregate
    from kaedit.fusion import top_k
    from kaedit.setup import build, build_model, build_records, build_schedule
    from kaedit.weights import applied

    bad = [k for k in ks if not 0.0 < float(k) <= 1.0]
    if bad:
        raise ConfigError(f"--k {bad}: each fraction must be in (0, 1]")

    run_dir = Path(run_dir)
    cfg = OmegaConf.load(run_dir / "config.yaml")
    files = step_delta_files(run_dir / "deltas", fused=False)
    if not files:
        raise FileNotFoundError(f"{str(run_dir)!r} has no deltas/step-*.safetensors: "
                                "run it with save_step_deltas=true")
    summary = run_dir / "summary.json"
    skipped = ({f["step"] for f in json.loads(summary.read_text()).get("faults", [])}
               if summary.is_file() else set())
    steps = {int(f.stem.split("-")[1]): f for f in files}
    records = build_records(cfg)
    batches = build_schedule(cfg).batches(len(records))
    made = [records[i] for b in batches[: max(steps)] for i in b]
    lm = build_model(cfg)
    evaluator, scorer = build(cfg.dataset.evaluator), Scorer(lm, int(cfg.eval_batch_size))
    rows = []
    for k in ks:
        total: dict = {}
        for step, f in sorted(steps.items()):
            if step in skipped:
                continue
            for name, d in load_file(str(f)).items():
                pruned = top_k(d.float(), float(k))
                total[name] = total[name] + pruned if name in total else pruned
        with applied(lm.model, total):
            values = evaluator(scorer, made)
        rows.append({"k": float(k), "edits": len(made),
                     **{key.split("/", 1)[1]: v for key, v in aggregate(values, "x").items()}})
        log.info("top-k %.2f: %s", k, rows[-1])
    return pd.DataFrame(rows)


def plot_topk(table: pd.DataFrame, out: Path, title: str = "") -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for m in (*HEADLINE, "score"):
        ax.plot(table["k"] * 100, table[m], marker="o", ms=3, label=m)
    ax.set_xlabel("top-k% of parameters retained")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=9)
    return save_figure(fig, out / "topk.png")


def topk_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m kaedit.results.analyze topk",
                                     description=topk_performance.__doc__)
    parser.add_argument("run", metavar="RUN_DIR")
    parser.add_argument("--k", default="0.05,0.1,0.2,0.3,0.5,0.8,1.0",
                        help="comma-separated fractions in (0, 1] (default %(default)s)")
    parser.add_argument("--out", default=None, help="default: RUN_DIR/figures/")
    args = parser.parse_args(argv)
    ks = [float(k) for k in args.k.split(",") if k.strip()]
    try:
        table = topk_performance(args.run, ks)
    except (FileNotFoundError, ConfigError) as exc:  # bad input; other errors: traceback
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    out = Path(args.out) if args.out else Path(args.run) / "figures"
    out.mkdir(parents=True, exist_ok=True)
    (out / "topk.csv").write_text(table.to_csv(index=False, float_format="%.6g"))
    print(out / "topk.csv")
    print(plot_topk(table, out, run_label(load_run(args.run).config)))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["topk"]:
        return topk_main(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m kaedit.results.analyze",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="kaedit run directories")
    parser.add_argument("--out", default=None,
                        help="write all figures here (default: RUN_DIR/figures/)")
    parser.add_argument("--max-steps", type=int, default=20,
                        help="steps shown in delta_similarity.png (default 20)")
    parser.add_argument("--wandb", choices=["offline", "online"], default=None,
                        help="also log the figures to each run's own W&B run")
    args = parser.parse_args(argv)
    try:
        written = analyze(args.runs, args.out, args.max_steps)
    except (FileNotFoundError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    for p in written:
        print(p)
    if args.wandb:
        logged = log_to_wandb(args.runs, written, args.wandb, args.out)
        log.info("figures logged to %d W&B run(s)", logged)
    return 0


if __name__ == "__main__":
    sys.exit(main())
