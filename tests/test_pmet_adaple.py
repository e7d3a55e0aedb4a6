"""PMET and AdaPLE: deltas on the tiny models, the closed forms of every AdaPLE objective,
and (marked slow) real edits of SmolLM2."""

from __future__ import annotations

from pathlib import Path

import hydra
import pytest
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate

from conftest import (
    FORWARD_REL,
    TINY_MODELS,
    U32,
    Compose,
    assert_close_to_scale,
    assert_within,
    deltas_leaving_model_untouched,
)
from kaedit.data import load_requests
from kaedit.evaluate import CounterFactEval, Scorer
from kaedit.experiment import compose as compose_config
from kaedit.experiment import resolve_data_root
from kaedit.fusion import DropRescale
from kaedit.hooks import count_hooks
from kaedit.methods import objectives
from kaedit.methods.adaple import OBJECTIVES, AdaPLE
from kaedit.methods.base import EditContext, EditMethod
from kaedit.methods.keys import compute_keys, hidden_at_subject
from kaedit.methods.pmet import PMET, spread_mlp_target
from kaedit.methods.solve import solve_update
from kaedit.methods.templates import context_templates
from kaedit.models import LoadedModel, load_model
from kaedit.weights import applied

METHODS = [
    ("pmet", {}),
    *(("adaple", {"objective": o}) for o in OBJECTIVES),
    ("adaple", {"objective": "memit", "optimize_attention": False}),
]
METHOD_IDS = ["pmet", *OBJECTIVES, "memit-no-attn"]


def tiny_setup(compose: Compose, model: str, method: str) -> tuple:
    cfg = compose([f"model={model}", f"method={method}", "stats.n_tokens=2000"])
    resolve_data_root(cfg)
    lm = load_model(cfg.model, lambda: hydra.utils.instantiate(cfg.model.load))
    ctx = EditContext(lm=lm, stats=instantiate(cfg.stats), templates=["{}", "Hello. {}"])
    return cfg, lm, ctx


def counterfact(cfg) -> str:
    path = Path(cfg.data_root) / "counterfact/counterfact.json"
    if not path.is_file():
        pytest.skip(reason=f"CounterFact not found at {path} (set KAEDIT_DATA)")
    return str(path)


@pytest.fixture(scope="module")
def requests_(compose: Compose) -> list:
    cfg = compose([])
    resolve_data_root(cfg)
    return load_requests(counterfact(cfg), limit=3)


# ------------------------------------------------------------------- methods, tiny models
@pytest.mark.parametrize("model", TINY_MODELS)
@pytest.mark.parametrize(("method", "overrides"), METHODS, ids=METHOD_IDS)
def test_deltas_shape_finite_and_model_untouched(
    compose: Compose, requests_, model: str, method: str, overrides: dict
) -> None:
    cfg, lm, ctx = tiny_setup(compose, model, method)
    m = instantiate(cfg.method, _convert_="all", **overrides)
    assert isinstance(m, EditMethod)
    m.prepare(ctx)
    expected = [lm.spec.weight("mlp_out", layer) for layer in cfg.model.edit.layers]
    deltas_leaving_model_untouched(m, ctx, requests_, expected)


def test_targets_with_and_without_attention_delta(compose: Compose, requests_) -> None:
    cfg, lm, ctx = tiny_setup(compose, "tiny_llama", "adaple")
    layer = cfg.model.edit.layers[-1]
    attn, mlp = lm.spec.module("attn_out", layer), lm.spec.module("mlp_out", layer)

    both = instantiate(cfg.method, _convert_="all").targets(ctx, requests_)
    assert set(both.deltas) == {attn, mlp}
    assert both.deltas[attn].abs().max() > 0
    mlp_only = instantiate(cfg.method, _convert_="all", optimize_attention=False).targets(
        ctx, requests_
    )
    assert set(mlp_only.deltas) == {mlp}
    # z is the MLP output target in both cases: m^L + δᵐ
    init = hidden_at_subject(lm, mlp, requests_)
    for t in (both, mlp_only):
        # z = m^L + δᵐ with m^L from optimize_targets' batched forward, init from the
        # helper's: FORWARD_REL of init's scale apart, then one float32 addition each
        want = init + t.deltas[mlp]
        bound = FORWARD_REL * float(init.abs().max()) + 2 * U32 * want.abs()
        assert_within(t.z, want, bound, msg="z")
    assert count_hooks(lm.model) == 0


