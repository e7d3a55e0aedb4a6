"""``python -m kaedit.rescore``: finished runs' final weights scored again, with WILD."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from conftest import Compose, csv_approx, memit_crashes_at_call
from kaedit import experiment, rescore, wild

WILD = ["wild.every=null", "wild.max_new_tokens=4"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, compose: Compose,
         tiny_run_overrides: list[str]) -> dict[str, Path]:
    """Three tiny runs on the same plan: MEMIT with add and with DR (no WILD; DR also saves
    its final deltas), and MEMIT with add that ran WILD itself (the reference for the
    rescored WILD columns)."""
    root = tmp_path_factory.mktemp("rescore")
    base = [*tiny_run_overrides, "schedule.retention_sample=2", "schedule.generation_every=0",
            "schedule.first_batch_in_full=true", "schedule.fixed_sample=2"]
    made = {"add": ["fusion=add"], "dr": ["fusion=drop_rescale", "save_deltas=true"],
            "add-wild": ["fusion=add", *WILD]}
    for name, extra in made.items():
        experiment.run(compose([*base, *extra]), run_dir=str(root / name))
    return {name: root / name for name in made}


def test_rescored_wild_equals_the_wild_the_run_computed(runs: dict[str, Path],
                                                        tmp_path: Path) -> None:
    """Scoring the final weights afterwards gives the run's own WILD columns and
    per-edit values, at step 0 and at the last step, and its teacher-forced row again."""
    table = rescore.rescore([runs["add-wild"]], tmp_path / "out", WILD)
    own = pd.read_csv(runs["add-wild"] / "metrics.csv").set_index("step")
    got = {name: pd.read_csv(tmp_path / "out" / name / "metrics.csv").iloc[-1]
           for name in (rescore.UNEDITED, "add-wild")}
    wild_columns = [c for c in own.columns if c.startswith("wild/")]
    assert wild_columns
    for name, step in ((rescore.UNEDITED, 0), ("add-wild", 2)):
        assert got[name]["step"] == step
        for c in [*wild_columns, *rescore.CHECKED]:
            if c in own.columns and pd.notna(own.loc[step, c]):
                assert got[name][c] == csv_approx(own.loc[step, c]), (name, c)
    # per edit: retention.csv's WILD values at the last step
    mine = pd.read_csv(tmp_path / "out" / "add-wild" / "retention.csv")
    theirs = pd.read_csv(runs["add-wild"] / "retention.csv")
    theirs = theirs[theirs["step"] == 2].reset_index(drop=True)
    cols = ["case_id", "step_made", "efficacy", "wild_efficacy", "wild_locality"]
    pd.testing.assert_frame_equal(mine[cols], theirs[cols], check_dtype=False)
    row = table.set_index("run").loc["add-wild"]
    assert row["check/max_abs_diff"] == 0.0
    first = theirs[theirs["step_made"] == 1]
    assert row["wild/first_batch"] == pytest.approx(100 * first["wild_efficacy"].mean())
    # the unedited answers the run saved are the ones generated here
    refs = [json.loads(p.read_text()) for p in (runs["add-wild"] / wild.REFERENCES,
                                                tmp_path / "out" / rescore.UNEDITED
                                                / wild.REFERENCES)]
    assert refs[0] == refs[1]


def test_several_runs_share_one_unedited_evaluation(runs: dict[str, Path],
                                                    tmp_path: Path) -> None:
    out = tmp_path / "out"
    table = rescore.rescore([runs["add"], runs["dr"]], out, WILD)
    assert table["run"].tolist() == [rescore.UNEDITED, "add", "dr"]
    assert table["fusion"].tolist()[1:] == ["Add", "DropRescale"]
    assert (table["check/max_abs_diff"].iloc[1:] == 0.0).all()
    assert table["wild/seen/locality"].iloc[0] == 100.0  # the references' own model
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [rescore.UNEDITED, "add", "dr", rescore.SUMMARY])
    # serving each run's weights and taking them off again: the DR run's row does not
    # depend on the add run scored before it
    alone = rescore.rescore([runs["dr"]], tmp_path / "alone", WILD)
    untimed = [c for c in table.columns if not c.startswith("time/") and c != "run"]
    pd.testing.assert_series_equal(alone.set_index("run").loc["dr", untimed],
                                   table.set_index("run").loc["dr", untimed],
                                   check_names=False)


@pytest.mark.parametrize("case", ["method override", "unfinished", "different plan",
                                  "out not empty", "not a run"])
def test_bad_input_exits_2_and_writes_nothing(case: str, runs: dict[str, Path],
                                              tmp_path: Path, compose: Compose,
                                              tiny_run_overrides: list[str],
                                              caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "out"
    items, named = [str(runs["add"]), *WILD], ""
    if case == "method override":
        items, named = [*items, "method.lam=3"], "'method.lam'"
    elif case == "unfinished":
        cut = tmp_path / "cut"
        with memit_crashes_at_call(2), pytest.raises(RuntimeError, match="simulated crash"):
            experiment.run(compose([*tiny_run_overrides, "schedule.generation_every=0"]),
                           run_dir=str(cut))
        items, named = [str(cut)], "has not finished"
    elif case == "different plan":
        other = tmp_path / "other"
        experiment.run(compose([*tiny_run_overrides, "schedule.generation_every=0",
                                "schedule.n_edits=3"]), run_dir=str(other))
        items, named = [*items, str(other)], "differ in schedule"
    elif case == "out not empty":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
        named = "not an empty directory"
    else:
        items, named = [str(tmp_path / "nothing"), *WILD], "is not a directory"
    before = sorted(p.name for p in out.iterdir()) if out.exists() else None
    with pytest.raises(SystemExit) as exc:
        rescore.main([*items, "--out", str(out)])
    assert exc.value.code == 2
    assert named in caplog.text, caplog.text
    assert (sorted(p.name for p in out.iterdir()) if out.exists() else None) == before
    if case == "out not empty":
        assert (out / "keep.txt").read_text() == "mine"


def test_a_copy_without_checkpoint_rescores_from_saved_deltas(runs: dict[str, Path],
                                                              tmp_path: Path) -> None:
    """A run whose checkpoint is gone but that saved ``deltas.safetensors``
    (``save_deltas=true``) is rescored from it, to the same row; without either it is one
    clear error."""
    for name in ("dr", "add"):
        shutil.copytree(runs[name], tmp_path / name)
        shutil.rmtree(tmp_path / name / "checkpoint")
    table = rescore.rescore([tmp_path / "dr"], tmp_path / "out", WILD)
    assert table["check/max_abs_diff"].iloc[1] == 0.0
    with pytest.raises(rescore.ConfigError, match="neither a checkpoint nor"):
        rescore.rescore([tmp_path / "add"], tmp_path / "out2", WILD)
    assert not (tmp_path / "out2").exists()


def test_a_run_made_before_wild_existed_gets_todays_wild_node(runs: dict[str, Path],
                                                              tmp_path: Path) -> None:
    """An older run's config.yaml has no ``wild`` node: it is scored with the current
    defaults plus the overrides, together with a newer run, to the same row."""
    import yaml

    old = tmp_path / "old-dr"
    shutil.copytree(runs["dr"], old)
    config = yaml.safe_load((old / "config.yaml").read_text())
    del config["wild"]
    (old / "config.yaml").write_text(yaml.safe_dump(config))
    table = rescore.rescore([runs["add"], old], tmp_path / "out", WILD).set_index("run")
    new = rescore.rescore([runs["dr"]], tmp_path / "new", WILD).set_index("run")
    untimed = [c for c in table.columns if not c.startswith("time/")]
    pd.testing.assert_series_equal(table.loc["old-dr", untimed], new.loc["dr", untimed],
                                   check_names=False)
