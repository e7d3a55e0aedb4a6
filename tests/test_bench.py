"""``make bench`` end to end on the tiny model: its report, and that its baseline agrees."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import assert_close_to_scale

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_reports_stages_and_a_baseline_with_the_same_results(
    tmp_path: Path, cache_dir: Path, tiny_run_overrides: list[str]
) -> None:
    overrides = [o for o in tiny_run_overrides if not o.startswith("schedule.")]
    env = {**os.environ, "KAEDIT_CACHE": str(cache_dir), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench.py"), "--n-edits", "4",
         "--batch-size", "2", "--memory-batch", "3", "--out", str(tmp_path), *overrides,
         "templates.specs=[[5,2]]"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (result,) = tmp_path.glob("*.json")
    res = json.loads(result.read_text())
    assert (tmp_path / f"{result.stem}.md").read_text() in proc.stdout
    k, f, mp, b = (res[n] for n in ("kaedit", "kaedit_full", "kaedit_most_probable",
                                    "baseline"))
    for run in (k, f, mp, b):
        assert run["edits"] == 4 and run["steps"] == 2
        assert set(run["stage_s_per_edit"]) == {"targets", "keys", "solve", "fusion", "eval"}
        assert all(v >= 0 for v in run["stage_s_per_edit"].values())
        assert run["eval_prompts_per_s"] > 0 and run["peak_memory_mb"] > 0
        assert 0 < run["eval_share"] < 1 and run["eval_s_per_request"] > 0
    assert res["end_to_end_speedup"] == pytest.approx(b["wall_s"] / k["wall_s"])
    assert k["eval_prompts"] == b["eval_prompts"]  # the same prompts, scored two ways
    for metric, value in k["final"].items():  # one request's v* at a time: same edits
        if not metric.endswith("_mag"):  # shares of won comparisons: the same outcomes
            assert b["final"][metric] == pytest.approx(value, abs=1e-6), metric
            assert f["final"][metric] == pytest.approx(value, abs=1e-6), metric  # full path
    # The mean probability gaps move with the float32 difference between batched and
    # one-at-a-time v* (Adam amplifies rounding to ~d·ε of the delta, see
    # test_optimize_targets_batched_equals_separate), which the solve and the scored
    # probabilities carry over linearly: 1e-3 of the largest gap (an absolute 1e-6 was
    # tuned to one machine).
    mags = [m for m in k["final"] if m.endswith("_mag")]
    for other, name in ((b, "baseline"), (f, "full path")):
        assert_close_to_scale(torch.tensor([other["final"][m] for m in mags]),
                              torch.tensor([k["final"][m] for m in mags]), rel=1e-3,
                              msg=f"*_mag, {name}")
    # The three target paths timed in the same bench, on the same edits.
    paths = res["targets_s_per_edit"]
    assert paths == {"fast": k["stage_s_per_edit"]["targets"],
                     "full": f["stage_s_per_edit"]["targets"],
                     "most_probable": mp["stage_s_per_edit"]["targets"]}
    assert res["targets_fast_speedup"] == pytest.approx(paths["full"] / paths["fast"])
    assert res["end_to_end_s_per_edit"] == k["s_per_edit"]
    assert res["eval_share"] == k["eval_share"]
    # Projections per path; the headline ones are the configured (fast) path's.
    assert set(res["projected"]) == set(paths)
    assert res["projected_1000_edits_h"] == res["projected"]["fast"]["1000"]["hours"]
    assert res["projected_10000_edits_h"] == res["projected"]["fast"]["10000"]["hours"]
    for pr in res["projected"].values():
        assert pr["1000"]["evaluations"] == 2 and pr["10000"]["evaluations"] == 11
        assert 0 < pr["1000"]["hours"] < pr["10000"]["hours"]
    mem = res["memory"]
    assert (mem["fast"]["fast"], mem["full"]["fast"]) == (True, False)
    for m in mem.values():
        assert m["requests"] == 3 and m["peak_memory_mb"] >= m["peak_before_mb"] > 0
    assert res["peak_memory_mb"] == max([r["peak_memory_mb"] for r in (k, f, mp)]
                                        + [m["peak_memory_mb"] for m in mem.values()])
    st = res["statistics"]
    # computed from the corpus once, then read back by a new store (not a timing race)
    assert st["cold_compute_s"] > 0 and st["warm_compute_s"] == 0
    assert st["perplexity"] > 1 and st["perplexity_s"] > 0


def load_bench():
    spec = importlib.util.spec_from_file_location("bench", REPO / "benchmarks" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_projection_counts_edits_and_evaluations() -> None:
    bench = load_bench()
    # 10,000 edits in batches of 100: evaluations at step 0 and after every 1,000 edits
    # (11), each scoring 2·100 + 200 + 200 requests at 0.5 s plus a 30 s perplexity.
    p = bench.projection(10_000, 100, edit_s_per_edit=2.0, eval_s_per_request=0.5,
                         perplexity_s=30.0)
    assert p["evaluations"] == 11 and p["requests_per_evaluation"] == 600
    assert p["edit_h"] == pytest.approx(20_000 / 3600)
    assert p["eval_h"] == pytest.approx(11 * (600 * 0.5 + 30) / 3600)
    assert p["hours"] == pytest.approx(p["edit_h"] + p["eval_h"])
    assert p["eval_share"] == pytest.approx(p["eval_h"] / p["hours"])
    # A run that is not a multiple of 1,000 edits is evaluated at its last step too.
    assert bench.projection(1500, 100, 1.0, 0.1, 1.0)["evaluations"] == 3
    assert bench.projection(1000, 100, 1.0, 0.1, 1.0)["evaluations"] == 2