def test_adaple_memit_objective_is_pmet(compose: Compose, requests_) -> None:
    # The two methods share their targets and residual spread; only the solve differs.
    cfg, _, ctx = tiny_setup(compose, "tiny_llama", "adaple")
    pmet = instantiate(compose(["model=tiny_llama", "method=pmet"]).method, _convert_="all")
    assert isinstance(pmet, PMET)
    a = instantiate(cfg.method, _convert_="all", objective="memit").compute_deltas(ctx, requests_)
    p = pmet.compute_deltas(ctx, requests_)
    assert a.keys() == p.keys()
    for k in a:
        # the same targets (same code and inputs) and the same float64 solves; AdaPLE's
        # residual (W₀K + r) − W₀K differs from r by ~1e-16 of W₀K, which can flip the
        # float32 rounding of a delta entry (2u) and so the next layer's keys by a few u
        # through one forward; the ridge-bounded solve keeps that within ~100u = 1e-5
        assert_close_to_scale(a[k], p[k], rel=1e-5, msg=k)


@pytest.mark.parametrize("model", TINY_MODELS)
def test_pmet_reaches_mlp_target_with_tiny_lambda(compose: Compose, requests_, model) -> None:
    # λ → 0 and one template: each layer's solve is exact on its keys, so the last layer
    # closes whatever gap remains and the MLP output at L becomes z.
    cfg, lm, ctx = tiny_setup(compose, model, "pmet")
    ctx.templates = ["{}"]
    m = instantiate(cfg.method, _convert_="all", lam=1e-4)
    t = m.targets(ctx, requests_)
    z_module = lm.spec.module("mlp_out", m.layers[-1])
    init = hidden_at_subject(lm, z_module, requests_)
    with applied(lm.model, m.compute_deltas(ctx, requests_)):
        reached = hidden_at_subject(lm, z_module, requests_)
    err = (reached - t.z).norm(dim=1) / (t.z - init).norm(dim=1)
    assert err.max() < 1e-3, err


def test_bad_objective_and_alpha_raise(compose: Compose) -> None:
    with pytest.raises(ValueError, match=r"objective='eq3'.*'paper'.*'exact'.*'memit'"):
        AdaPLE(layers=[1], objective="eq3")
    with pytest.raises((ValueError, InstantiationException), match="bogus"):
        instantiate(
            compose(["model=tiny_llama", "method=adaple", "method.objective=bogus"]).method,
            _convert_="all",
        )
    with pytest.raises(ValueError, match="alpha"):
        AdaPLE(layers=[1], objective="erase", alpha=1.5)
    AdaPLE(layers=[1], objective="paper", alpha=1.5)  # alpha only matters for erase


# --------------------------------------------------------------- closed forms, random data
class Problem:
    """A random single-matrix problem with W₀ the least-squares memory of (K₀, V₀)."""

    def __init__(
        self,
        seed: int = 0,
        d_out: int = 6,
        d_in: int = 9,
        n0: int = 40,
        n: int = 3,
        lam: float = 2.0,
    ) -> None:
        g = torch.Generator().manual_seed(seed)

        def r(*shape: int) -> torch.Tensor:
            return torch.randn(*shape, generator=g, dtype=torch.float64)

        self.lam = lam
        self.K0, self.V0 = r(d_in, n0), r(d_out, n0)  # [d_in, n0], [d_out, n0]
        self.C = self.K0 @ self.K0.T / lam  # so that λC = K₀K₀ᵀ
        self.W0 = self.V0 @ self.K0.T @ torch.linalg.inv(self.K0 @ self.K0.T)  # eq. 7
        self.K = r(d_in, n)  # [d_in, n] edited keys
        self.V1 = self.W0 @ self.K  # eq. 22
        self.V2 = r(d_out, n)  # new values

    def objective(self, W: torch.Tensor, alpha: float) -> torch.Tensor:
        """Eq. 3 with the erase term weighted by α, summed literally over all keys."""
        return (
            (W @ self.K0 - self.V0).pow(2).sum()
            + (W @ self.K - self.V2).pow(2).sum()
            - alpha * (W @ self.K - self.V1).pow(2).sum()
        )

    def grad(self, delta: torch.Tensor, alpha: float) -> torch.Tensor:
        W = (self.W0 + delta.double()).requires_grad_(True)
        self.objective(W, alpha).backward()
        return W.grad


