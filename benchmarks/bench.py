"""``make bench``: where the time of a sequential-editing run goes, and how it compares.

On SmolLM2 (or any ``model=``) and the same CounterFact edits, runs in separate processes:

1. **statistics** -- the covariance statistics of the edit layers computed from the corpus
   (cold) and read back from the cache (warm);
2. **kaedit** -- ``python -m kaedit.run``'s runner: MEMIT, all requests' v* optimised
   together on the fast path (positions before the subject token computed once),
   evaluation in padded batches across records;
3. **kaedit_full** -- the same, with every v* step recomputing every position
   (``++model.edit.target.fast=false``): ``targets_fast_speedup`` = its targets time /
   kaedit's, on the same edits in the same bench;
4. **baseline** -- the same runner, edits and fusion, but MEMIT as the reference ROME/MEMIT
   code runs it: each request's v* optimised alone (``method.batch_targets=false``), in
   full, and evaluation one prompt sequence per forward pass (``eval_batch_size=1``).
   Everything else (keys, closed-form solve, fusion, metrics) is the same code, so the
   ratio isolates those choices; the runs produce the same metrics up to numerics
   (checked and reported);
5. **memory** -- peak memory of one target optimisation of ``--memory-batch`` requests
   (default 100, Table 3's batch) on each path, each in a fresh process, under the
   default ``target.chunk_tokens`` budget (``--memory-steps`` steps: the peak is reached
   in the first backward pass).

Per-stage seconds per edit come from the runner's own ``time/*`` columns (targets, keys,
solve, fusion, evaluation). Writes ``benchmarks/results/<date>-<host>.json`` (with
``targets_s_per_edit`` per path, ``targets_fast_speedup``, ``end_to_end_speedup``,
``projected_1000_edits_h`` and ``memory``) and ``.md``, and prints the table.

    python benchmarks/bench.py                       # 100 edits in batches of 10
    python benchmarks/bench.py --n-edits 20 model=smollm2 fusion=add
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from kaedit.setup import build_model, build_stats, compose, resolve_data_root

REPO = Path(__file__).resolve().parents[1]
STAGES = ("targets", "keys", "solve", "fusion", "eval")


def peak_memory_mb() -> float:
    """Peak memory of this process: GPU memory allocated on CUDA, else resident set size."""
    import torch

    if torch.cuda.is_available() and torch.cuda.max_memory_allocated() > 0:
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def phase_statistics(overrides: list[str]) -> dict[str, Any]:
    cfg = compose(overrides)
    resolve_data_root(cfg)
    layers = [int(x) for x in cfg.method.layers]
    lm = build_model(cfg, layers)
    t0 = time.perf_counter()
    build_stats(cfg).get(lm, layers)  # empty cache directory: computed from the corpus
    cold = time.perf_counter() - t0
    t0 = time.perf_counter()
    build_stats(cfg).get(lm, layers)  # a new store, as a new run would make: read back
    warm = time.perf_counter() - t0
    return {"layers": layers, "n_tokens": int(cfg.stats.n_tokens), "cold_s": cold,
            "warm_s": warm, "warm_fraction": warm / cold, "peak_memory_mb": peak_memory_mb()}


def phase_run(overrides: list[str], run_dir: str) -> dict[str, Any]:
    import pandas as pd

    from kaedit import experiment

    cfg = compose(overrides)
    t0 = time.perf_counter()
    summary = experiment.run(cfg, run_dir=run_dir)
    wall = time.perf_counter() - t0
    m = pd.read_csv(Path(run_dir) / "metrics.csv")
    steps = m[m.step > 0]
    n = int(summary["edits_done"])
    per_edit = {s: float(steps[f"time/{s}_s"].sum()) / n for s in STAGES if s != "eval"}
    per_edit["eval"] = float(m["time/eval_s"].sum()) / n  # step 0 included
    return {
        "wall_s": wall, "edits": n, "steps": int(summary["steps"]),
        "s_per_edit": wall / n, "stage_s_per_edit": per_edit,
        "compute_s_per_edit": float(steps["time/compute_s"].sum()) / n,
        "eval_prompts": int(m["eval/prompts"].sum()),
        # edits scored over all evaluations (each evaluation re-checks every edit so far)
        "eval_edits": len(pd.read_csv(Path(run_dir) / "retention.csv")),
        "eval_prompts_per_s": float(m["eval/prompts"].sum() / m["time/eval_s"].sum()),
        "final": {k: summary[k] for k in summary if k.startswith(("seen/", "batch/"))},
        "peak_memory_mb": peak_memory_mb(),
    }


def phase_memory(overrides: list[str], n: int, steps: int) -> dict[str, Any]:
    """Peak memory of one MEMIT target optimisation of ``n`` requests (this process)."""
    from dataclasses import replace

    from kaedit import data
    from kaedit.experiment import build, resolve_data_root
    from kaedit.methods.core import TargetConfig, context_templates, optimize_targets
    from kaedit.models import load_model

    cfg = compose(overrides)
    resolve_data_root(cfg)
    lm = load_model(cfg.model, lambda: build(cfg.model.load))
    requests = data.from_config(cfg.dataset, cache_dir=str(cfg.cache_dir))[:n]
    templates = context_templates(lm, [tuple(x) for x in cfg.templates.specs], seed=cfg.seed)
    target = replace(TargetConfig(**cfg.method.target), steps=steps, early_stop_loss=-1.0)
    module = lm.spec.module("layer", int(cfg.method.layers[-1]))
    before = peak_memory_mb()
    t0 = time.perf_counter()
    optimize_targets(lm, requests, templates, [module], target)
    return {"requests": len(requests), "templates": len(templates), "steps": steps,
            "fast": target.fast, "chunk_tokens": target.chunk_tokens,
            "seconds": time.perf_counter() - t0, "peak_before_mb": before,
            "peak_memory_mb": peak_memory_mb()}


def machine() -> dict[str, Any]:
    import torch

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"host": socket.gethostname(), "cpu": cpu, "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "gpu": gpu,
            "torch": torch.__version__, "python": platform.python_version()}


def fusion_label(node) -> str:
    """``DropRescale(p=0.8)``: the fusion's class and its parameters."""
    params = ", ".join(f"{k}={v}" for k, v in node.items() if not str(k).startswith("_"))
    return f"{node._target_.rsplit('.', 1)[-1]}({params})"


