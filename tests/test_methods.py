"""MEMIT and the shared locate-then-edit maths on the tiny models (all three architectures)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from conftest import (
    FORWARD_REL,
    U32,
    Compose,
    assert_close_to_scale,
    assert_within,
    deltas_leaving_model_untouched,
    product_roundoff,
)
from kaedit.evaluate import Scorer
from kaedit.hooks import count_hooks, edit_outputs, trace
from kaedit.methods.base import EditContext
from kaedit.methods.keys import compute_keys, hidden_at_subject
from kaedit.methods.solve import solve_update
from kaedit.methods.targets import TargetConfig, optimize_targets
from kaedit.methods.templates import Templates, context_templates
from kaedit.models import LoadedModel
from kaedit.records import EditRequest
from kaedit.stats import CovarianceStore
from kaedit.timing import Stopwatch
from kaedit.tokens import encode, pad
from kaedit.weights import applied

# The subject ends each prompt, so the edited position is the one that predicts the first
# target token: a random tiny model's NLL then responds measurably to the optimised delta.
REQUESTS = [
    EditRequest("a", "Paris", "A song about {}", "Rome"),
    EditRequest("b", "Toyota", "I bought a {}", "car"),
    EditRequest("c", "Leonhard Euler", "Number theory by {}", "Gauss"),
]
TEMPLATES = ["{}", "Hello. {}", "Once upon a time, there. {}"]


@pytest.fixture
def ctx(lm: LoadedModel, cache_dir: Path, tiny_corpus: Path) -> EditContext:
    stats = CovarianceStore([str(tiny_corpus)], str(cache_dir / "stats"), n_tokens=2000)
    return EditContext(lm=lm, stats=stats, templates=TEMPLATES)


def memit(compose: Compose, lm: LoadedModel, **overrides):
    cfg = compose([f"model={lm.spec.name}"])
    return instantiate(cfg.method, _convert_="all", **overrides)


def nll_with_delta(lm: LoadedModel, module: str, req: EditRequest, delta: torch.Tensor) -> float:
    """Mean target NLL of the rewrite prompt with ``delta`` added at the last subject token."""
    last = encode(lm.tokenizer, req.prompt, req.subject).subject_last

    def add(h: torch.Tensor) -> torch.Tensor:
        h = h.clone()
        h[:, last] += delta
        return h

    with edit_outputs(lm.model, {module: add}):
        return float(Scorer(lm).score([req.rewrite_prompt], [req.target_new])[0][0])


def test_memit_deltas_shape_and_model_untouched(
    compose: Compose, lm: LoadedModel, ctx: EditContext
) -> None:
    method = memit(compose, lm)
    method.prepare(ctx)
    expected = [lm.spec.weight("mlp_out", layer) for layer in method.layers]
    deltas_leaving_model_untouched(method, ctx, REQUESTS, expected)


def test_memit_failing_midway_restores_the_model(
    compose: Compose, lm: LoadedModel, ctx: EditContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    import kaedit.methods.solve as solve_module  # MEMIT's layer loop lives there

    real, calls = solve_module.compute_keys, []

    def fail_at_second_layer(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the first layer's delta is applied at this point
            raise RuntimeError("keys failed")
        return real(*args, **kwargs)

    monkeypatch.setattr(solve_module, "compute_keys", fail_at_second_layer)
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    with pytest.raises(RuntimeError, match="keys failed"):
        memit(compose, lm).compute_deltas(ctx, REQUESTS)
    after = lm.model.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert count_hooks(lm.model) == 0


def test_memit_deltas_reach_the_target(compose: Compose, lm: LoadedModel, ctx: EditContext) -> None:
    # With a tiny λ the closed-form solve is exact on the keys, so after applying every
    # layer's delta the residual at the last edit layer is the optimised target z = init + δ.
    # (One template: with several, the keys are template averages and z is met on average.)
    ctx.templates = ["{}"]
    method = memit(compose, lm, lam=1e-3)
    z_module = lm.spec.module("layer", method.layers[-1])
    init, delta = optimize_targets(lm, REQUESTS, ctx.templates, [z_module], method.target)[z_module]
    with applied(lm.model, method.compute_deltas(ctx, REQUESTS)):
        reached = hidden_at_subject(lm, z_module, REQUESTS)
    err = (reached - (init + delta)).norm(dim=1) / delta.norm(dim=1)
    assert err.max() < 1e-3, err


def test_memit_config_lambda_nearly_reaches_target(
    compose: Compose, lm: LoadedModel, ctx: EditContext
) -> None:
    method = memit(compose, lm)  # λ and template-averaged keys: most of the way, not exact
    z_module = lm.spec.module("layer", method.layers[-1])
    init, delta = optimize_targets(lm, REQUESTS, ctx.templates, [z_module], method.target)[z_module]
    with applied(lm.model, method.compute_deltas(ctx, REQUESTS)):
        moved = hidden_at_subject(lm, z_module, REQUESTS) - init
    along = (moved * delta).sum(1) / delta.pow(2).sum(1)
    assert ((along > 0.5) & (along < 1.5)).all(), along


@pytest.mark.parametrize("kk_coef", [1.0, 2.0])
def test_solve_update_normal_equations(kk_coef: float) -> None:
    g = torch.Generator().manual_seed(0)
    d_out, d_in, n, lam = 12, 20, 5, 3.0
    R = torch.randn(d_out, n, generator=g)
    K = torch.randn(d_in, n, generator=g)
    M = torch.randn(d_in, d_in, generator=g)
    C = M @ M.T / d_in + 0.1 * torch.eye(d_in)  # SPD
    delta = solve_update(R, K, C, lam, kk_coef)
    assert delta.shape == (d_out, d_in) and delta.dtype == torch.float32
    A = lam * C.double() + kk_coef * K.double() @ K.double().T  # as solve_update forms it
    lhs = delta.double() @ A
    # Δ is the float64 solve rounded to float32 (≤ u·|Δ| per entry, so ≤ u·|Δ||A| in ΔA)
    # and RKᵀ a float32 product (≤ γₙ|R||Kᵀ|, any summation order); the float64 solve and
    # products add ~1e-16·cond(A) ≪ u, covered by the factor 2. Bounds relative to the
    # terms, not the result: entries of RKᵀ near zero keep their own, absolute, bound.
    bound = 2 * (U32 * (delta.double().abs() @ A.abs()) + product_roundoff(R, K.T))
    assert_within(lhs, (R @ K.T).double(), bound, msg="Δ(λC+cKKᵀ) = RKᵀ")
    if kk_coef != 1.0:
        assert not torch.allclose(delta, solve_update(R, K, C, lam, 1.0))


def test_solve_update_without_covariance_interpolates_keys() -> None:
    # λ → 0 with n < d_in: Δ K = R (the edited keys map exactly onto the residuals).
    g = torch.Generator().manual_seed(1)
    R, K = torch.randn(8, 3, generator=g), torch.randn(16, 3, generator=g)
    delta = solve_update(R, K, torch.eye(16), 1e-8)
    # ΔK: a float32 product (≤ γ₁₆|Δ||K|) of Δ rounded to float32 (≤ u|Δ||K|). The ridge
    # pulls ΔK off R by λ/σ²_min(K) ≈ 1e-9 of R, and the float64 solve's error of the
    # near-singular A lies along null(Kᵀ), which K annihilates: the factor 2 covers both.
    bound = 2 * (product_roundoff(delta, K) + U32 * (delta.double().abs() @ K.double().abs()))
    assert_within(delta @ K, R, bound, msg="ΔK = R")


@pytest.mark.parametrize("clamp", [0.5, 4.0])
def test_optimize_targets_lowers_nll_within_clamp(lm: LoadedModel, clamp: float) -> None:
    cfg = TargetConfig(lr=0.05, steps=20, weight_decay=0.0, clamp_norm_factor=clamp)
    module = lm.spec.module("layer", 2)
    init, delta = optimize_targets(lm, REQUESTS, ["{}"], [module], cfg)[module]
    assert init.shape == delta.shape == (len(REQUESTS), lm.model.config.hidden_size)
    # batched padded forward vs the helper's: the same hidden state up to float32 roundoff
    # through a few layers (FORWARD_REL)
    assert_close_to_scale(init, hidden_at_subject(lm, module, REQUESTS), rel=FORWARD_REL,
                          msg="init")
    ratio = delta.norm(dim=1) / init.norm(dim=1)
    assert (ratio <= clamp * (1 + 1e-5)).all(), ratio
    unedited_all, _ = Scorer(lm).score(
        [r.rewrite_prompt for r in REQUESTS], [r.target_new for r in REQUESTS]
    )
    for i, req in enumerate(REQUESTS):
        unedited = float(unedited_all[i])
        edited = nll_with_delta(lm, module, req, delta[i])
        assert edited < unedited - 0.01, (req.subject, unedited, edited)
    assert count_hooks(lm.model) == 0


@pytest.mark.parametrize("early_stop_loss", [0.05, 5.55])
def test_optimize_targets_batched_equals_separate(lm: LoadedModel, early_stop_loss: float) -> None:
    # 5.55 ≈ log(vocab): some requests of the random model stop early, others do not.
    cfg = TargetConfig(lr=0.5, steps=10, early_stop_loss=early_stop_loss)
    modules = [lm.spec.module("layer", 2), lm.spec.module("attn_out", 2)]
    batched = optimize_targets(lm, REQUESTS, TEMPLATES, modules, cfg)
    for i, req in enumerate(REQUESTS):
        alone = optimize_targets(lm, [req], TEMPLATES, modules, cfg)
        for m in modules:
            assert_close_to_scale(alone[m][0][0], batched[m][0][i], rel=FORWARD_REL,
                                  msg=f"{m} init")
            # Adam divides each gradient entry by its own running RMS: a rounding
            # difference ε·G in the gradient (ε ≤ FORWARD_REL, G its scale) moves the step
            # of an entry with gradient g by ~(ε·G/|g|)·lr, so the entry nearest zero sets
            # the error: among the d = 32 entries of a δ the smallest |g| is ~G/d, giving
            # ~d·ε ≈ 3e-4 of lr a step, i.e. of the delta's scale (≈ lr a step) once the
            # steps add up. 1e-2 leaves 30× for an unluckier entry and the steps feeding
            # their changes back; a wrong request row or missing KL term is off by ~1.
            assert_close_to_scale(alone[m][1][0], batched[m][1][i], rel=1e-2, msg=m)


def test_memit_one_request_at_a_time_matches_batched(
    compose: Compose, lm: LoadedModel, ctx: EditContext
) -> None:
    # The bench's reference baseline (each v* alone) computes the same deltas, slower.
    batched = memit(compose, lm).compute_deltas(ctx, REQUESTS)
    alone = memit(compose, lm, batch_targets=False).compute_deltas(ctx, REQUESTS)
    assert batched.keys() == alone.keys()
    for name in batched:
        # Same maths, different batching of every matmul: the targets v* carry Adam's
        # amplified rounding (the test above: ~d·ε ≈ 3e-4 of their change) and the solve
        # maps the residuals linearly onto the delta. A per-element tolerance failed on
        # another CPU where an entry near zero picked up 2e-5 of absolute error; relative
        # to the delta's scale, 1e-3 is far below any real bug (a wrong row: ~1).
        assert_close_to_scale(alone[name], batched[name], rel=1e-3, msg=name)
    assert set(ctx.clock.take()) == {"targets", "keys", "solve"}


def test_context_templates_are_generates_cpu_samples_without_the_global_rng(
    lm: LoadedModel,
) -> None:
    """The seeded CPU sampler draws what ``generate(do_sample=True, top_k=5)`` draws on the
    CPU after ``torch.manual_seed(seed)`` (so CUDA runs get the CPU's templates), and
    leaves the global RNG where it was."""
    tok = lm.tokenizer
    torch.manual_seed(123)
    state = torch.get_rng_state()
    got = context_templates(lm, [(6, 5), (3, 10)], seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    assert len(got) == 1 + 5 + 10 and got[0] == "{}"
    for spec, rows in (((6, 5), got[1:6]), ((3, 10), got[6:])):
        starts = [s for s in ("The", "Therefore", "Because", "I", "You")
                  for _ in range(spec[1] // 5)]
        ids, mask = pad([list(tok(s)["input_ids"]) for s in starts], tok.pad_token_id,
                        lm.device, left=True)
        torch.manual_seed(7)
        gen = lm.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=spec[0],
                                do_sample=True, top_k=5, pad_token_id=tok.pad_token_id)
        width = ids.shape[1]
        want = [tok.decode(r[int(width - m.sum()):], skip_special_tokens=True)
                .replace("{", " ").replace("}", " ") + ". {}"
                for r, m in zip(gen, mask, strict=True)]
        assert rows == want
    assert context_templates(lm, [(6, 5), (3, 10)], seed=7) == got
    assert list(context_templates(lm, [(6, 5)], seed=8)) != got[:6]
    # one group per spec after the plain prompt's, as MEMIT's get_context_templates
    assert [len(g) for g in got.groups] == [1, 5, 10] and got.flat == list(got)


def test_keys_are_the_mean_over_template_groups(lm: LoadedModel) -> None:
    """MEMIT's ``compute_ks``: mean within each template group, then across the groups
    (the plain prompt weighs ½ with one generated group), not the flat mean."""
    tpl = Templates((("{}",), ("Hello. {}", "Once upon a time, there. {}", "Yes. {}")))
    layer = 1
    per = [compute_keys(lm, layer, REQUESTS, [t]) for t in tpl]  # [d_in, n] each
    two_level = (per[0] + (per[1] + per[2] + per[3]) / 3) / 2
    got = compute_keys(lm, layer, REQUESTS, tpl)
    # the same keys from forwards batched another way (FORWARD_REL), then weighted and
    # summed in float32 over 4 templates (a few u more)
    assert_close_to_scale(got, two_level, FORWARD_REL, "two-level mean")
    flat = torch.stack(per).mean(0)
    assert (got - flat).abs().max() > 1e-3 * flat.abs().max()  # the weighting matters
    # a plain list (or Templates.ungrouped) is every template its own group: the flat mean
    assert_close_to_scale(compute_keys(lm, layer, REQUESTS, list(tpl)), flat, FORWARD_REL,
                          "flat")
    assert torch.equal(Templates.ungrouped(tpl).weights(), torch.full((4,), 0.25))
    assert list(tpl) == tpl.flat and len(tpl) == 4 and tpl[1] == "Hello. {}"


def test_stopwatch_accumulates_and_resets() -> None:
    clock = Stopwatch()
    with clock("a"):
        pass
    with pytest.raises(KeyError), clock("a"):
        raise KeyError("the stage is timed even when it fails")
    with clock("b"):
        pass
    totals = clock.take()
    assert set(totals) == {"a", "b"} and all(v >= 0 for v in totals.values())
    assert clock.take() == {}


def test_covariance_matches_keys_and_is_cached(
    lm: LoadedModel, tmp_path: Path, tiny_corpus: Path
) -> None:
    store = CovarianceStore([str(tiny_corpus)], str(tmp_path), n_tokens=512, seq_len=128)
    covs = store.get(lm, [1, 2])
    # By hand: every key entering mlp_out over the four 128-token windows.
    windows = store._windows(lm.tokenizer)
    assert windows.shape == (4, 128)
    names = {layer: lm.spec.module("mlp_out", layer) for layer in (1, 2)}
    with torch.no_grad(), trace(lm.model, names.values(), inputs=True, outputs=False) as tr:
        lm.model(input_ids=windows)
    for layer, name in names.items():
        k = tr[name].input.reshape(-1, tr[name].input.shape[-1]).double()
        # the same forward of the same 4 windows (one batch of ≤ stats batch_size 16), the
        # same float64 product; only float64 summation order may differ (~1e-14), which
        # can flip the float32 rounding of an entry by one ulp (2u ≤ 1.2e-7 of the scale)
        assert_close_to_scale(covs[layer], (k.T @ k / k.shape[0]).float(), rel=1e-6, msg=name)
    assert len(list(tmp_path.glob("*.safetensors"))) == 2

    again = CovarianceStore([str(tiny_corpus)], str(tmp_path), n_tokens=512, seq_len=128)
    cached = again.get(lm, [2, 1])
    assert again.compute_seconds == 0.0  # read from disk
    assert all(torch.equal(cached[layer], covs[layer]) for layer in (1, 2))
    other = CovarianceStore([str(tiny_corpus)], str(tmp_path), n_tokens=256, seq_len=128)
    assert other.key(lm, names[1]) != store.key(lm, names[1])
