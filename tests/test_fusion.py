"""Fusion strategies (paper §3.2, eq. 5; §6.1): statistics, determinism, purity, and the
stateful baselines of Fig. 5 against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from kaedit.fusion import (
    Add,
    DropRescale,
    FusionState,
    FusionStrategy,
    Lookahead,
    MatchedNoise,
    RunningAverage,
    TopK,
    WiseFT,
    drop_rescale,
    lookahead,
    matched_noise,
    running_average,
    top_k,
    wise_ft_offset,
)

N = 1_000_000


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("p", [0.5, 0.8, 0.9])
def test_drop_rescale_statistics(p: float) -> None:
    out = DropRescale(p)({"w": torch.ones(1000, N // 1000)}, gen(0))["w"]
    dropped = (out == 0).float().mean().item()
    assert abs(dropped - p) < 5 * math.sqrt(p * (1 - p) / N)  # 5 binomial std
    survivors = out[out != 0]
    assert torch.equal(survivors, torch.full_like(survivors, 1 / (1 - p)))
    # E[Δ̂] = Δ: std of the mean of N draws of (Bernoulli(1-p) / (1-p)) is sqrt(p/(1-p)/N).
    assert abs(out.mean().item() - 1.0) < 5 * math.sqrt(p / (1 - p) / N)


def test_drop_rescale_seeded() -> None:
    deltas = {"a": torch.randn(64, 32), "b": torch.randn(32, 64)}
    first = DropRescale(0.8)(deltas, gen(1))
    again = DropRescale(0.8)(deltas, gen(1))
    other = DropRescale(0.8)(deltas, gen(2))
    assert all(torch.equal(first[n], again[n]) for n in deltas)
    assert all(not torch.equal(first[n], other[n]) for n in deltas)


def test_drop_rescale_mask_ignores_dict_order() -> None:
    a, b = torch.randn(16, 8), torch.randn(8, 16)
    one = DropRescale(0.5)({"a": a, "b": b}, gen(3))
    two = DropRescale(0.5)({"b": b, "a": a}, gen(3))
    assert torch.equal(one["a"], two["a"]) and torch.equal(one["b"], two["b"])


def test_drop_rescale_p_zero_is_a_copy() -> None:
    delta = torch.randn(10, 10)
    out = DropRescale(0.0)({"w": delta}, gen(0))["w"]
    assert torch.equal(out, delta)
    assert out.data_ptr() != delta.data_ptr()


@pytest.mark.parametrize("p", [0.27, 0.5, 0.8])
def test_matched_noise_has_drs_mean_and_variance_and_drops_nothing(p: float) -> None:
    """Issue 28's control: every entry kept, noise √(p/(1−p))·Δ ⊙ Z with the generator's
    own normal draws, so per entry the mean is Δ and the variance p/(1−p)·Δ², DR's."""
    delta = torch.randn(1000, N // 1000, generator=gen(5))
    out = MatchedNoise(p)({"w": delta}, gen(0))["w"]
    c, expect = math.sqrt(p / (1 - p)), torch.randn(delta.shape, generator=gen(0))
    noise = c * delta * expect  # the generator's own draws, scaled
    # Δ + c·Δ·z is two products and a sum in float32: each entry within 3 roundings (u) of
    # |Δ| + |c·Δ·z| of the exact value, on either side (a wrong scale or draw is off by
    # far more).
    bound = 6 * torch.finfo(torch.float32).eps / 2 * (delta.abs() + noise.abs())
    assert ((out - (delta + noise)).abs() <= bound).all()
    assert not (out == 0).any() and not (out == delta).all()
    # The draws are N(0, 1): their mean and variance within 5 standard errors of N draws.
    assert abs(expect.mean().item()) < 5 / math.sqrt(N)
    assert abs(expect.var().item() - 1) < 5 * math.sqrt(2 / N)
    # Against DR with the same p, on the same Δ: the same per-entry E[Δ̂] and Var[Δ̂], so
    # the mean square of (Δ̂ − Δ)/Δ over N entries agrees within 5 standard errors.
    # Relative standard errors of that mean: X = c²z², Var X / (E X)² = 2; for DR,
    # X = (m/(1−p) − 1)², E X = p/(1−p), E X² = p⁴/(1−p)³ + p.
    dr = DropRescale(p)({"w": delta}, gen(1))["w"]
    ex = p / (1 - p)
    dr_rel_sd = math.sqrt(p**4 / (1 - p) ** 3 + p - ex**2) / ex
    for fused, rel_sd in ((out, math.sqrt(2)), (dr, dr_rel_sd)):
        rel = ((fused - delta) / delta).square().mean().item()
        assert rel == pytest.approx(ex, rel=5 * rel_sd / math.sqrt(N))


def test_matched_noise_seeded_p_zero_and_bad_p() -> None:
    deltas = {"a": torch.randn(16, 8), "b": torch.randn(8, 16)}
    one, two = MatchedNoise(0.5)(deltas, gen(3)), MatchedNoise(0.5)(dict(reversed(
        deltas.items())), gen(3))
    assert all(torch.equal(one[n], two[n]) for n in deltas)  # dict order does not matter
    assert not torch.equal(MatchedNoise(0.5)(deltas, gen(4))["a"], one["a"])
    zero = matched_noise(deltas["a"], 0.0, gen(0))
    assert torch.equal(zero, deltas["a"]) and zero.data_ptr() != deltas["a"].data_ptr()
    for p in (1.0, -0.1):
        with pytest.raises(ValueError, match=rf"p={p}"):
            MatchedNoise(p)
        with pytest.raises(ValueError, match=rf"p={p}"):
            matched_noise(torch.ones(3), p, gen(0))


@pytest.mark.parametrize("p", [1.0, -0.1, 1.5])
def test_drop_rescale_invalid_p(p: float) -> None:
    with pytest.raises(ValueError, match=rf"p={p}"):
        DropRescale(p)
    with pytest.raises(ValueError, match=rf"p={p}"):
        drop_rescale(torch.ones(3), p, gen(0))


@pytest.mark.parametrize("k", [0.01, 0.2, 0.5, 1.0])
def test_top_k_keeps_the_largest(k: float) -> None:
    delta = torch.randn(100, 37, generator=gen(0))  # no zeros, no ties
    out = TopK(k)({"w": delta}, gen(0))["w"]
    kept = out != 0
    assert int(kept.sum()) == round(k * delta.numel())
    assert torch.equal(out[kept], delta[kept])  # kept entries unchanged, sign included
    if k < 1.0:
        assert delta[kept].abs().min() >= delta[~kept].abs().max()


def test_top_k_keeps_at_least_one_and_rejects_bad_k() -> None:
    delta = torch.tensor([0.1, -3.0, 2.0])
    assert torch.equal(top_k(delta, 0.01), torch.tensor([0.0, -3.0, 0.0]))
    for k in (0.0, -0.2, 1.5):
        with pytest.raises(ValueError, match=rf"k={k}"):
            TopK(k)
        with pytest.raises(ValueError, match=rf"k={k}"):
            top_k(delta, k)


def test_add_copies() -> None:
    delta = torch.randn(5, 4)
    out = Add()({"w": delta}, gen(0))["w"]
    assert torch.equal(out, delta)
    assert out.data_ptr() != delta.data_ptr()
    out += 1
    assert not torch.equal(out, delta)


@pytest.mark.parametrize("fusion", [Add(), TopK(0.3), DropRescale(0.7)], ids=repr)
def test_fusions_leave_inputs_alone(fusion) -> None:
    deltas = {"a": torch.randn(20, 10), "b": torch.randn(10, 20)}
    originals = {n: d.clone() for n, d in deltas.items()}
    out = fusion(deltas, gen(0))
    assert set(out) == set(deltas)
    for n, d in deltas.items():
        assert torch.equal(d, originals[n])
        assert out[n].shape == d.shape and out[n].dtype == d.dtype


# ------------------------------------------------ stateful strategies (paper §6.1, Fig. 5)
def run_strategy(fusion, steps: list[float]) -> list[tuple[float, float]]:
    """Feed 1x1 deltas Δ_t = steps[t] through ``fusion``; after each step the (working,
    served) weights relative to W₀ (the running sum of increments, plus the served offset)."""
    state, working, out = fusion.init_state(), 0.0, []
    for t, value in enumerate(steps, start=1):
        state, inc = fusion.step(state, {"w": torch.tensor([[value]])}, gen(t))
        assert state.steps == t
        working += float(inc["w"])
        offset = fusion.served_offset(state)
        out.append((working, working + float(offset["w"]) if "w" in offset else working))
    return out


def test_running_average_hand_computed() -> None:
    # W_t − W₀ = mean(Δ_1..Δ_t): 2, (2+4)/2 = 3, (2+4+9)/3 = 5; served = working
    got = run_strategy(RunningAverage(), [2.0, 4.0, 9.0])
    assert got == [(2.0, 2.0), (3.0, 3.0), (5.0, 5.0)]


def test_lookahead_hand_computed() -> None:
    # k = 2, α = 0.5. Fast θ, slow φ (relative to W₀), Δ = 2, 4, 6, 10:
    # t=1: θ = 2, φ = 0.   t=2: θ = 6 → φ = 0 + 0.5(6 − 0) = 3, θ ← 3.
    # t=3: θ = 9, φ = 3.   t=4: θ = 19 → φ = 3 + 0.5(19 − 3) = 11, θ ← 11.
    got = run_strategy(Lookahead(k=2, alpha=0.5), [2.0, 4.0, 6.0, 10.0])
    assert got == [(2.0, 0.0), (3.0, 3.0), (9.0, 3.0), (11.0, 11.0)]
    fast = run_strategy(Lookahead(k=2, alpha=0.5, evaluate="fast"), [2.0, 4.0, 6.0, 10.0])
    assert fast == [(2.0, 2.0), (3.0, 3.0), (9.0, 9.0), (11.0, 11.0)]


def test_lookahead_k1_alpha1_is_vanilla_addition() -> None:
    assert run_strategy(Lookahead(k=1, alpha=1.0), [2.0, -1.0, 4.0]) == [
        (2.0, 2.0), (1.0, 1.0), (5.0, 5.0)]


def test_wise_ft_hand_computed() -> None:
    # α = 0.25: the method edits θ = W₀ + ΣΔ (4, 12); served (1−α)W₀ + αθ → 1, 3
    got = run_strategy(WiseFT(alpha=0.25), [4.0, 8.0])
    assert got == [(4.0, 1.0), (12.0, 3.0)]
    assert run_strategy(WiseFT(alpha=1.0), [4.0, 8.0]) == [(4.0, 4.0), (12.0, 12.0)]


def test_pure_step_functions() -> None:
    mean, inc = running_average(torch.tensor([3.0]), torch.tensor([9.0]), n=2)
    assert torch.equal(mean, torch.tensor([5.0])) and torch.equal(inc, torch.tensor([2.0]))
    pending, inc = lookahead(torch.tensor([6.0]), torch.tensor([10.0]), step=4, k=2, alpha=0.5)
    assert torch.equal(pending, torch.tensor([0.0])) and torch.equal(inc, torch.tensor([2.0]))
    pending, inc = lookahead(torch.tensor([0.0]), torch.tensor([6.0]), step=3, k=2, alpha=0.5)
    assert torch.equal(pending, torch.tensor([6.0])) and torch.equal(inc, torch.tensor([6.0]))
    assert torch.equal(wise_ft_offset(torch.tensor([12.0]), 0.25), torch.tensor([-9.0]))


@pytest.mark.parametrize("fusion", [RunningAverage(), Lookahead(k=2), WiseFT(0.5)], ids=repr)
def test_stateful_fusions_are_pure(fusion) -> None:
    deltas = {"a": torch.randn(6, 4), "b": torch.randn(4, 6)}
    originals = {n: d.clone() for n, d in deltas.items()}
    state = fusion.init_state()
    s1, inc1 = fusion.step(state, deltas, gen(0))
    frozen = {g: {n: t.clone() for n, t in ts.items()} for g, ts in s1.tensors.items()}
    _, inc2 = fusion.step(state, deltas, gen(0))  # same input state -> same result
    assert all(torch.equal(inc1[n], inc2[n]) for n in deltas)
    fusion.step(s1, deltas, gen(1))  # stepping on does not change s1
    assert all(torch.equal(s1.tensors[g][n], frozen[g][n]) for g in frozen for n in frozen[g])
    assert all(torch.equal(deltas[n], originals[n]) for n in deltas)
    assert state.steps == 0 and not state.tensors


def test_fusion_state_round_trips_through_its_flat_form() -> None:
    state, _ = Lookahead(k=3).step(Lookahead(k=3).init_state(),
                                   {"x.weight": torch.randn(3, 2)}, gen(0))
    back = FusionState.from_flat(state.flat())
    assert back.steps == 1 and torch.equal(back.tensors["pending"]["x.weight"],
                                           state.tensors["pending"]["x.weight"])
    assert FusionState.from_flat({"steps": 4}) == FusionState(steps=4)


@pytest.mark.parametrize("fusion", [Add(), TopK(0.3), DropRescale(0.7)], ids=repr)
def test_stateless_fusions_are_strategies_with_no_state(fusion) -> None:
    deltas = {"a": torch.randn(20, 10)}
    assert isinstance(fusion, FusionStrategy)
    state, inc = fusion.step(fusion.init_state(), deltas, gen(5))
    assert state == FusionState(steps=1) and fusion.served_offset(state) == {}
    assert torch.equal(inc["a"], fusion(deltas, gen(5))["a"])


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: Lookahead(k=0), "fusion.k=0"),
        (lambda: Lookahead(k=2.5), "fusion.k=2.5"),
        (lambda: Lookahead(alpha=0.0), "fusion.alpha=0.0"),
        (lambda: Lookahead(evaluate="medium"), "fusion.evaluate='medium'.*'slow', 'fast'"),
        (lambda: WiseFT(alpha=1.5), "fusion.alpha=1.5"),
    ],
)
def test_stateful_fusions_reject_bad_parameters(make, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make()


def test_edited_weights_serve_an_offset_and_restore_exactly() -> None:
    from kaedit.weights import EditedWeights

    model = torch.nn.Linear(4, 3, bias=False).to(torch.float16)
    w0 = model.weight.detach().clone()
    edits = EditedWeights(model)
    delta = torch.randn(3, 4)
    edits.add({"weight": delta})
    after_add = model.weight.detach().clone()
    with edits.serving({"weight": -0.75 * delta}):
        expected = (w0.float() + (delta - 0.75 * delta)).to(torch.float16)
        assert torch.equal(model.weight, expected)
    assert torch.equal(model.weight, after_add)
    with edits.serving({}):
        assert torch.equal(model.weight, after_add)


# --------------------------------------------------- scope: inside the layer loop (Alg. 1)
def test_layer_generators_are_per_weight_and_reproducible() -> None:
    from kaedit.fusion import layer_generator

    def draw(seed: int, step: int, name: str) -> torch.Tensor:
        return torch.rand(8, generator=layer_generator(seed, step, name))

    a = "model.layers.3.mlp.down_proj.weight"
    b = "model.layers.4.mlp.down_proj.weight"
    assert torch.equal(draw(0, 1, a), draw(0, 1, a))  # reproducible (resume draws the same)
    # different for every layer, step and run seed
    others = [draw(0, 1, b), draw(0, 2, a), draw(1, 1, a)]
    assert all(not torch.equal(draw(0, 1, a), o) for o in others)


def test_layer_fusion_fuses_each_weight_with_its_own_generator() -> None:
    from kaedit.fusion import LayerFusion, layer_generator

    deltas = {"l1.weight": torch.randn(16, 8), "l2.weight": torch.randn(16, 8)}
    dr = DropRescale(0.5, scope="layer")
    lf = dr.layer_fusion(seed=3, step=7)
    assert isinstance(lf, LayerFusion)
    state, fused = lf.step(FusionState(steps=6), deltas, gen(0))
    assert state == FusionState(steps=7)
    for name, d in deltas.items():
        expected = drop_rescale(d, 0.5, layer_generator(3, 7, name))
        assert torch.equal(fused[name], expected)
        assert torch.equal(lf.fuse(name, d), expected)  # what the layer loop applied
    # same shapes, different generators: different masks per layer
    assert not torch.equal(fused["l1.weight"] == 0, fused["l2.weight"] == 0)
    # step scope: no layer fusion, the step's generator is used
    assert DropRescale(0.5).layer_fusion(3, 7) is None
    assert RunningAverage().layer_fusion(3, 7) is None


@pytest.mark.parametrize("fusion", [Add(scope="layer"), DropRescale(0.0, scope="layer"),
                                    TopK(1.0, scope="layer")], ids=repr)
def test_identity_fusions_are_the_same_at_both_scopes(fusion) -> None:
    deltas = {"a": torch.randn(6, 4), "b": torch.randn(4, 6)}
    _, fused = fusion.layer_fusion(0, 1).step(fusion.init_state(), deltas, gen(0))
    assert all(torch.equal(fused[n], deltas[n]) for n in deltas)


def test_bad_scope_is_a_config_error() -> None:
    from kaedit.errors import ConfigError

    with pytest.raises(ConfigError, match=r"fusion.scope='tensor'.*\['step', 'layer'\]"):
        DropRescale(0.5, scope="tensor")
    for make in (RunningAverage, Lookahead, WiseFT):
        with pytest.raises(ConfigError, match=r"fusion.scope='layer'.*\['step'\]"):
            make(scope="layer")
