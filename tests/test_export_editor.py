"""Export a run's edited model, and the notebook Editor on the runner's code path."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import Compose, load_tiny
from kaedit import experiment, setup
from kaedit.errors import ConfigError
from kaedit.export import export
from kaedit.models import LoadedModel

REQUEST = {"prompt": "{} plays the sport of", "subject": "LeBron James",
           "target_new": "football", "target_true": "basketball"}


@pytest.fixture
def tiny_run(compose: Compose, tiny_run_overrides: list[str], tmp_path: Path,
             monkeypatch: pytest.MonkeyPatch):
    """``tiny_run(*overrides)`` -> (run dir, the runner's model after the run)."""

    def _run(*overrides: str) -> tuple[Path, LoadedModel]:
        loaded: list[LoadedModel] = []
        real = setup.build_model  # build_session's
        monkeypatch.setattr(setup, "build_model",
                            lambda *a, **k: loaded.append(real(*a, **k)) or loaded[-1])
        run_dir = tmp_path / "run"
        experiment.run(compose([*tiny_run_overrides, *overrides]), run_dir=str(run_dir))
        return run_dir, loaded[-1]

    return _run


def _reload(out: Path) -> dict[str, torch.Tensor]:
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    return dict(model.named_parameters())


def test_export_is_the_served_model_and_only_edited_weights_differ(
        tiny_run, compose: Compose, tmp_path: Path) -> None:
    run_dir, runner_lm = tiny_run("fusion=add")
    out = export(run_dir, tmp_path / "exported")
    assert {"config.json", "model.safetensors"} <= {p.name for p in out.iterdir()}
    got = _reload(out)
    base = dict(load_tiny(compose, "tiny_llama").model.named_parameters())
    final = dict(runner_lm.model.named_parameters())
    changed = {n for n in base if not torch.equal(got[n], base[n])}
    edited = {f"model.layers.{layer}.mlp.down_proj.weight" for layer in (1, 2)}  # MEMIT's
    assert changed == edited
    for n in base:  # bit-exact: the weights the runner ended with (add: nothing else served)
        assert torch.equal(got[n], final[n]), n


def test_export_serves_the_fusion_offset_and_replays_a_step(
        tiny_run, compose: Compose, tmp_path: Path) -> None:
    # WiSE-FT serves W₀ + α·total, not the W₀ + total the model holds between evaluations
    from kaedit import checkpoint
    from kaedit.export import served_deltas

    run_dir, runner_lm = tiny_run("fusion=wise_ft", "save_step_deltas=true")
    total = checkpoint.load(run_dir).deltas
    _, served, step = served_deltas(run_dir)
    assert step == 2 and served.keys() == total.keys()
    got = _reload(export(run_dir, tmp_path / "exported"))
    base = dict(load_tiny(compose, "tiny_llama").model.named_parameters())
    final = dict(runner_lm.model.named_parameters())
    for n, d in served.items():
        assert not torch.equal(d, total[n])  # the offset is there
        assert torch.equal(got[n], base[n] + d)  # float32 model: W₀ + (total + offset)
        assert not torch.equal(got[n], final[n])
    # --step 1 (no checkpoint there) is replayed from the saved per-step deltas; replaying
    # both steps gives the checkpoint's weights exactly (fusion + guard are deterministic)
    _, one, _ = served_deltas(run_dir, step=1)
    assert all(not torch.equal(one[n], served[n]) for n in served)
    assert_replay_is_the_checkpoint(run_dir, served)


def assert_replay_is_the_checkpoint(run_dir: Path, served: dict[str, torch.Tensor]) -> None:
    """Replaying every saved step gives the weights the run's checkpoint serves, exactly."""
    from omegaconf import OmegaConf

    from kaedit.export import _replay, replay_session

    session = replay_session(OmegaConf.load(run_dir / "config.yaml"))
    offset = _replay(session, run_dir, 2)
    full = {n: session.edits.total.get(n, 0) + offset.get(n, 0) for n in served}
    for n in served:
        assert torch.equal(full[n], served[n]), n


@pytest.mark.parametrize("overrides", [
    # RECT reads W₀ and W_{t-1}: the replay binds the weights as a step does
    ("fusion=rect",),
    # AlphaEdit with DR re-projects the dropped update (project_fused): the replay too
    ("method=alphaedit", "fusion=drop_rescale", "method.project_fused=true"),
    # DR's masks from fusion.seed, not the run's seed: the replay draws the run's masks
    ("fusion=drop_rescale", "fusion.seed=7"),
])
def test_replay_applies_the_step_fusion_of_the_run(tiny_run, overrides, tmp_path: Path) -> None:
    from kaedit import checkpoint
    from kaedit.export import served_deltas

    run_dir, _ = tiny_run(*overrides, "save_step_deltas=true")
    served = checkpoint.load(run_dir).deltas  # these fusions serve no offset
    assert served_deltas(run_dir)[1].keys() == served.keys()
    assert_replay_is_the_checkpoint(run_dir, served)
    # export --step 1 replays (no checkpoint there) and differs from the final weights
    _, one, at = served_deltas(run_dir, step=1)
    assert at == 1 and all(not torch.equal(one[n], served[n]) for n in served)


def test_export_bad_input_exits_2_and_writes_nothing(tiny_run, tmp_path: Path) -> None:
    run_dir, _ = tiny_run()
    out = tmp_path / "never"
    with pytest.raises(ConfigError, match=re.escape("no config.yaml")):
        export(tmp_path, out)
    with pytest.raises(ConfigError, match="--step 7"):
        export(run_dir, out, step=7)
    assert not out.exists()
    proc = subprocess.run([sys.executable, "-m", "kaedit.export", str(tmp_path / "nope"),
                           "--out", str(out)], check=False, capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    assert "is not a directory" in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()


def test_editor_runs_the_runner_step(compose: Compose, tiny_run_overrides: list[str],
                                     tiny_dataset: Path, tmp_path: Path) -> None:
    from kaedit import Editor
    from kaedit.setup import build_records

    cfg = compose([*tiny_run_overrides, "fusion=add"])
    records = build_records(cfg)[:3]
    ed = Editor(cfg)
    base = {n: p.detach().clone() for n, p in ed.model.named_parameters()}
    ed.evaluate(records)
    done = ed.edit(records)  # one batch of EditRequest records
    assert done["applied"] and done["edited"] == [
        "model.layers.1.mlp.down_proj.weight", "model.layers.2.mlp.down_proj.weight"]
    # (a tiny random model does not rank objects reliably: that an edit makes the new
    # object likelier is checked on SmolLM2 in test_smollm2_export_editor.py)
    assert {"eval/efficacy", "eval/specificity", "eval/score"} <= set(ed.evaluate(records))
    ed.edit(REQUEST)  # a plain dict
    ed.edit([{"prompt": "Paris is the capital of France", "subject": "Paris",
              "target_new": "Italy"}])  # a sentence: the subject becomes {}
    assert ed.step == 3 and len(ed.requests) == 5
    saved = ed.save(tmp_path / "ed")
    got = _reload(saved)
    for n, p in ed.model.named_parameters():
        assert torch.equal(got[n], p), n
    ed.reset()
    for n, p in ed.model.named_parameters():
        assert torch.equal(p, base[n]), n
    with pytest.raises(ConfigError, match="target_new"):
        ed.edit({"prompt": "{} is", "subject": "x"})

    # the same step as the runner: one batch of the run's records, same seed -> same weights
    ed.edit(records)
    run_dir = tmp_path / "run"
    experiment.run(compose([*tiny_run_overrides, "fusion=add", "schedule.n_edits=3",
                            "schedule.batch_size=3", "save_deltas=true"]), run_dir=str(run_dir))
    from safetensors.torch import load_file

    total = load_file(str(run_dir / "deltas.safetensors"))
    for n, d in total.items():
        assert torch.equal(ed._weights.total[n], d), n


def test_an_editor_step_and_a_run_step_make_the_same_deltas(
        compose: Compose, tiny_run_overrides: list[str], tmp_path: Path) -> None:
    """Editor and ``kaedit.run`` build one session (``kaedit.setup.build_session``) and
    step through one ``edit_step``: the same requests in the same steps give bit-identical
    deltas, drop-and-rescale's per-step masks inside the layer loop included."""
    from safetensors.torch import load_file

    from kaedit import Editor

    overrides = [*tiny_run_overrides, "fusion=drop_rescale", "fusion.scope=layer",
                 "schedule.n_edits=4", "schedule.batch_size=2"]
    run_dir = tmp_path / "run"
    experiment.run(compose([*overrides, "save_step_deltas=true", "save_deltas=true"]),
                   run_dir=str(run_dir))
    cfg = compose(overrides)
    records = setup.build_records(cfg)
    ed = Editor(cfg)
    for step, batch in enumerate(setup.build_schedule(cfg).batches(len(records)), start=1):
        assert ed.edit([records[i] for i in batch])["applied"]
        # after step 1 the sum of applied deltas is step 1's fused deltas; at the end the
        # run's total (drop-and-rescale serves no offset)
        name = f"deltas/step-{step:04d}-fused.safetensors" if step == 1 else "deltas.safetensors"
        want = load_file(str(run_dir / name))
        assert ed._weights.total.keys() == want.keys()
        for n, d in want.items():
            assert torch.equal(ed._weights.total[n], d), (step, n)
    assert step == 2


def test_import_kaedit_is_light() -> None:
    code = ("import sys, kaedit; assert 'torch' not in sys.modules, 'torch imported'; "
            "assert kaedit.Editor.__name__ == 'Editor'")
    subprocess.run([sys.executable, "-c", code], check=True)