@pytest.mark.parametrize("seed", [0, 1])
def test_exact_update_minimises_eq3(seed: int) -> None:
    p = Problem(seed)
    delta = objectives.exact_update(p.V2, p.V1, p.K, p.C, p.lam)
    assert delta.shape == p.W0.shape and delta.dtype == torch.float32
    # normal equation: Δ λC = (V₂ − V₁)Kᵀ (the K-quadratics cancel)
    # Δ is the float64 solve rounded to float32: ≤ u·|Δ| per entry, ≤ u·|Δ||A| in ΔA; the
    # rest is float64 (~1e-16·cond(A), cond ≈ 5 here), covered by the factor 2
    A = p.lam * p.C
    assert_within(delta.double() @ A, (p.V2 - p.V1) @ p.K.T,
                  2 * U32 * (delta.double().abs() @ A.abs()), msg="ΔλC = (V₂ − V₁)Kᵀ")
    # independently: the gradient of eq. 3 (autograd, literal sums) vanishes at W₀ + Δ,
    # and eq. 3 is convex (Hessian λC ⊗ I), so this is its minimiser ...
    g = p.grad(delta, alpha=1.0)
    assert g.abs().max() < 1e-3 * p.grad(torch.zeros_like(delta), alpha=1.0).abs().max()
    # ... and any perturbation increases it.
    best = p.objective(p.W0 + delta.double(), 1.0)
    for _ in range(5):
        step = 1e-2 * torch.randn(p.W0.shape, dtype=torch.float64)
        assert p.objective(p.W0 + delta.double() + step, 1.0) > best


@pytest.mark.parametrize("alpha", [-1.0, 0.0, 0.5, 0.9])
def test_erase_update_minimises_weighted_eq3(alpha: float) -> None:
    p = Problem(2)
    delta = objectives.erase_update(p.V2, p.V1, p.W0 @ p.K, p.K, p.C, p.lam, alpha)
    rhs = (p.V2 - alpha * p.V1 - (1 - alpha) * p.W0 @ p.K) @ p.K.T
    A = p.lam * p.C + (1 - alpha) * p.K @ p.K.T
    # Δ rounded to float32 (≤ u·|Δ||A| in ΔA), everything else float64: as in eq. 3's test
    assert_within(delta.double() @ A, rhs, 2 * U32 * (delta.double().abs() @ A.abs()),
                  msg="erase normal equation")
    g = p.grad(delta, alpha)
    assert g.abs().max() < 1e-3 * p.grad(torch.zeros_like(delta), alpha).abs().max()


def test_memit_and_exact_are_the_ends_of_erase() -> None:
    p = Problem(3)
    w0k = p.W0 @ p.K
    # one formula reached through different functions: the same float64 operations on the
    # same inputs (the extra terms, 0·V₁ and 0·KKᵀ, are exact zeros), so identical
    assert_close_to_scale(
        objectives.memit_update(p.V2, w0k, p.K, p.C, p.lam),
        solve_update(p.V2 - w0k, p.K, p.C, p.lam), rel=1e-6, msg="memit",
    )
    assert_close_to_scale(
        objectives.erase_update(p.V2, p.V1, w0k, p.K, p.C, p.lam, 0.0),
        objectives.memit_update(p.V2, w0k, p.K, p.C, p.lam), rel=1e-6, msg="erase α=0",
    )
    assert_close_to_scale(
        objectives.erase_update(p.V2, p.V1, w0k, p.K, p.C, p.lam, 1.0),
        objectives.exact_update(p.V2, p.V1, p.K, p.C, p.lam), rel=1e-6, msg="erase α=1",
    )


def test_paper_update_is_eq4_and_what_it_minimises() -> None:
    p = Problem(4)
    w0k = p.W0 @ p.K
    delta = objectives.paper_update(p.V2, w0k, p.K, p.C, p.lam)
    # eq. 4 as printed: Δ(λC + 2KKᵀ) = R Kᵀ, R = V₂ − 3W₀K
    R = p.V2 - 3 * w0k
    A = p.lam * p.C + 2 * p.K @ p.K.T
    # Δ rounded to float32 (≤ u·|Δ||A| in ΔA), everything else float64: as in eq. 3's test
    rounding = 2 * U32 * (delta.double().abs() @ A.abs())
    assert_within(delta.double() @ A, R @ p.K.T, rounding, msg="eq. 4 normal equation")
    # it is not the minimiser of eq. 3 ...
    assert p.grad(delta, 1.0).abs().max() > 1e-2
    # ... but of ‖WK₀ − V₀‖² + 2‖WK − ½(V₂ − W₀K)‖²
    def grad_j(W: torch.Tensor) -> torch.Tensor:
        W = W.detach().requires_grad_(True)
        J = (W @ p.K0 - p.V0).pow(2).sum() + 2 * (W @ p.K - (p.V2 - w0k) / 2).pow(2).sum()
        J.backward()
        return W.grad.abs().max()

    # ∇J = 2(W − W*)(K₀K₀ᵀ + 2KKᵀ) = 2(W − W*)A: at W₀ + Δ it is 2·(Δ's float32 rounding)·A,
    # ≤ 2u·|Δ||A| elementwise (the bound above, twice); float64 autograd adds ~1e-14
    assert grad_j(p.W0 + delta.double()) <= 2 * float(rounding.max())
    # and it moves the weights for an edit that changes nothing (V₂ = W₀K); the others don't
    assert objectives.paper_update(w0k, w0k, p.K, p.C, p.lam).abs().max() > 1e-2
    for upd in (
        objectives.exact_update(w0k, w0k, p.K, p.C, p.lam),
        objectives.memit_update(w0k, w0k, p.K, p.C, p.lam),
        objectives.erase_update(w0k, w0k, w0k, p.K, p.C, p.lam, 0.5),
    ):
        assert upd.abs().max() < 1e-6