def child(phase: str, overrides: list[str], run_dir: str, out: Path,
          extra: tuple[str, ...] = ()) -> dict[str, Any]:
    """Run one phase in a fresh process (its own peak memory, no shared caches)."""
    cmd = [sys.executable, __file__, "--phase", phase, "--phase-out", str(out),
           "--run-dir", run_dir, *extra, "--", *overrides]
    print(f"[bench] {phase}: {' '.join(overrides)}", flush=True)
    subprocess.run(cmd, check=True, cwd=REPO)
    return json.loads(out.read_text())


def markdown(res: dict[str, Any]) -> str:
    k, f, b, st = res["kaedit"], res["kaedit_full"], res.get("baseline"), res["statistics"]
    mc = res["machine"]
    lines = [
        (f"Machine: {mc['host']}, {mc['cpu']}, {mc['cores']} cores "
        f"({mc['torch_threads']} torch threads), GPU: {mc['gpu'] or 'none'}, "
        f"torch {mc['torch']}. Date: {res['date']}."),
        (f"Run: `{res['command']}` -- {res['model']}, MEMIT + {res['fusion']}, "
        f"{res['n_edits']} CounterFact edits in sequential batches of {res['batch_size']}, "
        "every step evaluated on its batch and on all edits so far."),
        "",
        ("| seconds per edit | kaedit (fast targets) | kaedit (full targets) "
         "| one-at-a-time baseline | baseline / kaedit |"),
        "|---|---|---|---|---|",
    ]
    for s in STAGES:
        kv, fv = k["stage_s_per_edit"][s], f["stage_s_per_edit"][s]
        bv = b["stage_s_per_edit"][s] if b else None
        ratio = f"{bv / kv:.1f}×" if b and kv > 0 else ""
        lines.append(f"| {s} | {kv:.2f} | {fv:.2f} | {'' if bv is None else f'{bv:.2f}'} "
                     f"| {ratio} |")
    end = f"{b['s_per_edit']:.2f}" if b else ""
    speedup = f"**{res['end_to_end_speedup']:.1f}×**" if b else ""
    lines += [
        (f"| **end to end** (model load, templates, step 0 included) | {k['s_per_edit']:.2f} "
         f"| {f['s_per_edit']:.2f} | {end} | {speedup} |"),
        "",
        (f"- targets: fast path {res['targets_s_per_edit']['fast']:.2f} s/edit, full "
         f"recomputation {res['targets_s_per_edit']['full']:.2f} s/edit: "
         f"**{res['targets_fast_speedup']:.1f}×** (same run, same edits)"),
        f"- evaluation throughput: {k['eval_prompts_per_s']:.0f} prompts/s"
        + (f" vs {b['eval_prompts_per_s']:.0f} prompts/s one at a time "
           f"({res['eval_speedup']:.1f}×)" if b else ""),
        (f"- covariance statistics ({len(st['layers'])} layers, {st['n_tokens']:,} tokens): "
        f"cold {st['cold_s']:.1f} s, warm (cached) {st['warm_s']:.2f} s = "
        f"{100 * st['warm_fraction']:.1f} % of cold"),
        f"- peak memory: kaedit {k['peak_memory_mb']:.0f} MiB, full targets "
        f"{f['peak_memory_mb']:.0f} MiB"
        + (f", baseline {b['peak_memory_mb']:.0f} MiB" if b else "")
        + f", statistics {st['peak_memory_mb']:.0f} MiB",
        (f"- 1,000 sequential edits evaluated every 100 (projected from this run): "
        f"{res['projected_1000_edits_h']:.2f} h"),
    ]
    mem = res.get("memory")
    if mem:
        lines.append(
            f"- peak memory of one target optimisation of {mem['fast']['requests']} requests "
            f"({mem['fast']['templates']} templates, chunk_tokens "
            f"{mem['fast']['chunk_tokens']}): fast {mem['fast']['peak_memory_mb']:.0f} MiB, "
            f"full {mem['full']['peak_memory_mb']:.0f} MiB (model and data loaded: "
            f"{mem['fast']['peak_before_mb']:.0f} MiB)")
    if b:
        lines.append(
            "- same results: final seen/efficacy, generalization, specificity "
            + ", ".join(f"{k['final'][m]:.1f} vs {f['final'][m]:.1f} vs {b['final'][m]:.1f}"
                        for m in ("seen/efficacy", "seen/generalization",
                                  "seen/specificity")))
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n-edits", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=10)
    ap.add_argument("--no-baseline", action="store_true", help="skip the reference baseline")
    ap.add_argument("--memory-batch", type=int, default=100,
                    help="requests in the memory phase (0: skip it)")
    ap.add_argument("--memory-steps", type=int, default=2, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    ap.add_argument("--phase", choices=["statistics", "run", "memory"], help=argparse.SUPPRESS)
    ap.add_argument("--phase-out", help=argparse.SUPPRESS)
    ap.add_argument("--run-dir", help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model=smollm2 fusion=add")
    args = ap.parse_args()

    if args.phase:
        if args.phase == "statistics":
            result = phase_statistics(args.overrides)
        elif args.phase == "memory":
            result = phase_memory(args.overrides, args.memory_batch, args.memory_steps)
        else:
            result = phase_run(args.overrides, args.run_dir)
        Path(args.phase_out).write_text(json.dumps(result, indent=2))
        return

    with tempfile.TemporaryDirectory(prefix="kaedit-bench-") as tmp:
        common = [
            "method=memit", "logger=csv", f"schedule.n_edits={args.n_edits}",
            f"schedule.batch_size={args.batch_size}", "schedule.generation_every=0",
            "schedule.retention_sample=null", "schedule.checkpoint_every=0",
            f"stats.cache_dir={tmp}/stats",  # empty: the statistics phase measures cold
            *args.overrides,
        ]
        cfg = compose(common)
        res: dict[str, Any] = {
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "command": "python benchmarks/bench.py " + " ".join(sys.argv[1:]),
            "machine": machine(), "model": cfg.model.name, "fusion": fusion_label(cfg.fusion),
            "n_edits": args.n_edits, "batch_size": args.batch_size,
        }
        t = Path(tmp)
        res["statistics"] = child("statistics", common, str(t / "stats-run"), t / "s.json")
        full = "++model.edit.target.fast=false"  # every v* step recomputes every position
        res["kaedit"] = k = child("run", common, str(t / "kaedit"), t / "k.json")
        res["kaedit_full"] = f = child("run", [*common, full], str(t / "full"), t / "f.json")
        res["targets_s_per_edit"] = {"fast": k["stage_s_per_edit"]["targets"],
                                     "full": f["stage_s_per_edit"]["targets"]}
        res["targets_fast_speedup"] = (f["stage_s_per_edit"]["targets"]
                                       / k["stage_s_per_edit"]["targets"])
        if not args.no_baseline:
            base = [*common, full, "method.batch_targets=false", "eval_batch_size=1"]
            res["baseline"] = b = child("run", base, str(t / "baseline"), t / "b.json")
            res["end_to_end_speedup"] = b["wall_s"] / k["wall_s"]
            res["eval_speedup"] = k["eval_prompts_per_s"] / b["eval_prompts_per_s"]
            res["targets_speedup"] = (b["stage_s_per_edit"]["targets"]
                                      / k["stage_s_per_edit"]["targets"])
        if args.memory_batch > 0:
            mem_args = ("--memory-batch", str(args.memory_batch),
                        "--memory-steps", str(args.memory_steps))
            res["memory"] = {
                path: child("memory", [*common, *extra], str(t / "mem"), t / f"m-{path}.json",
                            mem_args)
                for path, extra in (("fast", []), ("full", [full]))
            }
        # 1,000 edits, evaluation every 100 edits on a sample of 100 earlier ones + the batch
        prompts_per_edit = k["eval_prompts"] / k["eval_edits"]
        edit_s = sum(k["stage_s_per_edit"][s] for s in STAGES if s != "eval")
        eval_s = 10 * (100 + args.batch_size) * prompts_per_edit / k["eval_prompts_per_s"]
        res["projected_1000_edits_h"] = (1000 * edit_s + eval_s) / 3600

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # one file per machine and accelerator (hosts of one cluster often share a name)
    gpu = res["machine"]["gpu"]
    accel = "-" + re.sub(r"[^a-z0-9]+", "-", gpu.lower()).strip("-") if gpu else ""
    stem = f"{dt.date.today().isoformat()}-{socket.gethostname()}{accel}"
    (out / f"{stem}.json").write_text(json.dumps(res, indent=2) + "\n")
    md = markdown(res)
    (out / f"{stem}.md").write_text(md)
    print(md)
    print(f"[bench] wrote {out / stem}.json and .md")


if __name__ == "__main__":
    main()
