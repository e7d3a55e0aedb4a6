"""UltraEdit (issue 26): lifelong normalisation, the closed form, run state and resume, on
the tiny models; one real-model test on SmolLM2 (marked slow)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch
from hydra.utils import instantiate
from safetensors.torch import load_file, save_file

from conftest import (
    FORWARD_REL,
    U64,
    Compose,
    assert_within,
    deltas_leaving_model_untouched,
    gamma,
    product_roundoff,
)
from kaedit import experiment
from kaedit.errors import ConfigError
from kaedit.hooks import count_hooks
from kaedit.methods.base import EditContext, EditMethod
from kaedit.methods.ultraedit import (
    EPS,
    RunningStats,
    UltraEdit,
    normalizer_update,
    ultraedit_update,
)
from kaedit.models import LoadedModel
from kaedit.records import EditRequest
from kaedit.setup import build
from kaedit.tokens import target_ids

REQUESTS = [
    EditRequest("a", "Paris", "A song about {}", "Rome"),
    EditRequest("b", "Toyota", "I bought a {}", "car"),
    EditRequest("c", "Leonhard Euler", "Number theory by {}", "Gauss"),
]
MORE = [
    EditRequest("d", "Nokia", "{} was founded in", "Peru"),
    EditRequest("e", "Mount Fuji", "{} stands in", "Chile"),
]


def ultraedit(compose: Compose, lm: LoadedModel, *overrides: str) -> UltraEdit:
    cfg = compose([f"model={lm.spec.name}", "method=ultraedit", *overrides])
    return instantiate(cfg.method, _convert_="all")


@pytest.fixture
def ctx(lm: LoadedModel) -> EditContext:
    return EditContext(lm=lm, stats=None)  # UltraEdit reads no covariance statistics


def n_answer_tokens(lm: LoadedModel, requests) -> int:
    return sum(len(target_ids(lm.tokenizer, r.target_new)) for r in requests)


# ------------------------------------------------------------------------ the method
def test_deltas_shape_and_model_untouched(compose: Compose, lm: LoadedModel,
                                          ctx: EditContext) -> None:
    method = ultraedit(compose, lm)
    assert isinstance(method, EditMethod)
    method.prepare(ctx)
    expected = [lm.spec.weight("mlp_out", layer) for layer in method.layers]
    deltas_leaving_model_untouched(method, ctx, REQUESTS, expected)
    # no gradient left on any parameter, and the run state waits for commit
    assert all(p.grad is None for p in lm.model.parameters())
    assert method.stats == {} and method.state_dict() == {}
    assert set(ctx.clock.take()) == {"keys", "solve"}


def test_gate_and_up_projections_share_one_statistics_set(compose: Compose,
                                                          ctx: EditContext) -> None:
    lm = ctx.lm
    if not lm.spec.mlp_gate:  # tiny_gptj / tiny_neox: no gated MLP
        method = ultraedit(compose, lm, "method.modules=[{kind: mlp_gate}]")
        with pytest.raises(ConfigError, match=r"kind='mlp_gate'.*has no model.modules.mlp_gate"):
            method.prepare(ctx)
        return
    method = ultraedit(compose, lm, "method.layers=[1,2]", "method.modules=["
                       "{kind: mlp_gate, layers: [1]}, {kind: mlp_in, layers: [2]}]")
    method.prepare(ctx)
    names = [lm.spec.weight("mlp_gate", 1), lm.spec.weight("mlp_in", 2)]
    deltas = deltas_leaving_model_untouched(method, ctx, REQUESTS, names)
    method.commit(ctx, REQUESTS, deltas)
    # both are [d_ff, d_model]: one normaliser of that shape, updated by each module with
    # every answer token (XiaojieGu/UltraEdit editor/ultraedit.py:53-58, 120)
    d_model, d_ff = lm.model.config.hidden_size, lm.model.config.intermediate_size
    assert list(method.stats) == [f"{d_model}x{d_ff}"]
    assert float(method.stats[f"{d_model}x{d_ff}"].n) == 2 * n_answer_tokens(lm, REQUESTS)


@pytest.mark.parametrize("lm", ["tiny_llama"], indirect=True)
def test_keys_and_gradients_give_the_weight_gradient(compose: Compose, lm: LoadedModel) -> None:
    """With ``token=all`` the captured rows are every real position, so Σ_t g_t k_tᵀ is
    ∂loss/∂W, which autograd gives directly when W itself requires grad."""
    method = ultraedit(compose, lm, "method.token=all", "method.layers=[1]")
    target = method.targets(lm)[0]
    batch = method.sub_batches(lm, REQUESTS)[0]
    K, G = method.keys_and_grads(lm, batch, [target])[target.module]  # [N, d_in], [N, d_out]
    assert K.shape[0] == int(batch.mask.sum())
    w = lm.model.get_parameter(target.weight).detach().clone().requires_grad_(True)
    with torch.enable_grad():
        hidden, _ = batch.hidden(lm, {target.weight: w})
        loss = batch.token_nll(batch.logp(lm, hidden)).mean()
        (want,) = torch.autograd.grad(loss, [w])
    # GᵀK is a float32 product over N rows (γ_N|G|ᵀ|K|), so is autograd's weight gradient
    # (the same sum in its own order); the output gradients themselves come from the same
    # backward ops, up to the summation order of a tiny model's pass (FORWARD_REL).
    bound = 2 * product_roundoff(G.T, K) + FORWARD_REL * float(want.abs().max())
    assert_within(G.T @ K, want, bound, msg="Σ g kᵀ = ∂loss/∂W")
    assert all(p.grad is None for p in lm.model.parameters()) and count_hooks(lm.model) == 0


def test_rows_are_the_answer_positions_longest_request_first(compose: Compose,
                                                             lm: LoadedModel) -> None:
    method = ultraedit(compose, lm, "method.sub_batch=2")
    batches = method.sub_batches(lm, [*REQUESTS, *MORE])
    assert [b.n_pairs for b in batches] == [2, 2, 1]
    lengths = [int(n) for b in batches for n in b.mask.sum(1)]
    assert lengths == sorted(lengths, reverse=True)  # data/base.py:43-58: longest first
    target = method.targets(lm)[0]
    K, G = method.keys_and_grads(lm, batches[0], [target])[target.module]
    assert K.shape[0] == G.shape[0] == len(batches[0].tok)  # one row per answer token


# ------------------------------------------------------------------------------- maths
def batches_of(sizes, dim: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, dim, generator=g, dtype=torch.float64) * (1 + i)
            + i for i, b in enumerate(sizes)]


def test_normalizer_update_is_the_references_pooled_statistics() -> None:
    """After sequential updates (``nets.py:16-24``): μ is the mean of every row; m2 is the
    pooled sum of squares with the reference's factor b/(b − 1) on each batch's own part
    (its unbiased ``x.var(0)`` times b), a batch of one adding no within-batch part."""
    sizes, dim = [5, 1, 12, 3, 30], 7
    xs = batches_of(sizes, dim)
    stats = RunningStats.empty(dim)
    for x in xs:
        stats = normalizer_update(stats, x)
    rows = torch.cat(xs)
    mean = rows.mean(0)
    within = sum(b / (b - 1) * (x - x.mean(0)).pow(2).sum(0) for b, x in zip(sizes, xs, strict=True)
                 if b > 1)
    between = sum(b * (x.mean(0) - mean).pow(2) for b, x in zip(sizes, xs, strict=True))
    assert float(stats.n) == sum(sizes)
    # float64 throughout; each side sums ≤ n = 51 terms of size ≤ the data's squared scale
    n = sum(sizes)
    scale = float(rows.abs().max())
    assert_within(stats.mean, mean, 2 * gamma(4 * n, U64) * scale, msg="μ")
    assert_within(stats.m2, within + between, 2 * gamma(8 * n, U64) * n * scale**2, msg="m2")
    assert_within(stats.std(), (stats.m2 / (n - 1 + EPS)).sqrt(), 0.0, msg="σ")
    # the order of the batches does not matter (up to rounding)
    again = RunningStats.empty(dim)
    for x in reversed(xs):
        again = normalizer_update(again, x)
    assert_within(again.m2, stats.m2, 2 * gamma(8 * n, U64) * n * scale**2, msg="order")
    # a single first row: σ = 0 and the row normalises to 0, as in the reference
    one = normalizer_update(RunningStats.empty(dim), xs[1])
    assert torch.equal(one.normalize(xs[1]), torch.zeros(1, dim, dtype=torch.float64))


@pytest.mark.parametrize(("n_rows", "ridge"), [(9, 1.0), (40, 1.0), (9, 1e-3)])
def test_closed_form_is_the_ridge_regression_least_squares_solution(n_rows: int,
                                                                    ridge: float) -> None:
    """Δ = Vᵀ K (KᵀK + λI)⁻¹ against ``torch.linalg.lstsq`` of min ‖KX − V‖² + λ‖X‖²
    (the stacked system [K; √λ I] X = [V; 0], X = Δᵀ), with V = −η‖k̂‖²ĝ from the
    normalised rows (``editor/ultraedit.py:86-94``)."""
    d_in, d_out, lr = 24, 16, 1e-3
    g = torch.Generator().manual_seed(1)
    K = torch.randn(n_rows, d_in, generator=g, dtype=torch.float64) * 3
    G = torch.randn(n_rows, d_out, generator=g, dtype=torch.float64) * 1e-3
    stats = normalizer_update(normalizer_update(RunningStats.empty(d_in + d_out),
                                                torch.randn(20, d_in + d_out, generator=g)),
                              torch.cat([K, G], 1))
    delta = ultraedit_update(K, G, stats, lr, ridge)
    assert delta.shape == (d_out, d_in) and delta.dtype == torch.float64
    z = (torch.cat([K, G], 1) - stats.mean) / ((stats.m2 / (stats.n - 1 + EPS)).sqrt() + EPS)
    V = -lr * z[:, :d_in].pow(2).sum(1, keepdim=True) * z[:, d_in:]  # [N, d_out]
    stacked = torch.cat([K, ridge**0.5 * torch.eye(d_in, dtype=torch.float64)])
    rhs = torch.cat([V, torch.zeros(d_in, d_out, dtype=torch.float64)])
    want = torch.linalg.lstsq(stacked, rhs, driver="gelsd").solution.T  # [d_out, d_in]
    # Both are float64 solves of the same problem: each is within ~n·u·κ(A) of the exact
    # solution (A = KᵀK + λI, κ(A) = κ([K; √λI])²; LU and SVD least squares are backward
    # stable, Higham ch. 9 and 20), n the larger dimension. Normwise, with a factor 4 for
    # the two solves and V's own rounding.
    s = torch.linalg.svdvals(K)
    kappa = float((s.max() ** 2 + ridge) / ((s.min() ** 2 if n_rows >= d_in else 0) + ridge))
    err = float((delta - want).norm())
    assert err <= 4 * (n_rows + d_in) * U64 * kappa * float(want.norm()), (err, kappa)
    # and with a small λ and fewer rows than d_in, each key is mapped onto its target
    if n_rows < d_in and ridge < 1e-2:
        resid = K @ delta.T - V  # exactly −λ(KKᵀ + λI)⁻¹V: ≤ λ/σ_min(K)² of V
        assert float(resid.norm()) <= 2 * ridge / float(s.min()) ** 2 * float(V.norm())


# ---------------------------------------------------------------------------- run state
@pytest.mark.parametrize("lm", ["tiny_llama"], indirect=True)
def test_statistics_change_on_commit_only(compose: Compose, ctx: EditContext) -> None:
    lm = ctx.lm
    method = ultraedit(compose, lm)
    first = method.compute_deltas(ctx, REQUESTS)
    assert method.stats == {}  # nothing committed yet
    again = method.compute_deltas(ctx, REQUESTS)  # a step the guard refused leaves no trace
    assert all(torch.equal(first[k], again[k]) for k in first)
    with pytest.raises(RuntimeError, match="compute_deltas was not called"):
        method.commit(ctx, MORE, again)
    method.commit(ctx, REQUESTS, again)
    (key,) = method.stats
    # both layers' down projections share the shape: each adds every answer token once
    assert float(method.stats[key].n) == 2 * n_answer_tokens(lm, REQUESTS)
    # lifelong: the next step is normalised with statistics that include the first step
    later = method.compute_deltas(ctx, MORE)
    fresh = ultraedit(compose, lm).compute_deltas(ctx, MORE)
    assert any(not torch.equal(later[k], fresh[k]) for k in later)


@pytest.mark.parametrize("lm", ["tiny_llama"], indirect=True)
def test_state_dict_round_trip_continues_bit_identically(
        compose: Compose, ctx: EditContext, tmp_path: Path) -> None:
    method = ultraedit(compose, ctx.lm)
    method.commit(ctx, REQUESTS, method.compute_deltas(ctx, REQUESTS))
    state = method.state_dict()
    assert state and all(isinstance(v, torch.Tensor) for v in state.values())
    save_file(state, str(tmp_path / "method.safetensors"))  # as the checkpoint stores it
    resumed = ultraedit(compose, ctx.lm)
    resumed.load_state_dict(load_file(str(tmp_path / "method.safetensors")))
    a, b = method.compute_deltas(ctx, MORE), resumed.compute_deltas(ctx, MORE)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def metric_columns(df: pd.DataFrame) -> pd.DataFrame:
    return df[[c for c in df.columns if not c.startswith("time/")]]


def test_killed_run_resumes_bit_identically(
    compose: Compose, tiny_run_overrides: list[str], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # 3 steps of 2 edits; the run dies inside step 3, after the checkpoint of step 2 (whose
    # method state holds the statistics of steps 1-2), and is resumed from it.
    overrides = [*tiny_run_overrides, "method=ultraedit", "method.lr=1e-3",
                 "schedule.n_edits=6", "schedule.batch_size=2", "save_deltas=true"]
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    experiment.run(compose(overrides), run_dir=str(ref_dir))

    real, calls = UltraEdit.compute_deltas, {"n": 0}

    def crashing(self, ctx, requests):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("simulated crash")
        return real(self, ctx, requests)

    monkeypatch.setattr(UltraEdit, "compute_deltas", crashing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        experiment.run(compose(overrides), run_dir=str(run_dir))
    monkeypatch.setattr(UltraEdit, "compute_deltas", real)
    saved = load_file(str(next((run_dir / "checkpoint").glob("step-*")) / "method.safetensors"))
    assert any(k.endswith(".n") and float(v) > 0 for k, v in saved.items())  # real state
    experiment.run(compose([*overrides, f"resume={run_dir}"]))

    got = metric_columns(pd.read_csv(run_dir / "metrics.csv"))
    pd.testing.assert_frame_equal(got, metric_columns(pd.read_csv(ref_dir / "metrics.csv")))
    a, b = (load_file(str(d / "deltas.safetensors")) for d in (ref_dir, run_dir))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(float(v.abs().max()) > 0 for v in a.values())


# ------------------------------------------------------------------------- bad config
@pytest.mark.parametrize(("override", "names"), [
    ("method.token=answer", ["'answer'", "['ans', 'all']"]),
    ("method.modules=[{kind: mlp_up}]", ["'mlp_up'", "'mlp_in', 'mlp_gate', 'mlp_out'"]),
    ("method.modules=[{kind: mlp_out, layers: [3]}]", ["[3]", "method.layers=[1, 2]"]),
    ("method.modules=[{kind: mlp_out, layers: [1]}]", ["[2]", "edited by no entry"]),
    ("method.lr=0", ["method.lr=0", "> 0"]),
    ("method.ridge=-1", ["method.ridge=-1", "> 0"]),
    ("method.sub_batch=0", ["method.sub_batch=0", ">= 1"]),
])
def test_bad_config_values_are_one_config_error(compose: Compose, override: str,
                                                names: list[str]) -> None:
    cfg = compose(["model=tiny_llama", "method=ultraedit", override])
    with pytest.raises(ConfigError) as err:
        build(cfg.method, _convert_="all")
    assert all(n in str(err.value) for n in names), str(err.value)
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------------- real model
@pytest.mark.slow
def test_ultraedit_edits_real_facts_on_smollm2() -> None:
    from kaedit import data
    from kaedit.evaluate import CounterFactEval, Scorer
    from kaedit.experiment import compose as compose_config
    from kaedit.experiment import resolve_data_root
    from kaedit.models import load_model
    from kaedit.weights import EditedWeights

    cfg = compose_config(["logger=csv", "method=ultraedit"])  # conf/hparams/ultraedit_smollm2
    resolve_data_root(cfg)
    lm = load_model(cfg.model, lambda: instantiate(cfg.model.load))
    records = data.from_config(cfg.dataset, cache_dir=str(cfg.cache_dir))[:20]
    method = build(cfg.method, _convert_="all")
    ctx = EditContext(lm=lm, stats=None)
    method.prepare(ctx)
    scorer = Scorer(lm)
    pre = CounterFactEval()(scorer, records)
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    edits = EditedWeights(lm.model)
    for step in (records[:10], records[10:]):  # two sequential steps
        deltas = method.compute_deltas(ctx, step)
        assert count_hooks(lm.model) == 0
        assert all(torch.equal(before[k], v) for k, v in lm.model.state_dict().items()
                   if k not in edits.total)
        edits.add(deltas)
        method.commit(ctx, step, deltas)
    post = CounterFactEval()(scorer, records)
    # Measured with these settings (docs/methods.md): 30 / 30 / 67.5 -> 75 / 37.5 / 50.5
    # (efficacy / generalization / specificity); one record is 5 points. UltraEdit pays
    # for its efficacy in specificity on SmolLM2.
    assert post["efficacy"].mean() >= pre["efficacy"].mean() + 0.3
    assert post["generalization"].mean() >= pre["generalization"].mean()
    assert post["specificity"].mean() >= pre["specificity"].mean() - 0.25