def test_adaple_solve_maps_residual_onto_each_objective() -> None:
    # V₂ = W₀K + r, V₁ = W₀K: paper → R = r − 2W₀K; the others → residual r.
    p = Problem(5)
    r = p.V2 - p.W0 @ p.K
    solve = {o: AdaPLE(layers=[0], lam=p.lam, objective=o, alpha=0.5).solve for o in OBJECTIVES}
    args = (r.float(), p.K.float(), p.C.float(), p.W0.float())
    # float32 inputs to the method vs float64 ones to solve_update: r, K, C, W₀ each
    # rounded by u, amplified by cond(λC + cKKᵀ) ≈ (√n₀ + √d_in)²/(√n₀ − √d_in)² ≈ 8
    # (K₀K₀ᵀ = λC with K₀ a 9×40 Gaussian: the Marchenko-Pastur edges; cKKᵀ ⪰ 0 only
    # lowers it): ~4·8·u ≈ 2e-6 of the delta's norm; 1e-5 leaves 5× for the max-norm
    # and the output rounding
    rel = 1e-5
    assert_close_to_scale(
        solve["paper"](*args), solve_update(r - 2 * p.W0 @ p.K, p.K, p.C, p.lam, 2.0), rel, "paper"
    )
    assert_close_to_scale(
        solve["exact"](*args), solve_update(r, p.K, p.C, p.lam, 0.0), rel, "exact"
    )
    assert_close_to_scale(
        solve["memit"](*args), solve_update(r, p.K, p.C, p.lam, 1.0), rel, "memit"
    )
    assert_close_to_scale(
        solve["erase"](*args), solve_update(r, p.K, p.C, p.lam, 0.5), rel, "erase"
    )
    # Algorithm 1's line: Δ = r Kᵀ(λC + 2KKᵀ)⁻¹ = erase at α = −1
    assert_close_to_scale(
        solve["algorithm1"](*args), solve_update(r, p.K, p.C, p.lam, 2.0), rel, "algorithm1"
    )
    # one function reached two ways with the same float64 inputs (V₁ is W₀K): identical
    assert_close_to_scale(
        objectives.algorithm1_update(p.V2, p.W0 @ p.K, p.K, p.C, p.lam),
        objectives.erase_update(p.V2, p.V1, p.W0 @ p.K, p.K, p.C, p.lam, -1.0), 1e-6,
        "algorithm1 = erase(-1)")


def test_adaple_default_is_algorithm1(compose: Compose) -> None:
    assert AdaPLE(layers=[1]).objective == "algorithm1"
    m = instantiate(compose(["model=tiny_llama", "method=adaple"]).method, _convert_="all")
    assert m.objective == "algorithm1" and m.optimize_attention


# ------------------------------------------- fusion.scope=layer: DR inside the layer loop
def scoped_spread(ctx, requests, m, z, fuse=None):
    """AdaPLE's residual spread of target ``z`` with ``fuse`` in the layer loop (or not)."""
    covs = ctx.stats.get(ctx.lm, m.layers)
    return spread_mlp_target(ctx.lm, requests, ctx.templates, m.layers, z,
                             lambda layer, r, k, w: m.solve(r, k, covs[layer], w), fuse=fuse)


@pytest.mark.parametrize(("method", "objective"), [("adaple", "algorithm1"), ("memit", None),
                                                   ("alphaedit", None)])
def test_layer_scope_at_p0_gives_the_step_scope_deltas(compose: Compose, requests_,
                                                       method: str, objective) -> None:
    cfg, _, ctx = tiny_setup(compose, "tiny_llama", method)
    m = instantiate(cfg.method, _convert_="all", **({"objective": objective} if objective
                                                     else {}))
    m.prepare(ctx)
    step = m.compute_deltas(ctx, requests_)
    lf = DropRescale(0.0, scope="layer").layer_fusion(seed=0, step=1)
    ctx.layer_fusion = lf.fuse
    layer = m.compute_deltas(ctx, requests_)
    assert step.keys() == layer.keys()
    assert all(torch.equal(step[n], layer[n]) for n in step)


