"""Time v* (target) optimisation on SmolLM2 under each path and stop rule (issue 30).

One process, one torch thread, the same CounterFact requests, MEMIT's module (the residual
stream at the last edit layer) and the model's target settings; each variant changes one
thing. Prints and writes ``benchmarks/results/<date>-<host>-targets.json``: seconds per
edit, request-steps (Σ over steps of the requests still optimising: what the step cost
scales with) and max |Δv*| / max |v*| against the first variant.

    python benchmarks/targets_paths.py --n 20
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import socket
import time
from dataclasses import replace
from pathlib import Path

import torch

from kaedit import data
from kaedit.methods.targets import TargetConfig, optimize_targets
from kaedit.methods.templates import context_templates
from kaedit.setup import build_model, compose, resolve_data_root

VARIANTS = {
    "edit_block+nll": {},
    "all_blocks+nll": {"from_edit_layer": False},
    "edit_block+most_probable": {"early_stop_on": "most_probable"},
    "edit_block+total": {"early_stop_on": "total"},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20, help="requests, optimised together")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg = compose(args.overrides)
    resolve_data_root(cfg)
    lm = build_model(cfg, [int(x) for x in cfg.method.layers])
    requests = data.from_config(cfg.dataset, cache_dir=str(cfg.cache_dir))[: args.n]
    templates = context_templates(lm, [tuple(x) for x in cfg.templates.specs], seed=cfg.seed)
    base = replace(TargetConfig(**cfg.model.edit.target), early_stop_on="nll")
    module = lm.spec.module("layer", int(cfg.method.layers[-1]))
    report, first = {}, None
    for name, change in VARIANTS.items():
        steps: list[int] = []
        counted = _count_running(steps)
        t0 = time.perf_counter()
        with counted:
            init, delta = optimize_targets(lm, requests, templates, [module],
                                           replace(base, **change))[module]
        seconds = time.perf_counter() - t0
        z = init + delta
        first = z if first is None else first
        report[name] = {"s_per_edit": seconds / len(requests), "request_steps": sum(steps),
                        "running_per_step": steps,
                        "max_rel_diff_vs_first": float((z - first).abs().max()
                                                       / first.abs().max())}
        print(name, json.dumps({k: v for k, v in report[name].items()
                                if k != "running_per_step"}), flush=True)
    out = Path(__file__).parent / "results" / (
        f"{dt.date.today()}-{socket.gethostname()}-targets.json")
    out.write_text(json.dumps({"n_requests": args.n, "threads": 1, "module": module,
                               "torch": torch.__version__, "variants": report}, indent=1))
    print("wrote", out)


class _count_running:
    """Records, per step, how many requests are still optimising (the KL rows' count:
    one per running request) by wrapping the KL term the loop calls once per step."""

    def __init__(self, steps: list[int]) -> None:
        self.steps = steps

    def __enter__(self) -> None:
        import kaedit.methods.targets as targets

        self._orig = targets.F.kl_div

        def kl_div(inp, *a, **k):
            self.steps.append(int(inp.shape[0]))
            return self._orig(inp, *a, **k)

        targets.F.kl_div = kl_div

    def __exit__(self, *exc) -> None:
        import kaedit.methods.targets as targets

        targets.F.kl_div = self._orig


if __name__ == "__main__":
    main()
