"""``python -m kaedit.results.analyze`` on two tiny runs that saved their per-step deltas."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from conftest import Compose, assert_close_to_scale, csv_approx, gamma
from kaedit import experiment
from kaedit.results import analyze, plots


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory: pytest.TempPathFactory, compose: Compose,
             tiny_run_overrides: list[str], tiny_rome_dataset: Path) -> list[Path]:
    """``fusion=add`` and ``fusion=drop_rescale`` (p=0.5), 3 steps each, deltas saved."""
    root = tmp_path_factory.mktemp("runs")
    base = [*tiny_run_overrides, f"dataset.path='{tiny_rome_dataset}'", "schedule.n_edits=6",
            "schedule.batch_size=2", "generation.max_new_tokens=4", "save_step_deltas=true"]
    dirs = []
    for name, fusion in (("add", ["fusion=add"]),
                         ("drop_rescale", ["fusion=drop_rescale", "fusion.p=0.5"])):
        dirs.append(root / name)
        experiment.run(compose([*base, *fusion]), run_dir=str(dirs[-1]))
    return dirs


def test_runner_saves_step_deltas(two_runs: list[Path]) -> None:
    add, dr = two_runs
    names = {p.name for p in (dr / "deltas").iterdir()}
    assert names == {f"step-000{s}{x}.safetensors" for s in (1, 2, 3) for x in ("", "-fused")}
    pre, post = (
        load_file(str(dr / "deltas" / f"step-0001{x}.safetensors")) for x in ("", "-fused")
    )
    assert pre.keys() == post.keys()
    for k in pre:  # drop-and-rescale: survivors scaled by 1/(1-p), the rest dropped
        kept = post[k] != 0
        np.testing.assert_allclose(post[k][kept].numpy(), 2 * pre[k][kept].numpy(), rtol=1e-6)
        assert 0.3 < kept.float().mean() < 0.7
    a_pre, a_post = (load_file(str(add / "deltas" / f"step-0002{x}.safetensors"))
                     for x in ("", "-fused"))
    assert all((a_pre[k] == a_post[k]).all() for k in a_pre)  # add: fused == computed


def test_analyze_writes_figures(two_runs: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "figs"
    assert analyze.main([*map(str, two_runs), "--out", str(out)]) == 0
    for run in ("add", "drop_rescale"):
        assert {p.name for p in (out / run).iterdir()} == {
            "scaling.png", "retention.png", "delta_similarity.png"}
    assert (out / "compare.png").is_file()
    assert all(p.stat().st_size > 1000 for p in out.rglob("*.png"))


def test_analyze_beside_the_run(two_runs: list[Path]) -> None:
    written = analyze.analyze(two_runs[:1])
    assert {p.relative_to(two_runs[0]).as_posix() for p in written} == {
        "figures/scaling.png", "figures/retention.png", "figures/delta_similarity.png",
        "figures/compare.png",
        "figures/first_batch.png"}  # every run logs retention/first_batch
    # fixed_specificity.png only for runs that scored a fixed set (schedule.fixed_sample)


def test_delta_similarity_and_retention_matrices(two_runs: list[Path]) -> None:
    files = analyze.step_delta_files(two_runs[1] / "deltas", fused=False)
    sim = analyze.cosine_matrix(files)
    assert sim.shape == (3, 3)
    # float32 dot products of unit vectors of n entries: each is off by ≤ γₙ·Σ|vᵢwᵢ| ≤ γₙ
    # (Cauchy-Schwarz) in any summation order; the diagonal also carries the float32 norm
    # (≤ γₙ₊₁ of ‖v‖², halved by the square root, squared back) and the division (u per
    # entry): ≤ 2γₙ₊₃ of the scale 1. Off-diagonal cosines sit near 0, where only a
    # bound relative to the scale holds on every BLAS; s and sᵀ: two dot products, 2γₙ.
    n = sum(t.numel() for t in load_file(str(files[0])).values())
    s = torch.from_numpy(sim)
    assert_close_to_scale(s.diagonal(), torch.ones(3), rel=2 * gamma(n + 3), msg="diag")
    assert_close_to_scale(s, s.T, rel=2 * gamma(n), msg="symmetric")

    mat = plots.retention_matrix(pd.read_csv(two_runs[1] / "retention.csv"))
    assert mat.index.tolist() == [1, 2, 3] and mat.columns.tolist() == [1, 2, 3]
    assert np.isnan(mat.loc[2, 1]) and not np.isnan(mat.loc[1, 3])  # made after measured


def test_topk_reevaluates_pruned_step_deltas(two_runs: list[Path], tmp_path: Path) -> None:
    add = two_runs[0]
    assert analyze.main(["topk", str(add), "--k", "0.5,1", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "topk.png").is_file()
    table = pd.read_csv(tmp_path / "topk.csv")
    assert table["k"].tolist() == [0.5, 1.0] and (table["edits"] == 6).all()
    # k=1 with fusion=add rebuilds the run's final weights: the same scores as its last row
    last = pd.read_csv(add / "metrics.csv").iloc[-1]
    # (the same float32 sums of the same step deltas, so the same weights and scores),
    # each printed with %.6g in its own CSV
    for m in ("efficacy", "generalization", "specificity"):
        assert table[m].iloc[1] == csv_approx(last[f"seen/{m}"], roundings=2), m


def test_run_labels() -> None:
    cfg = {"method": {"_target_": "kaedit.methods.memit.MEMIT"},
           "fusion": {"_target_": "kaedit.fusion.DropRescale", "p": 0.8}}
    assert plots.run_label(cfg) == "MEMIT / DropRescale(p=0.8)"
    assert plots.run_label({**cfg, "fusion": {"_target_": "kaedit.fusion.Add"}}) == "MEMIT / Add"


def test_analyze_rejects_a_non_run(tmp_path: Path, capsys) -> None:
    assert analyze.main([str(tmp_path)]) == 2
    assert "no metrics.csv" in capsys.readouterr().err