def test_layer_scope_compensates_earlier_layers_drops(compose: Compose, requests_) -> None:
    # λ → 0, one template: each layer's solve is exact on its key, so in the layer scope
    # the last layer closes whatever the dropped earlier updates left, and after all the
    # fused updates m^L − z is exactly the last layer's own drop error (Δ̂_L − Δ_L) k_L.
    # The step scope solves on the undropped earlier updates: its m^L also carries their
    # drop errors. Both scopes use the same masks (one LayerFusion per seed).
    cfg, lm, ctx = tiny_setup(compose, "tiny_llama", "adaple")
    ctx.templates = ["{}"]
    m = instantiate(cfg.method, _convert_="all", layers=[0, 1, 2], lam=1e-4,
                    objective="memit")
    z = m.targets(ctx, requests_).z  # [n, d]
    last = m.layers[-1]
    z_module = lm.spec.module("mlp_out", last)
    init = hidden_at_subject(lm, z_module, requests_)
    step_raw = scoped_spread(ctx, requests_, m, z)

    def error(fused) -> torch.Tensor:  # ‖m^L − z‖ / ‖z − m^L_unedited‖ per request
        with applied(lm.model, fused):
            reached = hidden_at_subject(lm, z_module, requests_)
        return (reached - z).norm(dim=1) / (z - init).norm(dim=1)

    layer_err, step_err = [], []
    for seed in range(12):
        lf = DropRescale(0.5, scope="layer").layer_fusion(seed=seed, step=1)
        raw = scoped_spread(ctx, requests_, m, z, fuse=lf.fuse)
        fused = {n: lf.fuse(n, d) for n, d in raw.items()}
        layer_err.append(error(fused).mean())
        step_err.append(error({n: lf.fuse(n, d) for n, d in step_raw.items()}).mean())
        if seed == 0:  # the exact decomposition, on one seed
            name = lm.spec.weight("mlp_out", last)
            earlier = {n: d for n, d in fused.items() if n != name}
            with applied(lm.model, earlier):
                k = compute_keys(lm, last, requests_, ["{}"])  # [d_in, n]
            with applied(lm.model, fused):
                reached = hidden_at_subject(lm, z_module, requests_)
            own = ((fused[name] - raw[name]) @ k).T  # [n, d] the last layer's drop error
            # rel: a float32 forward pass and a float64 solve at λ = 1e-4 (exact to ~1e-6
            # of the target change without drops; see the p = 0 check above)
            assert_close_to_scale(reached - z, own, 1e-3, "m^L − z = (Δ̂_L − Δ_L) k_L")
    layer_err, step_err = torch.stack(layer_err), torch.stack(step_err)
    # Closer on average over the 12 masks, and for most single masks (10 of 12 measured;
    # the last layer's own drop error, common to both, is most of the remaining gap).
    assert layer_err.mean() < 0.95 * step_err.mean(), (layer_err, step_err)
    assert int((layer_err < step_err).sum()) >= 8, (layer_err, step_err)


# ------------------------------------------------------------------------ real model (slow)
@pytest.fixture(scope="module")
def smollm2():
    cfg = compose_config()
    resolve_data_root(cfg)
    lm: LoadedModel = load_model(cfg.model, lambda: instantiate(cfg.model.load))
    templates = context_templates(lm, [tuple(s) for s in cfg.templates.specs], seed=cfg.seed)
    ctx = EditContext(lm=lm, stats=instantiate(cfg.stats), templates=templates)
    reqs = load_requests(counterfact(cfg), limit=5)
    return ctx, reqs


@pytest.mark.slow
@pytest.mark.parametrize("method", ["pmet", "adaple"])
def test_smollm2_edits_take_effect(smollm2, method: str) -> None:
    ctx, reqs = smollm2
    mcfg = compose_config([f"method={method}"]).method
    m = instantiate(mcfg, _convert_="all")
    m.prepare(ctx)
    scorer = Scorer(ctx.lm)
    unedited = float(CounterFactEval()(scorer, reqs)["efficacy"].mean())
    deltas = m.compute_deltas(ctx, reqs)
    with applied(ctx.lm.model, deltas):
        edited = float(CounterFactEval()(scorer, reqs)["efficacy"].mean())
    assert edited >= 0.8 and edited > unedited + 0.3, (unedited, edited)
    assert count_hooks(ctx.lm.model) == 0
