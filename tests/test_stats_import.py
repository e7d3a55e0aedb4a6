"""Importing ROME/MEMIT/EasyEdit second-moment files (``*_mom2_*.npz``) into the cache."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import Compose, load_tiny
from kaedit import experiment
from kaedit.errors import ConfigError
from kaedit.stats import CovarianceStore


def write_rome_mom2(folder: Path, module: str, d_in: int, n: int, seed: int) -> np.ndarray:
    """A file as ROME's ``layer_stats`` writes it: ``numpy.savez`` of a
    ``CombinedStat(mom2=SecondMoment())`` state dict plus tally's arguments
    (kmeng01/rome util/runningstats.py), at ROME's path and name. Returns Σ k kᵀ."""
    keys = np.random.default_rng(seed).standard_normal((n, d_in)).astype(np.float32)
    total = keys.T @ keys  # [d_in, d_in], summed (not averaged), float32 as ROME's default
    path = folder / "tiny" / "wikipedia_stats" / f"{module}_float32_mom2_{n}.npz"
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **{"mom2.constructor": np.array("util.runningstats.SecondMoment()"),
                      "mom2.count": np.array(n), "mom2.mom2": total,
                      "sample_size": np.array(n), "batch_size": np.array(100)})
    return total


def test_imported_second_moment_is_the_sum_over_the_count(compose: Compose,
                                                           tmp_path: Path) -> None:
    lm = load_tiny(compose, "tiny_llama")
    module = lm.spec.module("mlp_out", 1)  # model.layers.1.mlp.down_proj: 64-dim keys
    total = write_rome_mom2(tmp_path / "stats", module, 64, 500, seed=0)
    write_rome_mom2(tmp_path / "stats", lm.spec.module("mlp_out", 2), 64, 300, seed=1)
    store = CovarianceStore(corpus=["/nonexistent"], cache_dir=str(tmp_path / "cache"),
                            import_from=str(tmp_path / "stats"))
    c = store.get(lm, [1])[1]
    expected = (torch.from_numpy(total).double() / 500).float()
    assert c.dtype == torch.float32 and torch.equal(c.cpu(), expected)
    # cached like a computed one, keyed by the file's bytes: a new store reads the cache
    cached = list((tmp_path / "cache").glob("*.safetensors"))
    assert len(cached) == 1
    again = CovarianceStore(corpus=["/nonexistent"], cache_dir=str(tmp_path / "cache"),
                            import_from=str(tmp_path / "stats" / "tiny" / "wikipedia_stats" /
                                            f"{module}_float32_mom2_500.npz"))
    assert again.key(lm, module) == store.key(lm, module)
    assert torch.equal(again.get(lm, [1])[1], c) and again.compute_seconds == 0
    computed = CovarianceStore(corpus=["/nonexistent"], cache_dir=str(tmp_path / "cache"))
    assert computed.key(lm, module) != store.key(lm, module)


def test_bad_mom2_files_are_config_errors(compose: Compose, tmp_path: Path) -> None:
    lm = load_tiny(compose, "tiny_llama")
    module = lm.spec.module("mlp_out", 1)
    write_rome_mom2(tmp_path / "wrong", module, 32, 100, seed=0)  # a 32-dim layer's file
    store = CovarianceStore(corpus=[], cache_dir=str(tmp_path / "c"),
                            import_from=str(tmp_path / "wrong"))
    with pytest.raises(ConfigError, match=r"\[32, 32\] second moment.*64-dim keys"):
        store.get(lm, [1])
    with pytest.raises(ConfigError, match=re.escape("no 'model.layers.2.mlp.down_proj_")):
        store.get(lm, [2])
    with pytest.raises(ConfigError, match="neither a file nor a folder"):
        CovarianceStore(corpus=[], cache_dir=str(tmp_path / "c"),
                        import_from=str(tmp_path / "missing")).get(lm, [1])
    other = tmp_path / "other" / f"{module}_float32_mom2.npz"
    other.parent.mkdir()
    np.savez(other, mean=np.zeros(64))
    with pytest.raises(ConfigError, match="lacks"):
        CovarianceStore(corpus=[], cache_dir=str(tmp_path / "c"),
                        import_from=str(other)).get(lm, [1])


def test_a_run_uses_imported_statistics(compose: Compose, tiny_run_overrides: list[str],
                                        tmp_path: Path) -> None:
    lm = load_tiny(compose, "tiny_llama")
    for layer in (1, 2):  # tiny_llama's MEMIT layers
        write_rome_mom2(tmp_path / "stats", lm.spec.module("mlp_out", layer), 64, 400, layer)
    cfg = compose([*tiny_run_overrides, f"stats.import_from='{tmp_path / 'stats'}'",
                   "stats.corpus=['/nonexistent/corpus.txt']", "schedule.n_edits=3"])
    summary = experiment.run(cfg, run_dir=str(tmp_path / "run"))
    assert summary["stats_compute_s"] == 0 and summary["edits_done"] == 3
