"""``fusion.seed`` (issue 28's seed replicates): the draws of a random fusion (DR's masks,
the matched-noise control) come from ``fusion.seed`` where set, else from the run's
``seed``; the method's deltas, the templates and the tracked sample do not change."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from conftest import Compose
from kaedit import experiment, setup
from kaedit.errors import ConfigError
from kaedit.experiment import step_generator
from kaedit.fusion import DropRescale, MatchedNoise


def test_fusion_seed_is_the_run_seed_unless_set() -> None:
    def cfg(fusion_seed: object, seed: int = 3) -> object:
        return OmegaConf.create({"seed": seed, "fusion": {"p": 0.8, "seed": fusion_seed}})

    assert setup.fusion_seed(cfg(None)) == 3
    assert setup.fusion_seed(cfg(5)) == 5
    assert setup.fusion_seed(cfg(0)) == 0  # 0 is a seed, not "unset"
    assert setup.fusion_seed(OmegaConf.create({"seed": 4, "fusion": {"p": 0.8}})) == 4  # add
    for bad in ("abc", 1.5, True):
        with pytest.raises(ConfigError, match=r"fusion\.seed=.* is not an integer"):
            setup.fusion_seed(cfg(bad))


def test_the_random_fusions_take_a_seed(compose: Compose) -> None:
    for name, cls in (("drop_rescale", DropRescale), ("matched_noise", MatchedNoise)):
        fusion = setup.build_fusion(compose([f"fusion={name}", "fusion.seed=2", "fusion.p=0.5"]))
        assert isinstance(fusion, cls) and (fusion.p, fusion.seed) == (0.5, 2)
        assert setup.build_fusion(compose([f"fusion={name}"])).seed is None
        with pytest.raises(ConfigError, match=r"fusion\.seed=1\.5 is not an integer"):
            setup.build_fusion(compose([f"fusion={name}", "fusion.seed=1.5"]))


def test_a_bad_fusion_seed_fails_before_anything_is_loaded(
        compose: Compose, tiny_run_overrides: list[str], monkeypatch: pytest.MonkeyPatch,
        tmp_path: Path) -> None:
    monkeypatch.setattr(setup, "build_model", lambda *a, **k: pytest.fail("model loaded"))
    run_dir = tmp_path / "run"
    with pytest.raises(ConfigError, match=r"fusion\.seed='x'"):
        experiment.run(compose([*tiny_run_overrides, "fusion=drop_rescale", "fusion.seed=x"]),
                       run_dir=str(run_dir))
    assert not run_dir.exists()


def _steps(run_dir: Path, step: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A run's step ``step``: (the method's deltas, the fused deltas applied)."""
    return (load_file(str(run_dir / "deltas" / f"step-{step:04d}.safetensors")),
            load_file(str(run_dir / "deltas" / f"step-{step:04d}-fused.safetensors")))


def test_fusion_seed_changes_the_masks_and_nothing_else(
        compose: Compose, tiny_run_overrides: list[str], tmp_path: Path) -> None:
    """Step scope, so that step 1's method deltas are the same whatever the masks: the
    fused deltas are DR of them with the generator of (fusion seed, step)."""
    base = [*tiny_run_overrides, "fusion=drop_rescale", "fusion.scope=step", "fusion.p=0.5",
            "schedule.n_edits=4", "schedule.batch_size=2", "save_step_deltas=true"]
    dirs = {}
    for arm, extra in {"run seed": [], "same seed": ["fusion.seed=0"],
                       "other seed": ["fusion.seed=1"]}.items():
        dirs[arm] = tmp_path / arm.replace(" ", "-")
        experiment.run(compose([*base, *extra]), run_dir=str(dirs[arm]))
    for step in (1, 2):  # fusion.seed equal to the run's seed: the same run, bit for bit
        for a, b in zip(_steps(dirs["run seed"], step), _steps(dirs["same seed"], step),
                        strict=True):
            assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    raw0, fused0 = _steps(dirs["run seed"], 1)
    raw1, fused1 = _steps(dirs["other seed"], 1)
    assert all(torch.equal(raw0[n], raw1[n]) for n in raw0)  # the method's deltas: same
    assert all(not torch.equal(fused0[n], fused1[n]) for n in fused0)  # the masks: not
    for seed, fused in ((0, fused0), (1, fused1)):
        want = DropRescale(p=0.5)(raw0, step_generator(seed, 1))
        assert all(torch.equal(fused[n], want[n]) for n in want), seed
    # the evaluation does not depend on the fusion seed: the same edits are tracked
    r0, r1 = (pd.read_csv(dirs[a] / experiment.RETENTION) for a in ("run seed", "other seed"))
    assert len(r0) > 0 and r0[["step", "case_id"]].equals(r1[["step", "case_id"]])


def test_the_editor_draws_from_the_fusion_seed(
        compose: Compose, tiny_run_overrides: list[str], tmp_path: Path) -> None:
    from kaedit import Editor

    overrides = [*tiny_run_overrides, "fusion=drop_rescale", "fusion.seed=5",
                 "schedule.n_edits=2", "schedule.batch_size=2"]
    run_dir = tmp_path / "run"
    experiment.run(compose([*overrides, "save_deltas=true"]), run_dir=str(run_dir))
    cfg = compose(overrides)
    ed = Editor(cfg)
    assert ed.session.fusion_seed == 5 and ed.seed == 0
    assert ed.edit(setup.build_records(cfg)[:2])["applied"]
    want = load_file(str(run_dir / "deltas.safetensors"))
    assert all(torch.equal(ed._weights.total[n], d) for n, d in want.items())
