"""``make bench``: where the time of a sequential-editing run goes, and what a long run costs.

On SmolLM2 (or any ``model=``) and the same CounterFact edits (default: 100 edits in one
batch of 100, Table 3's batch), runs in separate processes:

1. **statistics** -- the covariance statistics of the edit layers computed from the corpus
   (cold) and read back from the cache (warm), and one WikiText-2 perplexity evaluation
   of the unedited model (``perplexity_s``: what ``perplexity.every`` costs per use);
2. **kaedit** -- ``python -m kaedit.run``'s runner as configured: MEMIT, all requests' v*
   optimised together from the edit block up (``target.from_edit_layer``), positions
   before the subject token computed once (``target.fast``), evaluation in padded batches
   across records;
3. **kaedit_full** -- the same, with every v* step recomputing every position of every
   block (``++model.edit.target.fast=false ++model.edit.target.from_edit_layer=false``);
4. **kaedit_most_probable** -- the same as kaedit with most-probable early stopping
   (``++model.edit.target.early_stop_on=most_probable``, ENCORE's MPES);
   ``targets_s_per_edit`` has the three paths, timed on the same edits in the same bench;
5. **baseline** -- the same runner, edits and fusion, but MEMIT as the reference ROME/MEMIT
   code runs it: each request's v* optimised alone (``method.batch_targets=false``), in
   full, and evaluation one prompt sequence per forward pass (``eval_batch_size=1``).
   Everything else (keys, closed-form solve, fusion, metrics) is the same code, so the
   ratio isolates those choices; the runs produce the same metrics up to numerics
   (checked and reported); ``--no-baseline`` skips it;
6. **memory** -- peak memory of one target optimisation of ``--memory-batch`` requests
   (default 100, Table 3's batch) on the fast and full paths, each in a fresh process,
   under the default ``target.chunk_tokens`` budget (``--memory-steps`` steps: the peak is
   reached in the first backward pass).

Per-stage seconds per edit come from the runner's own ``time/*`` columns (targets, keys,
solve, fusion, evaluation). From them and the perplexity time, ``projected`` gives the
hours of a 1,000- and a 10,000-edit run per target path in batches of ``--batch-size``,
evaluated as ``experiment=ka_study_10k`` evaluates (every 1,000 edits and at step 0: the
batch, a 200-edit sample of the edits so far, the first batch in full, the neighbourhoods
of 200 planned edits, WikiText-2 perplexity), and evaluation's share of that time
(:func:`projection`). Writes ``benchmarks/results/<date>-<host>[-<gpu>].json`` (with
``targets_s_per_edit``, ``end_to_end_s_per_edit``, ``eval_share``,
``projected_1000_edits_h``, ``projected_10000_edits_h``, ``peak_memory_mb``) and ``.md``,
and prints the table.

    python benchmarks/bench.py                       # 100 edits in one batch of 100
    python benchmarks/bench.py --n-edits 20 --batch-size 10 model=smollm2 fusion=add
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

from kaedit.setup import build_session, build_stats, compose

REPO = Path(__file__).resolve().parents[1]
STAGES = ("targets", "keys", "solve", "fusion", "eval")


def peak_memory_mb() -> float:
    """Peak memory of this process: GPU memory allocated on CUDA, else resident set size."""
    import torch

    if torch.cuda.is_available() and torch.cuda.max_memory_allocated() > 0:
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def phase_statistics(overrides: list[str]) -> dict[str, Any]:
    # the model and the run's perplexity; no method: its prepare would load the statistics
    session = build_session(compose(overrides), plan=False, templates=False,
                            method=False)
    cfg, lm = session.cfg, session.lm
    layers = [int(x) for x in cfg.method.layers]
    lm.spec.check(lm.model, layers)
    t0 = time.perf_counter()
    cold_store = build_stats(cfg)
    cold_store.get(lm, layers)  # empty cache directory: computed from the corpus
    cold = time.perf_counter() - t0
    t0 = time.perf_counter()
    warm_store = build_stats(cfg)
    warm_store.get(lm, layers)  # a new store, as a new run would make: read back
    warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    perplexity = session.perplexity(lm)  # tokenising included, as a run's first use
    ppl_s = time.perf_counter() - t0
    return {"layers": layers, "n_tokens": int(cfg.stats.n_tokens), "cold_s": cold,
            "warm_s": warm, "warm_fraction": warm / cold,
            # seconds each store spent computing from the corpus (warm: none, read back)
            "cold_compute_s": cold_store.compute_seconds,
            "warm_compute_s": warm_store.compute_seconds, "perplexity": perplexity,
            "perplexity_tokens": int(cfg.perplexity.n_tokens), "perplexity_s": ppl_s,
            "peak_memory_mb": peak_memory_mb()}


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
        "eval_share": float(summary["eval_share"]),
        # seconds per scored request: every evaluation's time over the requests it scored
        # (retention.csv: one row per tracked edit and evaluation; all edits tracked here)
        "eval_s_per_request": float(m["time/eval_s"].sum()) / len(
            pd.read_csv(Path(run_dir) / "retention.csv")),
        "final": {k: summary[k] for k in summary if k.startswith(("seen/", "batch/"))},
        "peak_memory_mb": peak_memory_mb(),
    }


def phase_memory(overrides: list[str], n: int, steps: int) -> dict[str, Any]:
    """Peak memory of one MEMIT target optimisation of ``n`` requests (this process)."""
    from dataclasses import replace

    from kaedit.methods.targets import TargetConfig, optimize_targets

    # records, model and context templates; no method (its prepare loads the statistics)
    session = build_session(compose(overrides), method=False)
    cfg, lm, templates = session.cfg, session.lm, session.templates
    requests = session.records[:n]
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


#: What the projections assume: ``experiment=ka_study_10k``'s evaluation
#: (experiments/experiment/ka_study_10k.yaml), which they are meant to size.
EVAL_EVERY_EDITS = 1000
EVAL_SAMPLE = 200
EVAL_FIXED = 200
#: The target paths the bench times (run name, label, extra overrides).
FULL = ["++model.edit.target.fast=false", "++model.edit.target.from_edit_layer=false"]
PATHS = (("kaedit", "fast", []), ("kaedit_full", "full", FULL),
         ("kaedit_most_probable", "most_probable",
          ["++model.edit.target.early_stop_on=most_probable"]))


def projection(n_edits: int, batch_size: int, edit_s_per_edit: float,
               eval_s_per_request: float, perplexity_s: float) -> dict[str, float]:
    """Hours of an ``n_edits`` run in batches of ``batch_size`` and evaluation's share.

    Editing: ``n_edits`` × the measured seconds per edit of every edit stage (targets,
    keys, solve, fusion). Evaluation as ``experiment=ka_study_10k`` does it: at step 0 and
    every ``EVAL_EVERY_EDITS`` edits (the last step among them), each scoring the batch,
    ``EVAL_SAMPLE`` edits made so far, the first batch in full and the neighbourhoods of
    ``EVAL_FIXED`` planned edits -- counted as ``2·batch + sample + fixed`` whole requests at
    the measured seconds per scored request, an upper bound (the sets overlap, and the
    fixed set scores only neighbourhood prompts) -- plus one perplexity evaluation each.
    Model loading, context templates and statistics (cached) are left out: seconds."""
    evaluations = 1 + -(-n_edits // EVAL_EVERY_EDITS)
    requests = 2 * batch_size + EVAL_SAMPLE + EVAL_FIXED
    edit_h = n_edits * edit_s_per_edit / 3600
    eval_h = evaluations * (requests * eval_s_per_request + perplexity_s) / 3600
    return {"hours": edit_h + eval_h, "edit_h": edit_h, "eval_h": eval_h,
            "eval_share": eval_h / (edit_h + eval_h), "evaluations": evaluations,
            "requests_per_evaluation": requests}


def project(res: dict[str, Any]) -> None:
    """Fill ``res["projected"]`` (per target path, 1,000 and 10,000 edits) and the
    headline fields of the configured path (``kaedit``)."""
    ppl_s = res["statistics"]["perplexity_s"]
    res["projected"] = {}
    for name, label, _ in PATHS:
        run = res[name]
        edit_s = sum(run["stage_s_per_edit"][s] for s in STAGES if s != "eval")
        res["projected"][label] = {
            str(n): projection(n, res["batch_size"], edit_s, run["eval_s_per_request"], ppl_s)
            for n in (1000, 10000)}
    kp = res["projected"]["fast"]
    res["projected_1000_edits_h"] = kp["1000"]["hours"]
    res["projected_10000_edits_h"] = kp["10000"]["hours"]
    res["projected_10000_eval_share"] = kp["10000"]["eval_share"]


def markdown(res: dict[str, Any]) -> str:
    k, f, b, st = res["kaedit"], res["kaedit_full"], res.get("baseline"), res["statistics"]
    mp = res["kaedit_most_probable"]
    mc = res["machine"]
    lines = [
        (f"Machine: {mc['host']}, {mc['cpu']}, {mc['cores']} cores "
        f"({mc['torch_threads']} torch threads), GPU: {mc['gpu'] or 'none'}, "
        f"torch {mc['torch']}. Date: {res['date']}."),
        (f"Run: `{res['command']}` -- {res['model']}, MEMIT + {res['fusion']}, "
        f"{res['n_edits']} CounterFact edits in sequential batches of {res['batch_size']}, "
        "every step evaluated on its batch and on all edits so far."),
        "",
        ("| seconds per edit | kaedit (fast targets) | full targets | most-probable stop "
         "| one-at-a-time baseline | baseline / kaedit |"),
        "|---|---|---|---|---|---|",
    ]
    for s in STAGES:
        kv, fv, mv = (r["stage_s_per_edit"][s] for r in (k, f, mp))
        bv = b["stage_s_per_edit"][s] if b else None
        ratio = f"{bv / kv:.1f}×" if b and kv > 0 else ""
        lines.append(f"| {s} | {kv:.2f} | {fv:.2f} | {mv:.2f} "
                     f"| {'' if bv is None else f'{bv:.2f}'} | {ratio} |")
    end = f"{b['s_per_edit']:.2f}" if b else ""
    speedup = f"**{res['end_to_end_speedup']:.1f}×**" if b else ""
    lines += [
        (f"| **end to end** (model load, templates, step 0 included) | {k['s_per_edit']:.2f} "
         f"| {f['s_per_edit']:.2f} | {mp['s_per_edit']:.2f} | {end} | {speedup} |"),
        (f"| evaluation's share of the run | {k['eval_share']:.0%} | {f['eval_share']:.0%} "
         f"| {mp['eval_share']:.0%} | {'' if not b else format(b['eval_share'], '.0%')} | |"),
        "",
        (f"- targets: fast path {res['targets_s_per_edit']['fast']:.2f} s/edit, full "
         f"recomputation {res['targets_s_per_edit']['full']:.2f} s/edit "
         f"(**{res['targets_fast_speedup']:.1f}×**), most-probable early stopping "
         f"{res['targets_s_per_edit']['most_probable']:.2f} s/edit (same edits)"),
        f"- evaluation throughput: {k['eval_prompts_per_s']:.0f} prompts/s, "
        f"{k['eval_s_per_request']:.2f} s per scored request"
        + (f" vs {b['eval_prompts_per_s']:.0f} prompts/s one at a time "
           f"({res['eval_speedup']:.1f}×)" if b else ""),
        (f"- covariance statistics ({len(st['layers'])} layers, {st['n_tokens']:,} tokens): "
        f"cold {st['cold_s']:.1f} s, warm (cached) {st['warm_s']:.2f} s = "
        f"{100 * st['warm_fraction']:.1f} % of cold; one perplexity evaluation "
        f"({st['perplexity_tokens']:,} tokens) {st['perplexity_s']:.1f} s"),
        f"- peak memory: kaedit {k['peak_memory_mb']:.0f} MiB, full targets "
        f"{f['peak_memory_mb']:.0f} MiB"
        + (f", baseline {b['peak_memory_mb']:.0f} MiB" if b else "")
        + f", statistics {st['peak_memory_mb']:.0f} MiB",
        "",
        (f"Projected from this bench (batches of {res['batch_size']}, evaluation every "
         f"{EVAL_EVERY_EDITS:,} edits and at step 0 on {EVAL_SAMPLE} seen + first batch + "
         f"{EVAL_FIXED} fixed neighbourhoods + perplexity; `projection` in bench.py):"),
        "",
        "| target path | 1,000 edits | 10,000 edits | evaluation's share (10,000) |",
        "|---|---|---|---|",
    ]
    for label, pr in res["projected"].items():
        lines.append(f"| {label} | {pr['1000']['hours']:.2f} h | {pr['10000']['hours']:.2f} h "
                     f"| {pr['10000']['eval_share']:.0%} |")
    lines.append("")
    mem = res.get("memory")
    if mem:
        lines.append(
            f"- peak memory of one target optimisation of {mem['fast']['requests']} requests "
            f"({mem['fast']['templates']} templates, chunk_tokens "
            f"{mem['fast']['chunk_tokens']}): fast {mem['fast']['peak_memory_mb']:.0f} MiB, "
            f"full {mem['full']['peak_memory_mb']:.0f} MiB (model and data loaded: "
            f"{mem['fast']['peak_before_mb']:.0f} MiB)")
    lines.append(
        "- final seen/efficacy, generalization, specificity (fast / full / most-probable"
        + (" / baseline" if b else "") + "): "
        + ", ".join(" vs ".join(f"{r['final'][m]:.1f}" for r in (k, f, mp, *([b] if b else [])))
                    for m in ("seen/efficacy", "seen/generalization", "seen/specificity")))
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n-edits", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=100)
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
            "perplexity.every=0",  # timed once in the statistics phase
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
        for name, _, extra in PATHS:
            res[name] = child("run", [*common, *extra], str(t / name), t / f"{name}.json")
        k, f = res["kaedit"], res["kaedit_full"]
        res["targets_s_per_edit"] = {label: res[name]["stage_s_per_edit"]["targets"]
                                     for name, label, _ in PATHS}
        res["targets_fast_speedup"] = (f["stage_s_per_edit"]["targets"]
                                       / k["stage_s_per_edit"]["targets"])
        res["end_to_end_s_per_edit"] = k["s_per_edit"]
        res["eval_share"] = k["eval_share"]
        if not args.no_baseline:
            base = [*common, *FULL, "method.batch_targets=false", "eval_batch_size=1"]
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
                for path, extra in (("fast", []), ("full", FULL))
            }
        res["peak_memory_mb"] = max(
            [r["peak_memory_mb"] for name, _, _ in PATHS for r in [res[name]]]
            + [m["peak_memory_mb"] for m in res.get("memory", {}).values()])
        project(res)

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
