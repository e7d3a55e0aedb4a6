"""Errors by phase (kaedit.errors): bad input found while building exits 2 with one line and
writes nothing; an error inside the loop keeps its traceback, exits 1, and the run resumes
from its last checkpoint to the same results as a run that never failed."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest

from conftest import REPO, Compose, memit_crashes_at_call
from kaedit import experiment
from kaedit.errors import ConfigError

#: 6 edits in 3 steps of 2; the injected failure comes at step 2, after step 1's checkpoint.
STEPS = ["schedule.n_edits=6", "schedule.batch_size=2"]
FAIL_AT = 2

#: Runs `python -m kaedit.run` with MEMIT.compute_deltas raising a ValueError at step 2.
FAILING_RUN = textwrap.dedent(f"""
    import sys
    from kaedit.methods.memit import MEMIT
    from kaedit.run import main

    real, calls = MEMIT.compute_deltas, []

    def failing(self, ctx, requests):
        calls.append(1)
        if len(calls) == {FAIL_AT}:
            raise ValueError("injected failure inside the loop")
        return real(self, ctx, requests)

    MEMIT.compute_deltas = failing
    sys.argv = ["kaedit.run", *sys.argv[1:]]
    main()
""")


def metric_columns(run_dir: Path) -> pd.DataFrame:
    df = pd.read_csv(run_dir / "metrics.csv")
    return df[[c for c in df.columns if not c.startswith("time/")]]


def test_loop_error_is_not_bad_input_and_the_run_resumes(
    compose: Compose, tiny_run_overrides: list[str], tmp_path: Path,
) -> None:
    overrides = [*tiny_run_overrides, *STEPS]
    experiment.run(compose(overrides), run_dir=str(tmp_path / "ref"))

    run_dir = tmp_path / "failed"
    with memit_crashes_at_call(FAIL_AT, ValueError("injected failure inside the loop")), \
            pytest.raises(ValueError, match="injected failure") as info:
        experiment.run(compose(overrides), run_dir=str(run_dir))
    assert not isinstance(info.value, ConfigError)  # reported with its traceback, exit 1
    pointer = json.loads((run_dir / "checkpoint" / "latest.json").read_text())
    assert pointer["step"] == FAIL_AT - 1
    assert not json.loads((run_dir / "resume.json").read_text()).get("done")
    assert not (run_dir / "summary.json").exists()
    assert metric_columns(run_dir)["step"].tolist() == list(range(FAIL_AT))

    summary = experiment.run(compose([*overrides, f"resume={run_dir}"]))
    assert summary["steps"] == 3
    pd.testing.assert_frame_equal(metric_columns(run_dir), metric_columns(tmp_path / "ref"))
    pd.testing.assert_frame_equal(pd.read_csv(run_dir / "retention.csv"),
                                  pd.read_csv(tmp_path / "ref" / "retention.csv"))


def cli_env(cache_dir: Path) -> dict[str, str]:
    """The environment of a CLI run in a test: the tests' cache, one thread, and no
    HYDRA_FULL_ERROR (so a bad input shows as the one line a user sees)."""
    env = {**os.environ, "KAEDIT_CACHE": str(cache_dir), "OMP_NUM_THREADS": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    return env


def test_cli_loop_error_keeps_its_traceback_and_exits_1(
    tmp_path: Path, cache_dir: Path, tiny_run_overrides: list[str]
) -> None:
    env = cli_env(cache_dir)
    run_dir = tmp_path / "cli"
    proc = subprocess.run(
        [sys.executable, "-c", FAILING_RUN, *tiny_run_overrides, *STEPS,
         f"hydra.run.dir='{run_dir}'"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert "Traceback" in out and "ValueError: injected failure inside the loop" in out
    assert json.loads((run_dir / "checkpoint" / "latest.json").read_text())["step"] == 1


def test_bad_config_value_exits_2_in_one_line_and_writes_nothing(
    tmp_path: Path, cache_dir: Path, tiny_run_overrides: list[str]
) -> None:
    env = cli_env(cache_dir)
    run_dir = tmp_path / "cli"
    proc = subprocess.run(
        [sys.executable, "-m", "kaedit.run", *tiny_run_overrides, "fusion.p=1.5",
         f"hydra.run.dir='{run_dir}'"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    errors = [line for line in out.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and "fusion.p=1.5" in errors[0], out
    assert "Traceback" not in out
    written = sorted(p.name for p in run_dir.iterdir()) if run_dir.exists() else []
    assert not set(written) - {".hydra", "run.log"}, written  # Hydra's own files only


def test_build_turns_a_constructor_value_error_into_a_config_error(compose: Compose) -> None:
    from kaedit.setup import build

    with pytest.raises(ConfigError, match=re.escape("fusion.p=1.5")) as info:
        build(compose(["fusion.p=1.5"]).fusion)
    assert isinstance(info.value.__cause__, ValueError)  # HYDRA_FULL_ERROR=1 shows it
