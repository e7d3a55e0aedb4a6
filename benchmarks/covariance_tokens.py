"""What the covariance's token count changes (issue 28): C = E[kkᵀ] of the edited layers'
keys from ``stats.n_tokens`` tokens of WikiText-2 against the whole corpus, and MEMIT's
update for one batch of edits solved with each.

One process, one torch thread. For each token count (``--tokens``; ``all`` = every whole
window of ``stats.corpus``, WikiText-2 valid+test here):

- per edit layer, the spectrum of C (eigenvalue quantiles, the mean of the smallest tenth),
  and C's relative Frobenius distance from the last count's C;
- one batch of the first ``--n`` records: MEMIT's targets are optimised once, then the
  update Δ = R Kᵀ(λC + KKᵀ)⁻¹ is spread over the layers with each C (the method's own
  ``spread_residual``), and ‖Δ‖ per layer, ‖Δ − Δ_last‖ / ‖Δ_last‖, and the batch's
  efficacy / generalization / specificity with that Δ applied (the run's evaluator).

Writes ``benchmarks/results/<date>-<host>-covariance.json`` and prints a Markdown table.

    python benchmarks/covariance_tokens.py --n 100 --tokens 40000,160000,all
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import socket
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from kaedit.methods.solve import solve_update, spread_residual
from kaedit.setup import build, build_session, compose
from kaedit.weights import applied, frobenius


def spectrum(c: torch.Tensor) -> dict[str, float]:
    ev = torch.linalg.eigvalsh(c.double()).clamp_min(0).numpy()
    tenth = max(1, len(ev) // 10)
    return {"trace": float(ev.sum()), "max": float(ev[-1]), "median": float(np.median(ev)),
            "q01": float(np.quantile(ev, 0.01)), "min": float(ev[0]),
            "smallest_tenth_mean": float(ev[:tenth].mean())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100, help="records edited in one batch")
    ap.add_argument("--tokens", default="40000,all",
                    help="token counts to compare, comma-separated; 'all' = the whole corpus "
                         "(the last is the reference)")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    args.tokens = args.tokens.split(",")
    torch.set_num_threads(1)
    cfg = compose(["method=memit", "logger=none", f"schedule.n_edits={args.n}",
                   f"schedule.batch_size={args.n}", *args.overrides])
    s = build_session(cfg)
    assert s.method is not None and s.ctx is not None and s.planned is not None
    method, lm, requests = s.method, s.lm, s.planned
    layers = [int(x) for x in method.layers]
    z_module = lm.spec.module("layer", layers[-1])

    t0 = time.perf_counter()
    z = method.targets(s.ctx, requests)
    targets_s = time.perf_counter() - t0
    print(f"targets of {len(requests)} requests: {targets_s:.0f} s", flush=True)

    rows: dict[str, dict] = {}
    covs_by: dict[str, dict[int, torch.Tensor]] = {}
    deltas_by: dict[str, dict[str, torch.Tensor]] = {}
    for count in args.tokens:
        node = OmegaConf.to_container(s.cfg.stats, resolve=True)
        node["n_tokens"] = None if count == "all" else int(count)
        store = build(OmegaConf.create(node))
        t0 = time.perf_counter()
        covs = store.get(lm, layers)
        stats_s = time.perf_counter() - t0

        def solve(layer, resid, keys, weight, covs=covs):  # MEMIT's (methods/memit.py)
            return solve_update(resid, keys, covs[layer], method.lam)

        deltas = spread_residual(lm, requests, s.templates, layers, z, z_module, solve)
        with applied(lm.model, deltas):
            scores = s.evaluator(s.scorer, requests)
        covs_by[count], deltas_by[count] = covs, deltas
        rows[count] = {
            "n_tokens": node["n_tokens"] or "all",
            "stats_s": stats_s,
            "spectrum": {str(lay): spectrum(c) for lay, c in covs.items()},
            "delta_norm": frobenius(deltas),
            "delta_norm_per_layer": {n: float(d.norm()) for n, d in deltas.items()},
            "scores": {k: float(np.nanmean(v)) * 100 for k, v in scores.items()
                       if k in ("efficacy", "generalization", "specificity")},
        }
        print(count, json.dumps({k: rows[count][k] for k in ("delta_norm", "scores")}),
              flush=True)

    ref = args.tokens[-1]
    for count in args.tokens:
        rows[count]["cov_rel_diff_vs_ref"] = {
            str(lay): float((c - covs_by[ref][lay]).norm() / covs_by[ref][lay].norm())
            for lay, c in covs_by[count].items()}
        rows[count]["delta_rel_diff_vs_ref"] = float(
            sum(float((deltas_by[count][n] - d).norm()) ** 2
                for n, d in deltas_by[ref].items()) ** 0.5 / frobenius(deltas_by[ref]))

    out = Path(__file__).parent / "results" / (
        f"{dt.date.today()}-{socket.gethostname()}-covariance.json")
    out.write_text(json.dumps({"n_requests": len(requests), "model": cfg.model.name,
                               "layers": layers, "lam": method.lam, "threads": 1,
                               "targets_s": targets_s, "torch": torch.__version__,
                               "corpus": list(cfg.stats.corpus), "rows": rows}, indent=1))
    print(markdown(rows, layers, ref))
    print("wrote", out)


def markdown(rows: dict[str, dict], layers: list[int], ref: str) -> str:
    lines = ["| tokens | ‖Δ‖ | ‖Δ − Δ_ref‖/‖Δ_ref‖ | efficacy | generalization | specificity |",
             "|---|---|---|---|---|---|"]
    for count, r in rows.items():
        sc = r["scores"]
        lines.append(f"| {count} | {r['delta_norm']:.3f} | {r['delta_rel_diff_vs_ref']:.3f} | "
                     f"{sc['efficacy']:.1f} | {sc['generalization']:.1f} | "
                     f"{sc['specificity']:.1f} |")
    lines += ["", "| layer | " + " | ".join(
        f"{c}: smallest-tenth mean / median / ‖C − C_ref‖/‖C_ref‖" for c in rows) + " |",
        "|---|" + "---|" * len(rows)]
    for lay in layers:
        cells = []
        for r in rows.values():
            sp = r["spectrum"][str(lay)]
            cells.append(f"{sp['smallest_tenth_mean']:.3g} / {sp['median']:.3g} / "
                         f"{r['cov_rel_diff_vs_ref'][str(lay)]:.3f}")
        lines.append(f"| {lay} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + f"\n(reference: {ref})"


if __name__ == "__main__":
    main()
