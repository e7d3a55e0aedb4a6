"""Checkpoint/resume, numerical-fault guard and bad input of the runner (issue 6)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from conftest import csv_approx

REPO = Path(__file__).resolve().parents[1]
BASE = [
    "model=tiny_llama",
    "logger=csv",
    "schedule.n_edits=10",
    "schedule.batch_size=2",
    "stats.n_tokens=2000",
    "save_deltas=true",
]
#: Drop-and-rescale (stateless, seeded masks) and Lookahead (stateful: the deltas since its
#: last synchronisation are checkpointed).
FUSIONS = {"drop_rescale": ["fusion.p=0.5"], "lookahead": ["fusion=lookahead", "fusion.k=2"]}
#: (fusion, step whose checkpoint triggers the kill) of the 5-step runs: the first step, a
#: middle one and the last but one. Lookahead with k=2 is killed after odd steps, when its
#: state is not zero.
KILLS = [("drop_rescale", 1), ("drop_rescale", 3), ("drop_rescale", 4),
         ("lookahead", 1), ("lookahead", 3)]


def kaedit_run(args: list[str], cache: Path, hydra_dir: Path, **kw) -> subprocess.Popen:
    env = {**os.environ, "WANDB_SILENT": "true"}
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "kaedit.run",
            *BASE,
            f"cache_dir={cache}",
            f"hydra.run.dir={hydra_dir}",
            *args,
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kw,
    )


def metric_columns(df: pd.DataFrame) -> pd.DataFrame:
    return df[[c for c in df.columns if not c.startswith("time/")]]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """``reference(fusion)`` -> (cache dir, run dir) of an uninterrupted run, made once."""
    root = tmp_path_factory.mktemp("resume")
    made: dict[str, Path] = {}

    def _reference(fusion: str) -> tuple[Path, Path]:
        ref_dir = root / f"ref-{fusion}"
        if fusion not in made:
            p = kaedit_run([*FUSIONS[fusion], f"run_dir={ref_dir}"], root / "cache", ref_dir)
            out, _ = p.communicate(timeout=600)
            assert p.returncode == 0, out
            made[fusion] = ref_dir
        return root / "cache", ref_dir

    return _reference


@pytest.mark.slow
@pytest.mark.parametrize("fusion, kill_at", KILLS)
def test_killed_run_resumes_to_identical_results(tmp_path, reference, fusion, kill_at):
    overrides = FUSIONS[fusion]
    cache, ref_dir = reference(fusion)

    # Same run, SIGKILLed once its checkpoint reaches step `kill_at`, then resumed.
    run_dir = tmp_path / "killed"
    p = kaedit_run(overrides, cache, run_dir)
    pointer = run_dir / "checkpoint" / "latest.json"
    deadline = time.time() + 600
    while time.time() < deadline and p.poll() is None:
        if pointer.is_file() and json.loads(pointer.read_text())["step"] >= kill_at:
            p.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    p.wait(timeout=60)
    assert p.returncode == -signal.SIGKILL, f"run ended before the kill at step {kill_at}"
    assert not (run_dir / "summary.json").exists()
    killed_at = json.loads(pointer.read_text())["step"]  # kill_at, or one more if it was fast

    p = kaedit_run([*overrides, f"resume={run_dir}"], cache, tmp_path / "resume-hydra")
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 0, out

    ref = metric_columns(pd.read_csv(ref_dir / "metrics.csv"))
    got = metric_columns(pd.read_csv(run_dir / "metrics.csv"))
    assert list(got["step"]) == list(range(6)), killed_at  # no row lost or duplicated
    pd.testing.assert_frame_equal(got, ref, obj=f"metrics.csv, killed after step {killed_at}")
    pd.testing.assert_frame_equal(pd.read_csv(run_dir / "retention.csv"),
                                  pd.read_csv(ref_dir / "retention.csv"),
                                  obj=f"retention.csv, killed after step {killed_at}")
    # Time and evaluation's share count both segments: each kept evaluation once.
    summary = json.loads((run_dir / "summary.json").read_text())
    kept = pd.read_csv(run_dir / "metrics.csv")["time/eval_s"].sum()
    assert summary["eval_s"] == csv_approx(kept)
    assert 0 < summary["wall_s"] < summary["elapsed_s"]  # the killed segment counted
    assert summary["eval_share"] == summary["eval_s"] / summary["elapsed_s"]
    a = load_file(str(ref_dir / "deltas.safetensors"))
    b = load_file(str(run_dir / "deltas.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_resume_without_checkpoint_is_a_clear_error(tmp_path):
    p = kaedit_run([f"resume={tmp_path / 'nothing'}"], tmp_path / "cache", tmp_path / "h")
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 2
    assert "no checkpoint" in out and "nothing" in out


def test_csv_rows_are_appended_widened_and_cut_back_to_the_checkpoint(tmp_path):
    from kaedit.files import CsvRows

    path = tmp_path / "metrics.csv"
    rows = CsvRows(path)
    rows.append([{"step": 0, "a": 1.5}])
    rows.append([{"step": 1, "a": 2.0, "b": "x,y"}])  # a new column: the header widens
    rows.append([{"step": 2, "a": 3.0}])
    assert path.read_text() == 'step,a,b\n0,1.5,\n1,2,"x,y"\n2,3,\n' and rows.n_rows == 3
    resumed = CsvRows(path, keep=2)  # the checkpoint had 2 rows: the third is redone
    assert path.read_text() == 'step,a,b\n0,1.5,\n1,2,"x,y"\n' and resumed.n_rows == 2
    with pytest.raises(ValueError, match="expects 5"):
        CsvRows(path, keep=5)
    CsvRows(path)  # a fresh run in the same directory starts empty
    assert not path.exists()


def test_run_state_names_its_keys_and_refuses_other_formats():
    from kaedit.checkpoint import FORMAT, RunState
    from kaedit.errors import ConfigError

    state = RunState(step=3, n_done=6, faults=[{"step": 2, "reason": "nan"}],
                     trackers={"csv": {"rows": 4}}, retention_rows=12)
    saved = json.loads(json.dumps(state.to_json()))
    assert saved["format"] == FORMAT and RunState.from_json(saved) == state
    with pytest.raises(ConfigError, match="format"):
        RunState.from_json({**saved, "format": FORMAT - 1})
