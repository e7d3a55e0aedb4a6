"""Stabilisers for lifelong editing (issue 26): RECT and PRUNE (fusions that read the
weights) and NAS (a target setting), each against its defining property, PRUNE's state
through a checkpoint, and each in a short run of the recipe on tiny_llama."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from conftest import U32, U64, Compose, assert_within, gamma, load_tiny, memit_crashes_at_call
from kaedit import checkpoint, experiment, setup
from kaedit.checkpoint import RunState
from kaedit.errors import ConfigError
from kaedit.fusion import (
    FusionState,
    FusionStrategy,
    Prune,
    Rect,
    WeightReader,
    bind_weights,
    rect,
    relative_change,
    restrain_spectrum,
    spectral_norm,
)
from kaedit.methods.keys import hidden_at_subject
from kaedit.methods.nas import nas_scale, upper_trimmed_mean
from kaedit.methods.targets import TargetConfig, optimize_targets
from kaedit.records import EditRequest
from kaedit.weights import EditedWeights


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def edited(*shapes: tuple[int, int], seed: int = 0) -> EditedWeights:
    """EditedWeights over a module with one weight per shape (``0.weight``, ``1.weight``, ...)."""
    torch.manual_seed(seed)
    return EditedWeights(nn.Sequential(*(nn.Linear(i, o, bias=False) for o, i in shapes)))


# ----------------------------------------------------------------------------------- RECT
@pytest.mark.parametrize("k", [0.05, 0.2, 0.4, 1.0])
def test_rect_keeps_the_k_fraction_with_the_largest_relative_change(k: float) -> None:
    delta = torch.randn(60, 37, generator=gen(0))  # no zeros, no ties
    weight = torch.randn(60, 37, generator=gen(1))
    out = rect(delta, weight, k)
    kept = out != 0
    n = delta.numel()
    assert int(kept.sum()) == n - int(n * (1 - k))  # the reference's count
    assert torch.equal(out[kept], delta[kept])  # survivors untouched, nothing rescaled
    rel = relative_change(delta, weight)
    if not kept.all():
        assert rel[kept].min() > rel[~kept].max()


def test_rect_is_not_top_k_by_magnitude() -> None:
    # The largest |Δ| sits on a huge weight (a small relative change), the smallest |Δ| on a
    # tiny weight (a large one): RECT keeps the second and drops the first.
    delta = torch.tensor([[10.0, 1.0, 0.1, 2.0]])
    weight = torch.tensor([[1e6, 1.0, 1e-4, 1.0]])
    assert torch.equal(rect(delta, weight, 0.5), torch.tensor([[0.0, 0.0, 0.1, 2.0]]))


def test_rect_counts_a_moved_zero_weight_as_the_largest_change() -> None:
    delta = torch.tensor([[1e-6, 5.0, 0.0, 1.0]])
    weight = torch.tensor([[0.0, 1.0, 0.0, 1.0]])
    assert torch.equal(rect(delta, weight, 0.25), torch.tensor([[1e-6, 0.0, 0.0, 0.0]]))


def test_rect_fusion_reads_the_weights_the_step_edits() -> None:
    # W_{t−1} = W₀ + the increments applied so far, not W₀: after one applied step the
    # criterion changes with the weights.
    weights = edited((16, 12))
    first = {"0.weight": torch.randn(16, 12, generator=gen(2))}
    weights.add(first)
    delta = {"0.weight": torch.randn(16, 12, generator=gen(3))}
    fusion = bind_weights(Rect(k=0.3), weights)
    out = fusion.step(fusion.init_state(), delta, gen(0))[1]["0.weight"]
    assert torch.equal(out, rect(delta["0.weight"], weights.current("0.weight"), 0.3))
    assert torch.equal(weights.current("0.weight"),
                       weights.unedited("0.weight") + first["0.weight"])
    assert not torch.equal(out, rect(delta["0.weight"], weights.unedited("0.weight"), 0.3))


def test_rect_at_layer_scope_fuses_each_weight_alike() -> None:
    weights = edited((8, 6), (6, 8))
    deltas = {"0.weight": torch.randn(8, 6, generator=gen(4)),
              "1.weight": torch.randn(6, 8, generator=gen(5))}
    fusion = bind_weights(Rect(k=0.5, scope="layer"), weights)
    layer = fusion.layer_fusion(seed=0, step=1)
    assert layer is not None
    _, out = layer.step(FusionState(), deltas, gen(0))
    for n, d in deltas.items():
        assert torch.equal(out[n], layer.fuse(n, d))
        assert torch.equal(out[n], rect(d, weights.current(n), 0.5))


def test_unbound_stabilisers_say_what_is_missing() -> None:
    for fusion in (Rect(), Prune()):
        assert isinstance(fusion, FusionStrategy)
        with pytest.raises(RuntimeError, match="bind_weights"):
            fusion.step(fusion.init_state(), {"w": torch.ones(2, 2)}, gen(0))
    assert isinstance(edited((2, 2)), WeightReader)


@pytest.mark.parametrize(("overrides", "message"), [
    (["fusion=rect", "fusion.k=0"], r"fusion.k=0 must be in \(0, 1\]"),
    (["fusion=rect", "fusion.k=1.5"], r"fusion.k=1.5 must be in \(0, 1\]"),
    (["fusion=prune", "fusion.log_base=1.0"], r"fusion.log_base=1.0 must be .* > 1"),
    (["fusion=prune", "fusion.scope=layer"], r"fusion.scope='layer'.*valid: \['step'\]"),
    (["++model.edit.target.nas_anchor=-2"], r"nas_anchor=-2 must be a finite number > 0"),
    (["++model.edit.target.nas_skip_factor=0.5"], r"nas_skip_factor=0.5 must be in \[1, inf\]"),
])
def test_bad_values_are_one_config_error(compose: Compose, overrides: list[str],
                                         message: str) -> None:
    cfg = compose(overrides)
    with pytest.raises(ConfigError, match=message):
        setup.build(cfg.fusion)
        setup.build(cfg.method, _convert_="all")


# ---------------------------------------------------------------------------------- PRUNE
def with_spectrum(s: list[float], m: int = 12, n: int = 9, seed: int = 0) -> torch.Tensor:
    """A float32 ``[m, n]`` matrix with singular values ``s`` (up to its own rounding)."""
    u, _ = torch.linalg.qr(torch.randn(m, len(s), generator=gen(seed), dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, len(s), generator=gen(seed + 1), dtype=torch.float64))
    return ((u * torch.tensor(s, dtype=torch.float64)) @ v.T).float()


def restraint_bound(edit: torch.Tensor, out: torch.Tensor) -> float:
    """How far the singular values of ``out`` (float32) may be from the exact restraint of
    ``edit``'s: rounding ``out`` to float32 moves each entry by ≤ u₃₂·|entry|, a perturbation
    of spectral norm ≤ u₃₂·‖out‖_F, and by Weyl's inequality each σ by no more; the float64
    SVD and product are backward stable, ≤ γ_{mn}(u₆₄)·‖edit‖_F (a generous p(m, n) = mn)."""
    m, n = edit.shape
    return U32 * float(out.double().norm()) + gamma(m * n, U64) * float(edit.double().norm())


def expected_restraint(s: torch.Tensor, sigma0: float, base: float = math.e) -> torch.Tensor:
    return torch.where(s > sigma0, sigma0 + torch.log(s / sigma0) / math.log(base), s)


@pytest.mark.parametrize("base", [math.e, 2.0, 1.2])
def test_prune_reduces_the_singular_values_above_sigma0(base: float) -> None:
    edit, sigma0 = with_spectrum([40.0, 9.0, 3.5, 2.0, 0.5, 0.01]), 3.0
    out = restrain_spectrum(edit, sigma0, base)
    s_in = torch.linalg.svdvals(edit.double())  # the input's own σ (float32-rounded)
    s_out = torch.linalg.svdvals(out.double())
    bound = restraint_bound(edit, out)
    want = expected_restraint(s_in, sigma0, base)
    assert float((s_out - want).abs().max()) <= bound
    # the defining bound: above σ0 only logarithmic growth; at or below σ0 unchanged
    assert float(s_out.max()) <= sigma0 + math.log(float(s_in.max()) / sigma0, base) + bound
    below = s_in <= sigma0
    assert float((s_out[below] - s_in[below]).abs().max()) <= bound
    # the singular vectors stay: out = U diag(σ̂) Vᵀ with edit's U and V
    u, _, vh = torch.linalg.svd(edit.double(), full_matrices=False)
    assert float(((u.T @ out.double() @ vh.T) - torch.diag(want)).abs().max()) <= 2 * bound


def test_prune_leaves_small_edits_unchanged() -> None:
    edit = with_spectrum([2.0, 1.0, 0.5])  # ‖·‖_F ≈ 2.29 ≤ σ0
    out = restrain_spectrum(edit, sigma0=2.5)
    assert torch.equal(out, edit) and out.data_ptr() != edit.data_ptr()
    # all σ ≤ σ0 but ‖·‖_F > σ0: through the SVD, equal up to its rounding
    edit = with_spectrum([2.0, 2.0, 2.0])
    out = restrain_spectrum(edit, sigma0=2.4)
    assert float((out.double() - edit.double()).norm(p=2)) <= restraint_bound(edit, out)


def test_prune_fusion_serves_the_restrained_accumulated_edit() -> None:
    weights = edited((12, 9))
    w0 = weights.unedited("0.weight")
    sigma0 = spectral_norm(w0)
    steps = [with_spectrum([6 * sigma0, 0.1], seed=2), with_spectrum([4 * sigma0, 0.2], seed=4)]
    fusion = bind_weights(Prune(), weights)
    state = fusion.init_state()
    for delta in steps:
        state, inc = fusion.step(state, {"0.weight": delta}, gen(0))
        assert torch.equal(inc["0.weight"], delta)  # the method edits the unrestrained sum
        weights.add(inc)
    total = steps[0] + steps[1]
    assert torch.equal(state.group("edited")["0.weight"], total)
    # σ_max(W₀), taken at the first edit, not from the edited weights
    assert float(state.group("sigma0")["0.weight"]) == sigma0
    offset = Prune().served_offset(state)["0.weight"]  # needs no weights: all in the state
    served = total + offset
    want = restrain_spectrum(total, sigma0)
    # (want − total) and + total each round once, by ≤ u₃₂ of terms ≤ |want| + |total|
    assert_within(served, want, 3 * U32 * (want.double().abs() + total.double().abs()))
    s = torch.linalg.svdvals(served.double())
    bound = restraint_bound(total, served) + 4 * U32 * float(served.double().norm())
    assert float(s.max()) <= sigma0 + math.log(float(torch.linalg.matrix_norm(
        total.double(), ord=2)) / sigma0) + bound
    # small edits: nothing to serve differently
    small = Prune().step(FusionState(tensors={"sigma0": {"w": torch.tensor([1.0],
                         dtype=torch.float64)}}), {"w": torch.full((3, 3), 0.1)}, gen(0))[0]
    assert Prune().served_offset(small) == {}


def test_prune_takes_sigma0_from_the_unedited_weights() -> None:
    weights = edited((12, 9))
    w0 = weights.unedited("0.weight")
    weights.add({"0.weight": 5 * torch.randn(12, 9, generator=gen(6))})  # edited before
    fusion = bind_weights(Prune(), weights)
    state, _ = fusion.step(FusionState(), {"0.weight": torch.randn(12, 9, generator=gen(7))},
                           gen(0))
    sigma0 = float(state.group("sigma0")["0.weight"])
    assert sigma0 == spectral_norm(w0) != spectral_norm(weights.current("0.weight"))


def test_prune_state_survives_a_checkpoint(tmp_path: Path) -> None:
    weights = edited((10, 7), (7, 10))
    fusion = bind_weights(Prune(), weights)
    deltas = [{"0.weight": torch.randn(10, 7, generator=gen(10 + t)) * 3,
               "1.weight": torch.randn(7, 10, generator=gen(20 + t)) * 3} for t in range(4)]
    state = fusion.init_state()
    for d in deltas[:2]:
        state, inc = fusion.step(state, d, gen(0))
        weights.add(inc)
    checkpoint.save(tmp_path, RunState(step=2), weights.total, {}, state.flat())
    loaded = checkpoint.load(tmp_path)
    assert loaded is not None
    resumed = FusionState.from_flat(loaded.fusion_state)
    assert resumed.steps == 2 and set(resumed.tensors) == {"edited", "sigma0"}
    for d in deltas[2:]:
        state, _ = fusion.step(state, d, gen(0))
        resumed, _ = Prune().step(resumed, d, gen(0))  # σ0 known: no weights needed
    for g in ("edited", "sigma0"):
        a, b = state.group(g), resumed.group(g)
        assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    a, b = Prune().served_offset(state), Prune().served_offset(resumed)
    assert a and a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


# ------------------------------------------------------------------------------------ NAS
def test_nas_rescales_to_the_anchor_and_drops_outliers() -> None:
    d, anchor, factor = 48, 5.0, 2.0
    v0 = torch.randn(5, d, generator=gen(0))
    direction = torch.randn(5, d, generator=gen(1))
    norms = torch.tensor([0.5, 4.0, 7.5, 10.0, 10.5])[:, None]  # ≤ 2·anchor for the first 4
    v_star = direction / direction.norm(dim=1, keepdim=True) * norms
    v_star[0] = 0.0  # a zero vector has no direction: it stays
    out = nas_scale(v_star, v0, anchor, factor)
    # rows 1-3: norm the anchor, same direction (below the anchor scaled up, above down)
    got = out[1:4].double().norm(dim=1)
    # two norms of d terms and a scaling: ≤ γ_{2d+2}(u₃₂) relative
    assert float((got - anchor).abs().max()) <= gamma(2 * d + 2) * anchor
    cos = (out[1:4].double() * v_star[1:4].double()).sum(1) / (got * norms[1:4, 0].double())
    assert float((cos - 1).abs().max()) <= gamma(3 * d + 4)
    assert torch.equal(out[0], v_star[0])
    assert torch.equal(out[4], v0[4])  # above 2·anchor: not edited (v* = v0)


def test_upper_trimmed_mean_drops_the_top_five_percent() -> None:
    values = torch.arange(1.0, 21.0)  # 20 values: floor(0.05·20) = 1 dropped
    assert upper_trimmed_mean(values) == pytest.approx(sum(range(1, 20)) / 19, rel=4 * U64)
    assert upper_trimmed_mean(values[:19]) == pytest.approx(10.0, rel=4 * U64)  # 0 dropped


REQUESTS = [
    EditRequest("a", "Paris", "A song about {}", "Rome"),
    EditRequest("b", "Toyota", "I bought a {}", "car"),
    EditRequest("c", "Leonhard Euler", "Number theory by {}", "Gauss"),
]


@pytest.mark.parametrize("model", ["tiny_llama", "tiny_gptj"])
def test_optimize_targets_with_nas_anchors_the_value_vectors(compose: Compose,
                                                             model: str) -> None:
    lm = load_tiny(compose, model)
    cfg = TargetConfig(steps=6, clamp_norm_factor=4.0)
    layer = lm.spec.module("layer", 2)
    mlp = lm.spec.module("mlp_out", 2)
    init, delta = optimize_targets(lm, REQUESTS, ["{}"], [layer], cfg)[layer]
    v0 = hidden_at_subject(lm, mlp, REQUESTS)
    v_star = v0 + delta
    norms = v_star.norm(dim=1)

    # an anchor above every ‖v*‖ / 2: every v* is rescaled to it (up or down)
    anchor = float(norms.max()) * 0.75
    on = optimize_targets(lm, REQUESTS, ["{}"], [layer], TargetConfig(
        steps=6, clamp_norm_factor=4.0, nas_anchor=anchor))[layer]
    assert torch.equal(on[0], init)
    assert torch.equal(on[1], nas_scale(v_star, v0, anchor, 2.0) - v0)
    # ‖v*'‖ = anchor within γ_{d+2}(u₃₂) (a norm of d terms, a division, a product);
    # δ' = v*' − v0 and v0 + δ' round each entry once more, by ≤ u₃₂·(2|v*'| + |v0|) in
    # all ≤ 2u₃₂·(2·anchor + ‖v0‖); the norm taken here adds γ_d·anchor.
    d = v0.shape[1]
    v0_norm = float(v0.norm(dim=1).max())
    bound = (gamma(d + 2) + gamma(d)) * anchor + 2 * U32 * (2 * anchor + v0_norm)
    assert float(((v0 + on[1]).norm(dim=1) - anchor).abs().max()) <= bound

    # an anchor below every ‖v*‖ / 2: no request is edited (δ = v0 − v0 = 0)
    off = optimize_targets(lm, REQUESTS, ["{}"], [layer], TargetConfig(
        steps=6, clamp_norm_factor=4.0, nas_anchor=float(norms.min()) / 2.5))[layer]
    assert torch.equal(off[1], torch.zeros_like(delta))

    # at an MLP output (ROME, PMET's δᵐ) v0 is the target's own init; attention untouched
    attn = lm.spec.module("attn_out", 2)
    plain = optimize_targets(lm, REQUESTS, ["{}"], [attn, mlp], cfg)
    nas = optimize_targets(lm, REQUESTS, ["{}"], [attn, mlp], TargetConfig(
        steps=6, clamp_norm_factor=4.0, nas_anchor=anchor, nas_skip_factor=math.inf))
    assert torch.equal(nas[attn][1], plain[attn][1])
    m_init, m_delta = plain[mlp]
    assert torch.equal(nas[mlp][1], nas_scale(m_init + m_delta, m_init, anchor, math.inf)
                       - m_init)


def test_rome_reads_its_own_nas_skip_factor(compose: Compose) -> None:
    cfg = compose(["method=rome", "++model.edit.target.nas_anchor=3.5"])
    method = setup.build(cfg.method, _convert_="all")
    assert (method.target.nas_anchor, method.target.nas_skip_factor) == (3.5, 5.0)
    memit = setup.build(compose(["method=memit", "++method.target.nas_anchor=3.5"]).method,
                             _convert_="all")
    assert (memit.target.nas_anchor, memit.target.nas_skip_factor) == (3.5, 2.0)
    assert setup.build(compose([]).method, _convert_="all").target.nas_anchor is None


# ---------------------------------------------------------------------- runs of the recipe
def test_rect_run_applies_the_kept_fraction(
    compose: Compose, tiny_run_overrides: list[str], tmp_path: Path,
) -> None:
    run_dir = tmp_path / "rect"
    summary = experiment.run(compose([*tiny_run_overrides, "fusion=rect", "fusion.k=0.3",
                                      "save_step_deltas=true"]), run_dir=str(run_dir))
    assert summary["steps"] == 2 and summary["steps_failed"] == 0
    for step in (1, 2):
        fused = load_file(str(run_dir / "deltas" / f"step-{step:04d}-fused.safetensors"))
        raw = load_file(str(run_dir / "deltas" / f"step-{step:04d}.safetensors"))
        assert fused.keys() == raw.keys() and fused
        for name, f in fused.items():
            n = f.numel()
            assert int((f != 0).sum()) == n - int(n * 0.7)
            assert torch.equal(f[f != 0], raw[name][f != 0])


def test_prune_run_serves_the_restrained_edit_and_resumes_bit_identically(
    compose: Compose, tiny_run_overrides: list[str], tmp_path: Path,
) -> None:
    overrides = [*tiny_run_overrides, "fusion=prune", "schedule.n_edits=4",
                 "schedule.batch_size=1", "save_deltas=true", "method.lam=1.0"]
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    ref = experiment.run(compose(overrides), run_dir=str(ref_dir))
    with memit_crashes_at_call(3), pytest.raises(RuntimeError, match="simulated crash"):
        experiment.run(compose(overrides), run_dir=str(run_dir))
    resumed = experiment.run(compose([*overrides, f"resume={run_dir}"]))
    assert resumed["steps"] == ref["steps"] == 4
    a, b = (pd.read_csv(d / "metrics.csv") for d in (ref_dir, run_dir))
    cols = [c for c in a.columns if not c.startswith("time/")]
    pd.testing.assert_frame_equal(a[cols], b[cols])
    served_ref, served = (load_file(str(d / "deltas.safetensors")) for d in (ref_dir, run_dir))
    assert served_ref.keys() == served.keys()
    assert all(torch.equal(served_ref[k], served[k]) for k in served)

    # the saved weights are W₀ + F(E), E and σ_max(W₀) as the last checkpoint holds them
    ckpt = checkpoint.load(ref_dir)
    assert ckpt is not None
    state = FusionState.from_flat(ckpt.fusion_state)
    edits, sigma0 = state.group("edited"), state.group("sigma0")
    assert edits.keys() == served.keys() == ckpt.deltas.keys()
    restrained = 0
    for name, e in edits.items():
        assert torch.equal(e, ckpt.deltas[name])  # E is the working weights' total
        assert torch.equal(served[name], e + Prune().served_offset(state).get(
            name, torch.zeros_like(e)))
        restrained += float(torch.linalg.matrix_norm(e.double(), ord=2)) > float(sigma0[name])
    assert restrained  # the run's edits were large enough for PRUNE to act


def test_nas_run_with_an_anchor_from_the_unedited_model(
    compose: Compose, tiny_run_overrides: list[str], tmp_path: Path,
) -> None:
    from kaedit.nas_anchor import anchor_for

    anchor = anchor_for(tiny_run_overrides, n=8)
    assert math.isfinite(anchor) and anchor > 0
    overrides = [*tiny_run_overrides, "fusion=add", f"++model.edit.target.nas_anchor={anchor}"]
    summary = experiment.run(compose(overrides), run_dir=str(tmp_path / "nas"))
    assert summary["steps"] == 2 and summary["steps_failed"] == 0
    assert f"nas_anchor: {anchor}" in (tmp_path / "nas" / "config.yaml").read_text()
