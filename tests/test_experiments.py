"""Experiments (issue 5): every experiment config composes at both scales, sweeps expand,
launchers compose, stateful fusions resume bit-identically, a submitit multirun gives one
run directory and one W&B run per job in one W&B group, and ``main`` returns the metric."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf, open_dict
from safetensors.torch import load_file

from conftest import REPO, U32, Compose, csv_approx, csv_rel, memit_crashes_at_call
from kaedit import experiment
from kaedit.experiment import compose as compose_config
from kaedit.methods.targets import TargetConfig
from kaedit.results.sweep import job_dirs
from kaedit.schedule import Schedule
from test_config import bind, targets
from wandb_file import of_type, wandb_records

EXPERIMENTS_DIR = REPO / "experiments"
EXPERIMENTS = sorted(f.stem for f in (EXPERIMENTS_DIR / "experiment").glob("*.yaml"))
VARIANTS = sorted(f.stem for f in (EXPERIMENTS_DIR / "variant").glob("*.yaml"))
SCALES = ("paper", "cpu")
PAPER_MODELS = {"llama2", "gptj", "neox20b"}
#: Experiments whose CPU variant is a long study (hours), not a minutes-long check: the
#: most edits each makes.
LONG_CPU = {"ka_study": 1000, "ka_study_10k": 10000}
#: Environment for subprocess runs: one thread each (the machine has 2 shared cores).
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1",
       "MKL_NUM_THREADS": "1"}


def check_binds(cfg) -> dict:
    """Every ``_target_`` binds its signature; schedule and target settings bind too."""
    resolved = OmegaConf.to_container(cfg, resolve=True)
    for path, node in targets(resolved):
        bind(path, node)
    inspect_schedule = Schedule(**resolved["schedule"])  # a typo in schedule keys fails
    TargetConfig(**resolved["model"]["edit"]["target"])
    assert inspect_schedule.n_edits >= 1
    return resolved


def sweep_points(params: dict) -> list[list[str]]:
    """The overrides of every job that ``hydra.sweeper.params`` (basic sweeper) expands to."""
    parsed = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()])
    axes = [[f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()]
            if o.is_sweep_override() else [f"{o.get_key_element()}={o.get_value_element_as_str()}"]
            for o in parsed]
    return [list(point) for point in itertools.product(*axes)]


def compose_with_hydra(compose: Compose, overrides: list[str]):
    cache = compose([]).cache_dir
    return compose_config([f"cache_dir={cache}", *overrides], hydra_config=True)


# ------------------------------------------------------------------------- composition
def test_every_experiment_has_a_cpu_variant() -> None:
    assert len(EXPERIMENTS) >= 8
    for name in EXPERIMENTS:
        text = (EXPERIMENTS_DIR / "experiment" / f"{name}.yaml").read_text()
        assert text.startswith("# @package _global_"), name
        assert f"/scale/{name}@_here_: ${{scale}}" in text, name
        assert (EXPERIMENTS_DIR / "scale" / name / "cpu.yaml").is_file(), name


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes_and_every_sweep_point_binds(
    compose: Compose, name: str, scale: str
) -> None:
    cfg = compose_with_hydra(compose, [f"experiment={name}", f"scale={scale}"])
    params = OmegaConf.to_container(cfg.hydra.sweeper.params) or {}
    points = sweep_points(params)
    assert points, f"{name} defines no sweep"
    for point in points:
        job = compose([f"experiment={name}", f"scale={scale}", *point])
        resolved = check_binds(job)
        if scale == "cpu":
            assert job.model.name == "smollm2", (name, point)
            assert job.schedule.n_edits <= LONG_CPU.get(name, 50), (name, point)
            assert job.dataset.path is None
            assert job.stats.corpus[0].endswith("wikitext-2-raw_wiki.valid.raw")
        else:
            assert job.model.name in PAPER_MODELS, (name, point)
            assert job.stats.layers_per_pass == 1
        assert resolved["fusion"]["_target_"].startswith("kaedit.fusion.")


def test_cpu_drop_rate_sweep_and_fusion_comparison_share_their_settings(
    compose: Compose,
) -> None:
    # make reproduce-cpu reuses p = 0 as fusion=add and p = 0.8 as fusion=drop_rescale
    a = OmegaConf.to_container(compose(["experiment=drop_rate_sweep", "scale=cpu"]),
                               resolve=True)
    b = OmegaConf.to_container(compose(["experiment=fusion_strategies", "scale=cpu"]),
                               resolve=True)
    a.pop("fusion"), b.pop("fusion")
    assert a == b


@pytest.mark.parametrize("variant", VARIANTS)
def test_variant_composes_inside_an_experiment(compose: Compose, variant: str) -> None:
    cfg = compose(["experiment=counterfact_methods", f"variant={variant}", "scale=cpu"])
    check_binds(cfg)
    text = (EXPERIMENTS_DIR / "variant" / f"{variant}.yaml").read_text()
    method = text.split("override /method: ")[1].split()[0]
    assert cfg.method._target_.lower().endswith(method.replace("_", ""))


def test_command_line_overrides_beat_experiment_and_scale(compose: Compose) -> None:
    cfg = compose(["experiment=drop_rate_sweep", "scale=cpu", "model=tiny_llama",
                   "schedule.n_edits=7", "fusion.p=0.3"])
    assert cfg.model.name == "tiny_llama" and cfg.schedule.n_edits == 7 and cfg.fusion.p == 0.3
    plain = compose([])  # no experiment: scale=paper changes nothing
    assert plain.model.name == "smollm2" and plain.schedule.n_edits == 100


@pytest.mark.parametrize(("cwd", "scale"), [("repo", "paper"), ("elsewhere", "cpu")])
def test_cli_prints_every_experiment_config_from_any_directory(
    tmp_path: Path, cwd: str, scale: str
) -> None:
    # `python -m kaedit.run --cfg job experiment=X scale=S` from the repository and from an
    # unrelated directory: the experiments folder is found, nothing is loaded or written.
    for name in EXPERIMENTS:
        proc = subprocess.run(
            [sys.executable, "-m", "kaedit.run", "--cfg", "job", f"experiment={name}",
             f"scale={scale}"], cwd=REPO if cwd == "repo" else tmp_path, env=ENV,
            capture_output=True, text=True, timeout=120, check=False)
        assert proc.returncode == 0, (name, proc.stderr)
        model = OmegaConf.create(proc.stdout).model.name
        assert (model == "smollm2") if scale == "cpu" else (model in PAPER_MODELS), name
    if cwd == "elsewhere":
        assert list(tmp_path.iterdir()) == []


def test_unknown_experiment_lists_the_options(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "kaedit.run", "--cfg", "job",
                           "experiment=drop_rate"], cwd=tmp_path, env=ENV,
                          capture_output=True, text=True, timeout=120, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "experiment/drop_rate" in out and "drop_rate_sweep" in out


def test_launchers_compose_with_cluster_resources(compose: Compose) -> None:
    cfg = compose_with_hydra(compose, ["hydra/launcher=slurm", "cluster.partition=gpu",
                                       "cluster.gpus=2", "cluster.time_min=90"])
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert launcher["_target_"].endswith("SlurmLauncher")
    assert (launcher["partition"], launcher["gpus_per_node"], launcher["timeout_min"]) == (
        "gpu", 2, 90)
    local = compose_with_hydra(compose, ["hydra/launcher=slurm_local", "experiment=scaling",
                                         "scale=cpu"])
    assert OmegaConf.to_container(local.hydra.launcher, resolve=True)["gpus_per_node"] == 0
    joblib = compose_with_hydra(compose, ["hydra/launcher=joblib"])
    assert joblib.hydra.launcher._target_.endswith("JoblibLauncher")


# -------------------------------------------------------- stateful fusion: resume exactly
def metric_columns(df: pd.DataFrame) -> pd.DataFrame:
    return df[[c for c in df.columns if not c.startswith("time/")]]


@pytest.mark.parametrize("fusion", [["fusion=lookahead", "fusion.k=2"], ["fusion=average"],
                                    ["fusion=wise_ft", "fusion.alpha=0.3"]],
                         ids=lambda f: f[0])
def test_stateful_fusion_resumes_bit_identically(
    compose: Compose, tiny_run_overrides: list[str], tmp_path: Path, fusion: list[str],
) -> None:
    overrides = [*tiny_run_overrides, "schedule.n_edits=5", "schedule.batch_size=1",
                 "save_deltas=true", *fusion]
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    ref = experiment.run(compose(overrides), run_dir=str(ref_dir))

    # The same run crashes while computing step 4 (Lookahead k=2: mid-cycle, after the
    # checkpoint of step 3), then resumes from its checkpoint.
    with memit_crashes_at_call(4), pytest.raises(RuntimeError, match="simulated crash"):
        experiment.run(compose(overrides), run_dir=str(run_dir))
    saved = load_file(str(next((run_dir / "checkpoint").glob("step-*")) / "fusion.safetensors"))
    assert saved and any(t.abs().sum() > 0 for t in saved.values())  # real state was saved
    resumed = experiment.run(compose([*overrides, f"resume={run_dir}"]))

    assert resumed["steps"] == ref["steps"] == 5
    got = metric_columns(pd.read_csv(run_dir / "metrics.csv"))
    pd.testing.assert_frame_equal(got, metric_columns(pd.read_csv(ref_dir / "metrics.csv")))
    a, b = (load_file(str(d / "deltas.safetensors")) for d in (ref_dir, run_dir))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_layer_scoped_fusion_saves_its_deltas_and_resumes_bit_identically(
    compose: Compose, tiny_run_overrides: list[str], tmp_path: Path,
) -> None:
    # fusion.scope=layer with MEMIT: the per-step files are each layer's undropped Δ (solved
    # with the earlier layers' fused updates in place) and the Δ̂ applied, the second the
    # first fused with the per-(seed, step, weight) generators; a run crashed at step 3
    # resumes to the same metrics and deltas.
    from kaedit.fusion import DropRescale

    overrides = [*tiny_run_overrides, "schedule.n_edits=4", "schedule.batch_size=1",
                 "save_deltas=true", "save_step_deltas=true", "fusion.p=0.5",
                 "fusion.scope=layer", "seed=3"]
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    experiment.run(compose(overrides), run_dir=str(ref_dir))
    lf = DropRescale(0.5, scope="layer").layer_fusion(seed=3, step=2)
    raw = load_file(str(ref_dir / "deltas" / "step-0002.safetensors"))
    fused = load_file(str(ref_dir / "deltas" / "step-0002-fused.safetensors"))
    assert raw.keys() == fused.keys() and len(raw) == 2
    assert all(torch.equal(fused[n], lf.fuse(n, raw[n])) for n in raw)
    assert all(not torch.equal(fused[n], raw[n]) for n in raw)
    check_update_sizes(ref_dir, steps=4)

    with memit_crashes_at_call(3), pytest.raises(RuntimeError, match="simulated crash"):
        experiment.run(compose(overrides), run_dir=str(run_dir))
    experiment.run(compose([*overrides, f"resume={run_dir}"]))
    got = metric_columns(pd.read_csv(run_dir / "metrics.csv"))
    pd.testing.assert_frame_equal(got, metric_columns(pd.read_csv(ref_dir / "metrics.csv")))
    a, b = (load_file(str(d / "deltas.safetensors")) for d in (ref_dir, run_dir))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def check_update_sizes(run_dir: Path, steps: int) -> None:
    """The logged ``update/*`` columns (kaedit.experiment.update_sizes) against the saved
    per-step deltas of a drop-and-rescale p = 0.5 run: DR at p = 0.5 turns each entry
    into 0 or 2Δ, so what it changes, ±Δ, has exactly the norm of Δ."""

    def norm(tensors) -> float:
        return float(torch.linalg.vector_norm(torch.cat([t.double().flatten() for t in tensors])))

    metrics = pd.read_csv(run_dir / "metrics.csv").set_index("step")  # 6 significant digits
    total: dict[str, torch.Tensor] = {}
    accumulated = 0.0  # bound on ‖float32 running total − float64 sum‖ (the runner's sum)
    for step in range(1, steps + 1):
        raw, fused = (load_file(str(run_dir / "deltas" / f"step-{step:04d}{s}.safetensors"))
                      for s in ("", "-fused"))
        for n, d in fused.items():
            total[n] = total.get(n, 0) + d.double()
        if step > 1:  # EditedWeights.add: total += fused in float32, ≤ u·|total| per entry
            accumulated += U32 * norm(total.values())
        row = metrics.loc[step]
        # the saved tensors are the ones the runner measured (its norms are float64 sums
        # too): only metrics.csv's 6 digits apart. DR at p = 0.5 doubles or zeroes each
        # entry, both exact in float32, so fused − raw = ±raw exactly.
        assert row["update/computed_norm"] == csv_approx(norm(raw.values()))
        assert row["update/applied_norm"] == csv_approx(norm(fused.values()))
        assert row["update/fusion_change_norm"] == csv_approx(norm(raw.values()))
        want = norm(total.values())
        assert row["update/total_norm"] == csv_approx(want, extra_rel=accumulated / want)
    # ‖W_t − W₀‖ / ‖W₀‖: the same ‖W₀‖ (the same edited weights) at every step. Each ratio
    # of two 6-digit numbers is off by ≤ 2·csv_rel(), so two of them differ by ≤ 4·csv_rel()
    # (the 1e-4 covers the second-order terms).
    w0 = (metrics["update/total_norm"] / metrics["update/total_rel"]).dropna()
    assert len(w0) == steps and w0.iloc[0] > 0
    assert (w0 - w0.iloc[0]).abs().max() <= 4 * csv_rel() * (1 + 1e-4) * w0.iloc[0]


def test_served_weights_are_evaluated_and_saved(
    compose: Compose, tiny_run_overrides: list[str], tmp_path: Path
) -> None:
    # WiSE-FT with α = 0 serves the unedited model: every edit scores at every step what it
    # scored at step 0 (the unedited model), and the saved deltas are zero, although the
    # method edited the working weights.
    summary = experiment.run(compose([*tiny_run_overrides, "fusion=wise_ft", "fusion.alpha=0",
                                      "save_deltas=true"]), run_dir=str(tmp_path))
    retention = pd.read_csv(tmp_path / "retention.csv")
    assert retention["step"].max() == 2
    unedited = retention[retention["step"] == 0].set_index("case_id")
    for col in ("efficacy", "generalization", "specificity_mag"):
        later = retention[retention["step"] > 0]
        assert (later[col].to_numpy() == unedited.loc[later["case_id"], col].to_numpy()).all()
    deltas = load_file(str(tmp_path / "deltas.safetensors"))
    assert deltas and all(torch.equal(d, torch.zeros_like(d)) for d in deltas.values())
    assert summary["steps_failed"] == 0


# ------------------------------------------------------------- statistics one layer a pass
def test_covariance_layers_per_pass_gives_the_same_statistics(
    compose: Compose, tiny_corpus: Path, tmp_path: Path
) -> None:
    from conftest import load_tiny
    from kaedit.stats import CovarianceStore

    lm = load_tiny(compose, "tiny_llama")
    common = {"corpus": [str(tiny_corpus)], "n_tokens": 2000, "seq_len": 64}
    together = CovarianceStore(cache_dir=str(tmp_path / "a"), **common).get(lm, [0, 1, 2])
    one_by_one = CovarianceStore(cache_dir=str(tmp_path / "b"), layers_per_pass=1,
                                 **common).get(lm, [0, 1, 2])
    assert len(list((tmp_path / "b").glob("*.safetensors"))) == 3
    for layer in (0, 1, 2):
        assert torch.equal(together[layer], one_by_one[layer]), layer
    with pytest.raises(ValueError, match="layers_per_pass=0"):
        CovarianceStore(cache_dir=str(tmp_path), layers_per_pass=0, **common)


# ------------------------------------------------------ tracking and the sweeper's metric
def test_tracking_info_names_method_fusion_and_parameters() -> None:
    from kaedit.run import sweep_group, tracking_info

    info = tracking_info({"method": "adaple", "fusion": "lookahead", "experiment": None,
                          "scale": "cpu", "model": "smollm2"},
                         {"_target_": "kaedit.fusion.Lookahead", "k": 5, "alpha": 0.5})
    assert info["tags"] == ["method=adaple", "fusion=lookahead", "fusion.k=5",
                            "fusion.alpha=0.5", "scale=cpu", "model=smollm2"]
    assert info["name"] == "adaple/lookahead(k=5,alpha=0.5)"
    assert info["choices"] == {"method": "adaple", "fusion": "lookahead", "scale": "cpu",
                               "model": "smollm2"}  # the dashboard's grouping keys
    # an unset parameter (fusion.seed: null) is not named; a set one is
    dr = {"_target_": "kaedit.fusion.DropRescale", "p": 0.8, "scope": "layer", "seed": None}
    assert tracking_info({"method": "memit", "fusion": "drop_rescale"}, dr)["name"] == (
        "memit/drop_rescale(p=0.8,scope=layer)")
    assert "fusion.seed=2" in tracking_info({"fusion": "drop_rescale"}, {**dr, "seed": 2})["tags"]
    assert sweep_group("outputs/multirun/2026-11-25/10-00-00/") == (
        "outputs/multirun/2026-11-25/10-00-00")
    long = sweep_group("/x" * 100)
    assert len(long) <= 128 and long != sweep_group("/y" * 100)


def test_main_returns_the_optimized_metric(
    compose: Compose, tiny_run_overrides: list[str], tmp_path: Path
) -> None:
    from kaedit.run import main

    cfg = compose_with_hydra(compose, [*tiny_run_overrides, "optimized_metric=seen/efficacy"])
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(tmp_path)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]  # as Hydra hands the config to the task function
    try:
        value = main(cfg)  # Hydra's passthrough call: the task function itself
    finally:
        HydraConfig.instance().cfg = None
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert value == pytest.approx(summary["seen/efficacy"])
    assert cfg.tracking.group is None  # a single run has no sweep group
    assert "fusion=drop_rescale" in cfg.tracking.tags and cfg.tracking.name


# ------------------------------------------------------- submitit multirun, W&B grouping
def wandb_run_records(path: Path) -> list:
    """The ``run`` records of an offline W&B file."""
    return of_type(wandb_records(path), "run")


@pytest.mark.slow  # two subprocess jobs: ~30 s on an idle 2-core machine
def test_submitit_local_multirun_groups_jobs_in_wandb(
    tiny_run_overrides: list[str], tmp_path: Path
) -> None:
    sweep = tmp_path / "sweep"
    overrides = [o for o in tiny_run_overrides if not o.startswith("logger=")]
    proc = subprocess.run(
        [sys.executable, "-m", "kaedit.run", "-m", "hydra/launcher=slurm_local",
         *overrides, "logger=wandb", "schedule.n_edits=2", "schedule.batch_size=2",
         "schedule.generation_every=0", "fusion.p=0.0,0.5", "cluster.gpus=0",
         f"cache_dir={tmp_path / 'cache'}", f"hydra.sweep.dir={sweep}"],
        cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    runs = {}
    jobs = {d.name.split("_", 1)[0]: d for d in job_dirs(sweep)}  # NUM_OVERRIDES
    assert sorted(jobs) == ["0", "1"] and "fusion.p=0.5" in jobs["1"].name
    for job, run_dir in jobs.items():
        assert (run_dir / "summary.json").is_file(), job
        (wandb_file,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
        (record,) = wandb_run_records(wandb_file)
        runs[job] = record
    assert runs["0"].run_id != runs["1"].run_id
    assert runs["0"].run_group == runs["1"].run_group == str(sweep)
    assert "fusion.p=0.0" in runs["0"].tags and "fusion.p=0.5" in runs["1"].tags
    assert all("method=memit" in r.tags and "fusion=drop_rescale" in r.tags
               for r in runs.values())
    assert (sweep / ".submitit").is_dir()  # the jobs went through submitit


# ------------------------------------------------------------------ make reproduce-cpu
def fake_run(run_dir: Path, p: float, final_eff: float, fusion: dict | None = None) -> None:
    """A finished run's files, as the runner writes them (2 steps of 2 edits)."""
    run_dir.mkdir(parents=True)
    pd.DataFrame({
        "step": [0, 1, 2], "edits_done": [0, 2, 4],
        "batch/efficacy": [0.0, 100.0, 50.0], "seen/efficacy": [25.0, 100.0, final_eff],
        "seen/generalization": [0.0, 50.0, 40.0], "seen/specificity": [90.0, 80.0, 70.0],
        "seen/score": [0.0, 66.0, 50.0],
    }).to_csv(run_dir / "metrics.csv", index=False)
    pd.DataFrame({"step": [2, 2, 2, 2], "case_id": ["a", "b", "c", "d"],
                  "step_made": [1, 1, 2, 2], "efficacy": [1.0, 0.0, 1.0, 1.0]}).to_csv(
        run_dir / "retention.csv", index=False)
    OmegaConf.save(OmegaConf.create({
        "model": {"name": "smollm2"}, "method": {"_target_": "kaedit.methods.adaple.AdaPLE"},
        "fusion": fusion or {"_target_": "kaedit.fusion.DropRescale", "p": p},
        "dataset": {"name": "counterfact"}, "seed": 0,
        "schedule": {"n_edits": 4, "batch_size": 2}}), run_dir / "config.yaml")
    # as the runner ends: summary (the last row, first-batch retention), resume.json done;
    # as reproduce.execute starts: the run's overrides where a Hydra job keeps them
    (run_dir / "summary.json").write_text(json.dumps({
        "seen/efficacy": final_eff, "seen/generalization": 40.0, "seen/specificity": 70.0,
        "seen/score": 50.0, "retention/first_batch": 50.0, "edits_done": 4, "steps": 2}))
    (run_dir / "resume.json").write_text(json.dumps({"fingerprint": "x", "done": True}))
    (run_dir / ".hydra").mkdir()
    (run_dir / ".hydra" / "overrides.yaml").write_text(f"- fusion.p={p}\n")


def test_reproduce_results_table_and_figures(tmp_path: Path) -> None:
    from kaedit.results import reproduce

    for name, p, eff in [("dr-p0.0", 0.0, 60.0), ("dr-p0.8", 0.8, 80.0)]:
        fake_run(tmp_path / "runs" / name, p, eff)
    fake_run(tmp_path / "runs" / "fusion-average", 0.0, 30.0,
             {"_target_": "kaedit.fusion.RunningAverage"})
    plan = [r for r in reproduce.PLAN if r.name in ("dr-p0.0", "dr-p0.8", "fusion-average")]
    path = reproduce.write_results(tmp_path, plan, {"dr-p0.0": 120.0}, "cmd", 300.0)
    text = path.read_text()
    # immediate efficacy = mean(100, 50) = 75; KA drop = 75 − final; step-1 edits: 1/2
    assert "| p = 0.0 | 60.0 | 40.0 | 70.0 | 50.0 | 75.0 | 15.0 | 50.0 |" in text
    assert "| p = 0.8 | 80.0 | 40.0 | 70.0 | 50.0 | 75.0 | -5.0 | 50.0 |" in text
    assert "| vanilla addition (= DR p=0) | 60.0 |" in text
    assert "| vanilla averaging | 30.0 |" in text and "| DR p=0.8 (AdaPLE) | 80.0 |" in text
    assert "Unedited model: efficacy 25.0" in text and "one edit = 25.0 points" in text
    assert "Not run (yet)" not in text and "Wall time: 5.0 min" in text
    for figure in ("drop_rate.png", "drop_rate_curves.png", "fusion_curves.png",
                   "dr-p0.0/retention.png"):
        assert (tmp_path / "figures" / figure).is_file(), figure
    table = pd.read_csv(tmp_path / "results.csv")
    assert table.set_index("run").loc["dr-p0.8", "batch_minus_seen_efficacy"] == -5.0


def test_reproduce_rejects_unknown_runs_and_checks_shared_settings(
    capsys: pytest.CaptureFixture,
) -> None:
    from kaedit.results import reproduce

    assert reproduce.main(["--runs", "dr-p0.3"]) == 2
    assert "dr-p0.3" in capsys.readouterr().err
    reproduce.check_shared(["schedule.n_edits=4"])  # the shared runs really are the same


def test_reproduce_keeps_finished_runs(tmp_path: Path, tiny_run_overrides: list[str]) -> None:
    # A second invocation finds the run done (same config, relative data_root included)
    # and does not run it again.
    from kaedit.results import reproduce

    extra = [*tiny_run_overrides, "schedule.n_edits=2", "schedule.batch_size=1",
             "templates.specs=[[3,1]]", "generation.max_new_tokens=2"]
    run = reproduce.PLAN[0]
    assert reproduce.execute(run, tmp_path, extra) > 0
    assert json.loads((tmp_path / "runs" / run.name / "resume.json").read_text())["done"]
    assert reproduce.execute(run, tmp_path, extra) == 0.0
