"""Bad input: one clear error naming the value, exit status 2, nothing written as if the
run had succeeded (issue 6). Each case runs the real CLI in a subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def default_dataset_size() -> int:
    """Records of the dataset the CLI runs by default (read, not assumed)."""
    from kaedit.setup import build_records, compose, resolve_data_root

    cfg = compose(["logger=csv"])
    resolve_data_root(cfg)
    return len(build_records(cfg))


def cli(tmp_path: Path, *overrides: str) -> tuple[int, str, Path]:
    run_dir = tmp_path / "run"
    p = subprocess.run(
        [sys.executable, "-m", "kaedit.run", "logger=csv", f"cache_dir={tmp_path / 'cache'}",
         f"hydra.run.dir={run_dir}", "stats.n_tokens=2000", *overrides],
        cwd=REPO, capture_output=True, text=True, timeout=300, check=False,
    )
    return p.returncode, p.stdout + p.stderr, run_dir


def assert_nothing_written(run_dir: Path) -> None:
    for name in ("metrics.csv", "summary.json", "retention.csv", "checkpoint"):
        assert not (run_dir / name).exists(), name


def write(path: Path, rows) -> Path:
    path.write_text(rows if isinstance(rows, str) else json.dumps(rows))
    return path


GOOD = {"case_id": 1, "requested_rewrite": {"prompt": "{} is located in", "subject": "Paris",
        "target_new": {"str": "Italy"}, "target_true": {"str": "France"}}}


@pytest.mark.parametrize(
    "case, overrides, expected",
    [
        ("n_edits", ["model=tiny_llama", "schedule.n_edits=100000"], ["100000", "{size}"]),
        ("malformed", ["model=tiny_llama", "dataset.path={tmp}/bad.json"], ["bad.json"]),
        ("empty", ["model=tiny_llama", "dataset.path={tmp}/empty.json"],
         ["empty.json", "no records"]),
        ("subject", ["model=tiny_llama", "dataset.path={tmp}/subject.json"],
         ["Berlin", "case_id=8"]),
        ("module", ["model=tiny_llama", "model.modules.mlp_out='model.layers.{{}}.mlp.nope'"],
         ["model.layers.1.mlp.nope"]),
        ("layer", ["model=tiny_llama", "model.edit.layers=[1,9]"], ["9", "0..3"]),
        # ROME's setting is `layer`: the runner checks the layers the method declares
        ("rome_layer", ["model=tiny_llama", "method=rome", "method.layer=7"], ["7", "0..3"]),
        ("schedule_key", ["model=tiny_llama", "+schedule.n_edit=5"], ["n_edit", "n_edits"]),
        # ROME fixes its clamp: an override of the model's default would change nothing
        ("edit_default", ["model=tiny_llama", "method=rome",
                          "++model.edit.target.clamp_norm_factor=2"],
         ["model.edit.target.clamp_norm_factor=2", "method.target.clamp_norm_factor=2"]),
        ("target_key", ["model=tiny_llama", "+model.edit.target.clamp_norm=2"],
         ["model.edit.target.clamp_norm", "clamp_norm_factor"]),
        ("gguf", ["model.load.path={tmp}/missing.gguf"], ["missing.gguf"]),
        ("fusion", ["model=tiny_llama", "fusion.p=1.5"], ["fusion.p=1.5"]),
        ("guard", ["model=tiny_llama", "guard.on_fault=explode"], ["explode", "skip", "stop"]),
        ("step0_from", ["model=tiny_llama", "step0_from={tmp}/nowhere"],
         ["step0_from", "nowhere", "config.yaml"]),
    ],
)
def test_bad_input_fails_clearly(tmp_path, case, overrides, expected):
    write(tmp_path / "bad.json", '[{"case_id": 1, "requested_rewrite": ')
    write(tmp_path / "empty.json", [])
    easyedit = {"case_id": 7, "prompt": "Paris is located in", "subject": "Paris",
                "target_new": "Italy", "ground_truth": "France"}
    write(tmp_path / "subject.json", [easyedit, {**easyedit, "case_id": 8, "subject": "Berlin"}])
    rc, out, run_dir = cli(tmp_path, *[o.format(tmp=tmp_path) for o in overrides])
    assert rc == 2, out
    errors = [line for line in out.splitlines() if "ERROR" in line]
    assert len(errors) == 1, out
    for word in expected:
        word = word.format(size=default_dataset_size()) if word == "{size}" else word
        assert word in errors[0], errors[0]
    assert "Traceback" not in out
    assert_nothing_written(run_dir)


def test_unknown_option_lists_valid_ones(tmp_path):
    rc, out, run_dir = cli(tmp_path, "fusion=nonexistent")
    assert rc != 0
    assert "nonexistent" in out and "drop_rescale" in out
    assert_nothing_written(run_dir)


def test_unreachable_hub_id_is_named(tmp_path):
    # hub_timeout bounds the wait; how fast it fails is not asserted here (speed belongs to
    # benchmarks), cli()'s subprocess timeout catches a hang.
    rc, out, run_dir = cli(tmp_path, "model=llama2", "model.load.name_or_path=no-such-org/no-model",
                           "model.load.hub_timeout=3")
    assert rc == 2, out
    assert "no-such-org/no-model" in out and "could not be reached" in out
    assert_nothing_written(run_dir)
