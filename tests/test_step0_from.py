"""``step0_from``: a run takes step 0 (the unedited model's evaluation) from another run of
the same evaluation plan instead of computing it, and ends with the files it would have
written itself; a run of another plan is refused before anything is written."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from conftest import Compose
from kaedit import experiment, wild
from kaedit.errors import ConfigError

# WILD (start and end) and text metrics at step 0, so that every step-0 file is exercised
EVAL = ["wild.every=null", "wild.max_new_tokens=4", "schedule.retention_sample=2",
        "schedule.generation_every=null", "generation.max_new_tokens=4"]


def own_columns(path: Path) -> pd.DataFrame:
    """A CSV without the columns that time the run or count what it scored itself."""
    df = pd.read_csv(path)
    return df[[c for c in df.columns if not c.startswith("time/") and c != "eval/prompts"]]


def test_a_run_with_step0_from_ends_as_the_run_that_computed_it(
        compose: Compose, tiny_run_overrides: list[str], tiny_rome_dataset: Path,
        tmp_path: Path) -> None:
    # ROME-schema records: generation prompts, so fluency and its reference texts at step 0
    base = [*tiny_run_overrides, f"dataset.path='{tiny_rome_dataset}'", *EVAL]
    source = tmp_path / "source"  # another method and fusion: step 0 is theirs too
    experiment.run(compose([*base, "method=rome", "fusion=add"]), run_dir=str(source))
    own, copied = tmp_path / "own", tmp_path / "copied"
    dr = [*base, "method=memit", "fusion=drop_rescale", "fusion.p=0.5"]
    experiment.run(compose(dr), run_dir=str(own))
    cfg = compose([*dr, f"step0_from={source}"])
    assert experiment.config_fingerprint(cfg) == experiment.config_fingerprint(compose(dr))
    experiment.run(cfg, run_dir=str(copied))
    for name in ("metrics.csv", "retention.csv"):
        pd.testing.assert_frame_equal(own_columns(copied / name), own_columns(own / name))
    for name in (wild.REFERENCES, experiment.REFERENCES):
        theirs = json.loads((own / name).read_text())
        assert theirs and json.loads((copied / name).read_text()) == theirs
    metrics = pd.read_csv(copied / "metrics.csv")
    assert "seen/fluency" in metrics and pd.notna(metrics.loc[0, "seen/fluency"])
    assert pd.notna(metrics.loc[0, "wild/seen/locality"])
    # step 0 cost this run only the copy: no prompts scored, a small time
    assert pd.isna(metrics.loc[0, "eval/prompts"]) and metrics.loc[0, "time/eval_s"] < 5


def test_step0_from_another_plan_or_no_run_is_refused(
        compose: Compose, tiny_run_overrides: list[str], tmp_path: Path) -> None:
    base = [*tiny_run_overrides, *EVAL]
    source = tmp_path / "source"
    experiment.run(compose(base), run_dir=str(source))
    run_dir = tmp_path / "run"
    for overrides, words in (
            (["schedule.n_edits=3"], ["differs in schedule"]),
            (["wild.max_new_tokens=5"], ["differs in wild"]),
            (["seed=1"], ["differs in seed"])):
        with pytest.raises(ConfigError) as err:
            experiment.run(compose([*base, *overrides, f"step0_from={source}"]),
                           run_dir=str(run_dir))
        assert all(w in str(err.value) for w in [str(source), *words]), err.value
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"no config.yaml there"):
        experiment.run(compose([*base, f"step0_from={tmp_path / 'empty'}"]),
                       run_dir=str(run_dir))
    assert not run_dir.exists()  # refused before anything was written
