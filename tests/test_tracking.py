"""Trackers (issue 18): W&B tables beyond its 10,000-row limit kept whole as artifacts,
summary.json before any W&B call, offline resume in segments of one run without a
repeated step, the fan-out reaching every tracker, and the per-step progress line."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from conftest import Compose, memit_crashes_at_call
from kaedit import experiment
from kaedit.tracking import Trackers, WandbTracker, progress_line
from wandb_file import history_rows, of_type, wandb_records


@pytest.fixture
def wandb_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """W&B's own folders (artifact staging included) under tmp_path, silent."""
    for var in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home" / var.lower()))
    monkeypatch.setenv("WANDB_SILENT", "true")
    return tmp_path


#: W&B's offline directory name: start time, run id, and a counter when a directory of
#: that name already exists (two segments started within the same second).
OFFLINE_DIR = re.compile(r"offline-run-(\d{8}_\d{6})-([a-z0-9]+)(?:-(\d+))?")


def segment_dirs(run_dir: Path) -> list[Path]:
    """A run directory's offline W&B segments, oldest first."""
    def started(d: Path) -> tuple[str, int]:
        m = OFFLINE_DIR.fullmatch(d.name)
        assert m, d.name
        return m[1], int(m[3] or 0)

    return sorted(run_dir.glob("wandb/offline-run-*"), key=started)


def segments(run_dir: Path) -> list[list]:
    """The records of each offline segment of a run directory, oldest first."""
    return [wandb_records(f) for d in segment_dirs(run_dir) for f in d.glob("run-*.wandb")]


def test_a_table_beyond_the_wandb_row_limit_is_kept_whole(wandb_offline: Path) -> None:
    import wandb

    n = wandb.Table.MAX_ROWS + 2345  # a 1,000-step run's retention table is far larger
    run_dir = wandb_offline / "run"
    run_dir.mkdir()
    table = run_dir / "retention.csv"
    pd.DataFrame({"step": [i // 100 for i in range(n)], "case_id": range(n),
                  "step_made": [i // 100 for i in range(n)],
                  "efficacy": [i % 2 for i in range(n)]}).to_csv(table, index=False)
    small = run_dir / "small.csv"
    pd.DataFrame({"a": [1, 2]}).to_csv(small, index=False)
    tracker = WandbTracker(str(run_dir), {"x": 1}, mode="offline")
    tracker.table("retention", table)
    tracker.table("small", small)
    tracker.finish()

    ((records),) = segments(run_dir)
    files = {e.path: e for a in of_type(records, "artifact") for e in a.manifest.contents}
    assert files["retention.csv"].size == table.stat().st_size
    staged = pd.read_csv(files["retention.csv"].local_path)
    assert len(staged) == n  # every row, no truncation
    media = run_dir.glob("wandb/offline-run-*/files/media/table/*.table.json")
    shown = {p.name.split("_")[0] for p in media}
    assert shown == {"small"}  # only the table that fits is also a wandb.Table


def test_summary_json_is_written_before_wandb_can_fail(
    compose: Compose, tiny_run_overrides: list[str], wandb_offline: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def refuse(self, name, path):
        raise RuntimeError("W&B refused the table")

    monkeypatch.setattr(WandbTracker, "table", refuse)
    run_dir = wandb_offline / "run"
    with pytest.raises(RuntimeError, match="W&B refused"):
        experiment.run(compose([*tiny_run_overrides, "logger=wandb"]), run_dir=str(run_dir))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["edits_done"] == 6 and "seen/efficacy" in summary
    assert json.loads((run_dir / "resume.json").read_text())["done"]
    assert (run_dir / experiment.RETENTION_BY_BATCH).is_file()


def test_offline_resume_leaves_segments_of_one_run_without_a_repeated_step(
    compose: Compose, tiny_run_overrides: list[str], wandb_offline: Path,
) -> None:
    # 4 steps of 1 edit, a checkpoint every 2 steps; the run dies computing step 4, after
    # it logged step 3 (past its checkpoint at step 2). The resumed segment redoes 3 and 4.
    overrides = [*tiny_run_overrides, "logger=wandb", "schedule.n_edits=4",
                 "schedule.batch_size=1", "schedule.checkpoint_every=2"]
    run_dir = wandb_offline / "run"
    with memit_crashes_at_call(4), pytest.raises(RuntimeError, match="simulated crash"):
        experiment.run(compose(overrides), run_dir=str(run_dir))
    experiment.run(compose([*overrides, f"resume={run_dir}"]))

    first, second = segments(run_dir)
    ids = {r.run_id for seg in (first, second) for r in of_type(seg, "run")}
    assert len(ids) == 1  # one W&B run in two offline directories
    (run_id,) = ids
    dirs = segment_dirs(run_dir)
    assert len(dirs) == 2 and all(OFFLINE_DIR.fullmatch(d.name)[2] == run_id for d in dirs)
    steps = [[r["_step"] for r in history_rows(seg) if "step" in r] for seg in (first, second)]
    assert steps == [[0, 1, 2, 3], [4]]
    # the documented upload command takes both segments (--dry-run: no server here)
    wandb_cli = Path(sys.executable).parent / "wandb"
    proc = subprocess.run([str(wandb_cli), "sync", "--dry-run",
                           *map(str, dirs)],
                          capture_output=True, text=True, timeout=120, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "Would sync 2 run(s)" in out, out
    # the csv tracker cut its rows back to the checkpoint and redid them: the same steps
    assert pd.read_csv(run_dir / "metrics.csv")["step"].tolist() == [0, 1, 2, 3, 4]


class Recorder:
    def __init__(self, fail: bool = False) -> None:
        self.calls, self.fail = [], fail

    def __getattr__(self, name: str):
        def call(*args):
            self.calls.append(name)
            if self.fail:
                raise OSError(f"{name} failed")
        return call


def test_trackers_reach_every_tracker_and_raise_the_first_error() -> None:
    broken, fine = Recorder(fail=True), Recorder()
    trackers = Trackers([broken, fine])
    with pytest.raises(OSError, match="summary failed"):
        trackers.summary({"a": 1})
    with pytest.raises(OSError, match="finish failed"):
        trackers.finish()
    assert fine.calls == ["summary", "finish"]


def test_progress_line_names_step_edits_metrics_speed_and_eta() -> None:
    row = {"seen/efficacy": 87.5, "seen/generalization": 50.0, "seen/specificity": 91.25,
           "seen/score": 70.0}
    line = progress_line(10, 100, 40, row, 12.5)
    assert line == ("step 10/100 | edits 40 | seen: efficacy 87.5 generalization 50.0 "
                    f"specificity {91.25:.1f} score 70.0 | 12.50 s/step | ETA 18m45s")
    # a step the schedule did not evaluate: the last evaluated step's metrics, so named
    assert progress_line(10, 100, 40, {**row, "step": 10}, 12.5) == line
    assert progress_line(11, 100, 44, {**row, "step": 10}, 12.5).startswith(
        "step 11/100 | edits 44 | seen at step 10: efficacy 87.5 ")
    assert progress_line(5, 5, 5, {}, 3600.0).endswith("ETA 0m00s")
    assert progress_line(1, 3, 1, {}, 3600.0).endswith("ETA 2h00m")
