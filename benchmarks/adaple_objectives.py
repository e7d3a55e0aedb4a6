"""Compare AdaPLE's closed-form objectives on SmolLM2 (CPU, a few minutes per variant).

The first ``--n`` CounterFact records are edited in sequential batches of ``--batch``
(fusion: plain add, the model keeps each batch's update), then CounterFactEval scores all
of them. Every variant starts from the unedited weights. The first batch's targets
(δᵃ/δᵐ optimised on the unedited model) are the same for PMET and every AdaPLE objective,
so they are computed once and shared; later batches are computed per variant. Run from
the repo root::

    .venv/bin/python benchmarks/adaple_objectives.py [--n 20] [--batch 10] [--variants ...]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from kaedit.data import load_requests
from kaedit.evaluate import CounterFactEval, Scorer, aggregate
from kaedit.experiment import step_generator
from kaedit.methods.base import EditContext
from kaedit.methods.templates import context_templates
from kaedit.setup import build, build_model, build_stats, compose, resolve_data_root
from kaedit.weights import apply_deltas, restore, snapshot

REPO = Path(__file__).resolve().parents[1]
#: name -> (method config, overrides of its keys)
VARIANTS = {
    "memit": ("memit", {}),
    "pmet": ("pmet", {}),
    "adaple-paper": ("adaple", {"objective": "paper"}),
    "adaple-exact": ("adaple", {"objective": "exact"}),
    "adaple-memit": ("adaple", {"objective": "memit"}),
    "adaple-erase0.5": ("adaple", {"objective": "erase", "alpha": 0.5}),
    "adaple-erase-1": ("adaple", {"objective": "erase", "alpha": -1.0}),  # Algorithm 1
    "adaple-memit-noattn": ("adaple", {"objective": "memit", "optimize_attention": False}),
    # eq. 3's update at a key is r·kᵀ(λC)⁻¹k, unbounded: at SmolLM2's λ = 2000 that factor
    # is 0.5-6 for CounterFact subjects; λ = 15000 brings it below 1.
    "adaple-exact-lam15000": ("adaple", {"objective": "exact", "lam": 15000.0}),
}
DEFAULT = ["adaple-paper", "adaple-exact", "adaple-memit", "adaple-erase0.5", "adaple-erase-1"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--batch", type=int, default=10)
    ap.add_argument("--variants", nargs="+", default=DEFAULT, choices=list(VARIANTS))
    # one thread: on a shared 2-core machine more threads spin and wait on each other
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None, help="also write the rows as JSON")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    cfg = compose(["fusion=add", "logger=none"])
    resolve_data_root(cfg)
    lm = build_model(cfg)
    stats = build_stats(cfg)
    templates = context_templates(lm, [tuple(s) for s in cfg.templates.specs], seed=cfg.seed)
    ctx = EditContext(lm=lm, stats=stats, templates=templates)
    reqs = load_requests(f"{cfg.data_root}/counterfact/counterfact.json", limit=args.n)
    fusion = build(cfg.fusion)
    scorer, evaluator = Scorer(lm), CounterFactEval()

    def evaluate() -> dict[str, float]:
        row = aggregate(evaluator(scorer, reqs), "all")
        return {
            k.split("/")[1]: row[k]
            for k in ("all/efficacy", "all/generalization", "all/specificity", "all/score")
        }

    rows = [{"variant": "unedited", **evaluate()}]
    print(rows[0], flush=True)
    names = [lm.spec.weight("mlp_out", layer) for layer in cfg.model.edit.layers]
    original = snapshot(lm.model, names)
    unedited_targets: dict[tuple, object] = {}

    def share_first_targets(method) -> None:
        """Targets computed on the unedited model depend only on the batch and settings."""
        compute = method.targets

        def targets(ctx_, batch):
            if any(not torch.equal(lm.model.get_parameter(n), original[n]) for n in names):
                return compute(ctx_, batch)
            key = (
                tuple(r.case_id for r in batch),
                getattr(method, "optimize_attention", True),
                method.target,
            )
            if key not in unedited_targets:
                unedited_targets[key] = compute(ctx_, batch)
            return unedited_targets[key]

        method.targets = targets

    for name in args.variants:
        group, overrides = VARIANTS[name]
        mcfg = compose([f"method={group}"]).method
        method = build(mcfg, _convert_="all", **overrides)
        method.prepare(ctx)
        if hasattr(method, "targets"):  # PMET and AdaPLE
            share_first_targets(method)
        t0 = time.perf_counter()
        norms = []
        for step, start in enumerate(range(0, len(reqs), args.batch), start=1):
            batch = reqs[start : start + args.batch]
            fused = fusion(method.compute_deltas(ctx, batch), step_generator(cfg.seed, step))
            norms.append(max(float(d.norm()) for d in fused.values()))
            apply_deltas(lm.model, fused)
        row = {
            "variant": name,
            **evaluate(),
            "max_delta_norm": float(np.max(norms)),
            "seconds": time.perf_counter() - t0,
        }
        restore(lm.model, original)
        rows.append(row)
        print(row, flush=True)

    print(
        f"\n{args.n} CounterFact edits, batches of {args.batch}, fusion=add, "
        f"layers {list(cfg.model.edit.layers)}, lam {cfg.model.edit.lam}\n"
    )
    print("| variant | efficacy | generalization | specificity | score | max ‖Δ‖ |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['variant']} | {r['efficacy']:.1f} | {r['generalization']:.1f} | "
            f"{r['specificity']:.1f} | {r['score']:.1f} | {r.get('max_delta_norm', 0):.3g} |"
        )
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
