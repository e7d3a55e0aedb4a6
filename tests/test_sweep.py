"""Every ``-m`` sweep ends with a table (issue 18): job folders named by their overrides,
``results.csv`` with a row per job and ``compare.png`` in the sweep directory, both logged
to W&B in the sweep's group (:mod:`kaedit.results.sweep`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from omegaconf import OmegaConf

from conftest import csv_approx
from kaedit import jobdirs
from kaedit.results import sweep
from wandb_file import history_rows, of_type, wandb_records


def test_job_dir_names_are_safe_short_and_unique() -> None:
    assert jobdirs.job_dir_name(3, "fusion.p=0.8,schedule.batch_size=10") == (
        "3_fusion.p=0.8,schedule.batch_size=10")
    assert jobdirs.job_dir_name(0, "") == "0"
    odd = jobdirs.job_dir_name(1, "model.path=/x/y z,prompt='a b'")
    assert "/" not in odd and " " not in odd and "'" not in odd
    long_a, long_b = (jobdirs.job_dir_name(2, f"method.lr={'9' * 300}{c}") for c in "ab")
    assert len(long_a) <= jobdirs.MAX_NAME + 2 and long_a != long_b


def test_sweep_config_keeps_the_job_name_rule(compose) -> None:
    cfg = compose([])  # the resolver is registered by compose, as by python -m kaedit.run
    from kaedit.setup import compose as compose_hydra

    hc = compose_hydra(["fusion.p=0.5", f"cache_dir={cfg.cache_dir}"], hydra_config=True).hydra
    assert OmegaConf.to_container(hc.sweep)["subdir"] == (
        "${kaedit.job_dir:${hydra.job.num},${hydra.job.override_dirname}}"
    )
    assert "dataset.path" in hc.job.config.override_dirname.exclude_keys
    assert hc.callbacks.sweep_results._target_ == "kaedit.results.sweep.SweepResults"


def fake_job(sweep_dir: Path, name: str, overrides: list[str], checkpoint: bool) -> Path:
    job = sweep_dir / name
    (job / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create(overrides), job / ".hydra" / "overrides.yaml")
    if checkpoint:
        from kaedit.checkpoint import CKPT_DIR, POINTER

        (job / CKPT_DIR).mkdir()
        (job / CKPT_DIR / POINTER).write_text("{}\n")  # the status only looks for it
    return job


def test_unfinished_and_failed_jobs_get_their_status(tmp_path: Path) -> None:
    fake_job(tmp_path, "1_fusion.p=0.5", ["fusion.p=0.5"], checkpoint=True)
    fake_job(tmp_path, "0_fusion.p=0.0", ["fusion.p=0.0"], checkpoint=False)
    table = sweep.results_table(tmp_path)
    assert table["job"].tolist() == ["0_fusion.p=0.0", "1_fusion.p=0.5"]
    assert table["status"].tolist() == ["failed", "unfinished"]
    assert table["fusion.p"].tolist() == ["0.0", "0.5"]
    assert sweep.main([str(tmp_path / "nothing")]) == 2


@pytest.mark.slow  # two tiny jobs in one subprocess and three offline W&B runs: ~40 s
def test_two_job_sweep_leaves_results_and_figure_logged_in_its_group(
    tiny_run_overrides: list[str], tmp_path: Path
) -> None:
    sweep_dir = tmp_path / "sweep"
    overrides = [o for o in tiny_run_overrides if not o.startswith("logger=")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_SILENT": "true",
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           **{v: str(tmp_path / "wandb-home" / v.lower()) for v in
              ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR")}}
    proc = subprocess.run(
        [sys.executable, "-m", "kaedit.run", "-m", *overrides, "logger=wandb",
         "schedule.n_edits=2", "schedule.batch_size=2", "schedule.generation_every=0",
         "fusion.p=0.0,0.8", f"cache_dir={tmp_path / 'cache'}", f"hydra.sweep.dir={sweep_dir}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    # job folders named by their overrides (paths left out), in job order
    jobs = sweep.job_dirs(sweep_dir)
    assert [j.name for j in jobs] == [
        f"{n}_fusion.p={p},model=tiny_llama,schedule.batch_size=2,"
        "schedule.generation_every=0,schedule.n_edits=2,stats.n_tokens=2000"
        for n, p in ((0, "0.0"), (1, "0.8"))]
    # every job logs a progress line per step
    assert proc.stdout.count("step 1/1 | edits 2 | seen: efficacy") == 2  # Hydra: stdout

    table = pd.read_csv(sweep_dir / "results.csv")
    assert len(table) == 2
    assert table["fusion.p"].tolist() == [0.0, 0.8]
    assert table["status"].tolist() == ["done", "done"]
    for job, row in zip(jobs, table.to_dict("records"), strict=True):
        summary = json.loads((job / "summary.json").read_text())
        for key in ("seen/efficacy", "seen/specificity", "seen/score",
                    "retention/first_batch", "wall_s"):
            assert row[key] == csv_approx(summary[key]), key  # %.6g in the csv
        assert f"fusion.p={row['fusion.p']}" in row["overrides"].split()
        metrics = pd.read_csv(job / "metrics.csv")  # one edited step: its batch/efficacy
        # computed from metrics.csv's 6-digit values, printed again with %.6g: the same
        # digits for the one edited step; batch_minus_seen_efficacy is a difference of two
        # such values, printed with %.6g once more
        assert row["immediate_efficacy"] == pytest.approx(metrics["batch/efficacy"].iloc[1])
        assert row["batch_minus_seen_efficacy"] == csv_approx(
            row["immediate_efficacy"] - row["seen/efficacy"])
    assert "cache_dir" not in table and "dataset.path" not in table  # in `overrides` only
    assert (sweep_dir / "compare.png").stat().st_size > 0

    # the sweep's own W&B run, in the jobs' group, holds the table and the figure
    (results_run,) = sweep_dir.glob("wandb/offline-run-*/run-*.wandb")
    records = wandb_records(results_run)
    (run,) = of_type(records, "run")
    job_groups = {of_type(wandb_records(f), "run")[0].run_group
                  for j in jobs for f in j.glob("wandb/offline-run-*/run-*.wandb")}
    assert job_groups == {run.run_group} == {str(sweep_dir)}
    assert run.display_name == "sweep-results"
    files = {e.path: e for a in of_type(records, "artifact") for e in a.manifest.contents}
    assert files["results.csv"].size == (sweep_dir / "results.csv").stat().st_size
    assert any("sweep/compare/path" in row for row in history_rows(records))  # the image


# ------------------------------------------------------------------ Optuna: p and λ
def test_optuna_sweeper_config_searches_p_and_lambda(compose) -> None:
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra_plugins.hydra_optuna_sweeper._impl import (
        create_optuna_distribution_from_override,
    )

    from kaedit.setup import compose as compose_hydra

    cache = compose([]).cache_dir
    cfg = compose_hydra([f"cache_dir={cache}", "hydra/sweeper=ka_optuna", "method=adaple"],
                        hydra_config=True)
    sweeper = OmegaConf.to_container(cfg.hydra.sweeper, resolve=True)
    assert sweeper["_target_"].endswith("OptunaSweeper")
    assert sweeper["direction"] == "maximize" and cfg.optimized_metric == "seen/score"
    assert sweeper["sampler"]["seed"] == cfg.seed
    parsed = OverridesParser.create().parse_overrides(
        [f"{k}={v}" for k, v in sweeper["params"].items()])
    dists = {o.get_key_element(): create_optuna_distribution_from_override(o)
             for o in parsed}
    assert (dists["fusion.p"].low, dists["fusion.p"].high) == (0.0, 0.95)
    lam = dists["method.lam"]
    assert (lam.low, lam.high, type(lam).__name__) == (100.0, 1e5, "LogUniformDistribution")
    for key in dists:  # both exist in the job config the sweeper overrides
        assert OmegaConf.select(cfg, key) is not None, key


@pytest.mark.slow  # two tiny trials in a subprocess: ~30 s
def test_optuna_sweep_runs_trials_and_ends_with_the_table(
    tiny_run_overrides: list[str], tmp_path: Path
) -> None:
    sweep_dir = tmp_path / "optuna"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "kaedit.run", "-m", "hydra/sweeper=ka_optuna",
         "hydra.sweeper.n_trials=2", *tiny_run_overrides, "schedule.n_edits=2",
         "schedule.batch_size=2", "schedule.generation_every=0",
         f"cache_dir={tmp_path / 'cache'}", f"hydra.sweep.dir={sweep_dir}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    best = OmegaConf.load(sweep_dir / "optimization_results.yaml")  # the sweeper's own
    table = pd.read_csv(sweep_dir / "results.csv")
    assert len(table) == 2 and set(table["status"]) == {"done"}
    assert 0.0 <= table["fusion.p"].min() <= table["fusion.p"].max() <= 0.95
    assert 100.0 <= table["method.lam"].min() <= table["method.lam"].max() <= 1e5
    assert best.best_value == csv_approx(table["seen/score"].max())  # %.6g in results.csv
