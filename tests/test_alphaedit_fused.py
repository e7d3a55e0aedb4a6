"""AlphaEdit with a fusion that changes Δ (issue 28): ``method.project_fused`` projects the
fused update onto the null space again, Δ̂ = f(Δ)P, at step and layer scope; without it a
drop-and-rescale Δ̂ reaches the preserved keys; with ``fusion=add`` it changes nothing."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import pytest
import torch
from hydra.utils import instantiate
from safetensors.torch import load_file

from conftest import U64, Compose, assert_within, crashes_at_call, gamma, product_roundoff
from kaedit import experiment
from kaedit.data import load_requests
from kaedit.experiment import StepDone, edit_step, fuse_step
from kaedit.fusion import Add, Constrained, DropRescale, FusionStrategy, constrained
from kaedit.methods import alphaedit as alphaedit_module
from kaedit.methods.alphaedit import AlphaEdit
from kaedit.methods.base import EditContext
from kaedit.models import LoadedModel, load_model
from kaedit.records import EditRequest
from kaedit.weights import EditedWeights

SEED, STEP = 0, 1
TEMPLATES = ["{}", "Hello. {}"]
SCOPES = ("step", "layer")


@pytest.fixture(scope="module")
def requests_(tiny_dataset: Path) -> list[EditRequest]:
    return load_requests(str(tiny_dataset), limit=3)


def stats_overrides(tiny_corpus: Path) -> list[str]:
    return [f"stats.corpus=['{tiny_corpus}']", "stats.n_tokens=2000"]


def median_eigenvalue(compose: Compose, overrides: Sequence[str]) -> float:
    """A threshold splitting the tiny model's key space in two (all of its eigenvalues are
    below the real models' 1e-2, where P would be the identity and nothing to test)."""
    cfg = compose(["model=tiny_llama", "method=alphaedit", *overrides])
    lm = load_model(cfg.model, lambda: instantiate(cfg.model.load))
    covs = instantiate(cfg.stats).get(lm, list(cfg.method.layers))
    return float(torch.cat([torch.linalg.eigvalsh(c.double()) for c in covs.values()]).median())


@pytest.fixture(scope="module")
def threshold(compose: Compose, tiny_corpus: Path) -> float:
    return median_eigenvalue(compose, stats_overrides(tiny_corpus))


def build(compose: Compose, tiny_corpus: Path, threshold: float,
          project: bool) -> tuple[LoadedModel, EditContext, AlphaEdit]:
    """A fresh tiny Llama and a prepared AlphaEdit (``method.project_fused=project``)."""
    cfg = compose(["model=tiny_llama", "method=alphaedit", *stats_overrides(tiny_corpus),
                   f"method.nullspace_threshold={threshold}",
                   f"method.project_fused={str(project).lower()}"])
    lm = load_model(cfg.model, lambda: instantiate(cfg.model.load))
    ctx = EditContext(lm=lm, stats=instantiate(cfg.stats), templates=list(TEMPLATES))
    method = instantiate(cfg.method, _convert_="all")
    assert isinstance(method, AlphaEdit) and method.project_fused is project
    method.prepare(ctx)
    return lm, ctx, method


def one_step(lm: LoadedModel, ctx: EditContext, method: AlphaEdit, fusion: FusionStrategy,
             requests: Sequence[EditRequest]) -> StepDone:
    """The runner's step (compute → fuse → apply → commit) on the fresh model."""
    done = edit_step(method, ctx, fusion, fusion.init_state(), EditedWeights(lm.model),
                     requests, SEED, STEP, None)
    assert done.problem is None
    return done


def preserved(ctx: EditContext, method: AlphaEdit, layer: int) -> torch.Tensor:
    """Unit keys P removes: the eigenvectors of E[kkᵀ] at or above the threshold (float64,
    computed as :func:`~kaedit.methods.projections.nullspace_projector` computes them)."""
    c = ctx.stats.get(ctx.lm, [layer])[layer].double()
    evals, evecs = torch.linalg.eigh((c + c.T) / 2)
    return evecs[:, evals >= method.nullspace_threshold]  # [d_in, n_kept]


def leak_bound(fused: torch.Tensor, proj: torch.Tensor, keys: torch.Tensor,
               projected: bool) -> torch.Tensor:
    """Elementwise bound on |Δ̂V| for Δ̂ = fl(F p) (``projected``) or Δ̂ = F, V ``keys``.

    Δ̂V = F(pV) + E₁V with |E₁| ≤ γ_{d_in}|F||p| (the float32 product, product_roundoff).
    pV is what the stored float32 projector leaves of a preserved key: ≤ u entrywise (p =
    P + E, |E| ≤ u|P|, ‖Pᵢ‖ ≤ 1) plus the float64 eigh's own error, taken here as the
    float64 product |pV| itself plus its rounding γ_{d_in}(u₆₄)|p||V|. The float64
    evaluation of Δ̂V adds γ_{d_in}(u₆₄)|Δ̂||V|. Unprojected, the same bound applies to F
    (no E₁): a DR mask does not commute with P, so FV is of F's own scale and exceeds it."""
    n = proj.shape[0]
    f, p, v = fused.double().abs(), proj.double(), keys.double()
    pv = (p @ v).abs() + gamma(n, U64) * (p.abs() @ v.abs())
    bound = f @ pv + gamma(n, U64) * (f @ v.abs())
    if projected:
        bound = bound + product_roundoff(fused, proj) @ v.abs()
    return bound


def check_null_space(lm: LoadedModel, ctx: EditContext, method: AlphaEdit, unconstrained: dict,
                     applied: dict) -> None:
    """The applied Δ̂ is fl(F p) bit for bit, Δ̂ = Δ̂p within its rounding bound, and the
    preserved keys' outputs Δ̂V move no more than :func:`leak_bound`."""
    for layer in method.layers:
        name = lm.spec.weight("mlp_out", layer)
        f = lm.spec.as_linear("mlp_out", unconstrained[name])  # [d_out, d_in] the fusion's F
        d = lm.spec.as_linear("mlp_out", applied[name])  # [d_out, d_in] Δ̂ = fl(F p)
        p = method.projectors[layer]  # [d_in, d_in] float32
        assert not torch.equal(f, d)  # DR changed Δ, so Δ̂ was projected
        assert torch.equal(d, f @ p)  # the same float32 product the runner applied
        # Δ̂p − Δ̂ = F(p² − p) + E₁p − E₁ with |E₁| ≤ γ_{d_in}|F||p| (float32 product);
        # |p² − p| ≤ 3u + u² for the float32-rounded projector (test_rome_ft_alphaedit),
        # taken here as computed in float64 from p's float32 values plus that product's own
        # rounding γ_{d_in}(u₆₄)|p||p|; the float64 evaluation of Δ̂p adds γ_{d_in}(u₆₄)|Δ̂||p|.
        n = p.shape[0]
        p64, fa = p.double(), f.double().abs()
        idem = (p64 @ p64 - p64).abs() + gamma(n, U64) * (p64.abs() @ p64.abs())
        e1 = product_roundoff(f, p)
        bound = fa @ idem + e1 @ p64.abs() + e1 + gamma(n, U64) * (d.double().abs() @ p64.abs())
        assert_within(d.double() @ p64, d, bound, msg=f"Δ̂ = Δ̂P, layer {layer}")
        keys = preserved(ctx, method, layer)
        assert keys.shape[1] > 0
        assert_within(d.double() @ keys, torch.zeros(d.shape[0], keys.shape[1]),
                      leak_bound(f, p, keys, projected=True), msg=f"Δ̂V, layer {layer}")


# ------------------------------------------------------------------------ the projection
@pytest.mark.parametrize("scope", SCOPES)
def test_projected_drop_rescale_stays_in_the_null_space(
    compose: Compose, tiny_corpus: Path, threshold: float, requests_: list[EditRequest],
    scope: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    lm, ctx, m = build(compose, tiny_corpus, threshold, project=True)
    in_place: dict[str, torch.Tensor] = {}  # what the layer loop kept for the later layers
    real = alphaedit_module.spread_residual

    def recording(*args, fuse=None, **kwargs):
        def rec(name: str, delta: torch.Tensor) -> torch.Tensor:
            in_place[name] = fuse(name, delta)
            return in_place[name]
        return real(*args, fuse=None if fuse is None else rec, **kwargs)

    monkeypatch.setattr(alphaedit_module, "spread_residual", recording)
    fusion = DropRescale(p=0.8, scope=scope)
    done = one_step(lm, ctx, m, fusion, requests_)
    # F: the plain fusion of the same Δ with the same masks, not projected
    _, unconstrained = fuse_step(fusion, fusion.init_state(), done.deltas, SEED, STEP)
    check_null_space(lm, ctx, m, unconstrained, done.fused)
    if scope == "layer":  # the later layers were solved against exactly what was applied
        assert in_place.keys() == done.fused.keys()
        assert all(torch.equal(in_place[n], done.fused[n]) for n in in_place)
    else:
        assert in_place == {}


@pytest.mark.parametrize("scope", SCOPES)
def test_unprojected_drop_rescale_reaches_the_preserved_keys(
    compose: Compose, tiny_corpus: Path, threshold: float, requests_: list[EditRequest],
    scope: str,
) -> None:
    lm, ctx, m = build(compose, tiny_corpus, threshold, project=False)
    assert m.fused_constraint(ctx) is None
    done = one_step(lm, ctx, m, DropRescale(p=0.8, scope=scope), requests_)
    for layer in m.layers:
        name = lm.spec.weight("mlp_out", layer)
        d = lm.spec.as_linear("mlp_out", done.fused[name])
        keys = preserved(ctx, m, layer)
        excess = (d.double() @ keys).abs() - leak_bound(d, m.projectors[layer], keys, False)
        assert float(excess.max()) > 0, layer  # the bound the projected arm meets fails here


@pytest.mark.parametrize("scope", SCOPES)
def test_project_fused_changes_nothing_with_add(
    compose: Compose, tiny_corpus: Path, threshold: float, requests_: list[EditRequest],
    scope: str,
) -> None:
    runs = {}
    for project in (False, True):
        lm, ctx, m = build(compose, tiny_corpus, threshold, project)
        runs[project] = one_step(lm, ctx, m, Add(scope=scope), requests_)
    off, on = runs[False], runs[True]
    for done in (off, on):
        assert all(torch.equal(done.fused[n], d) for n, d in done.deltas.items())
    assert off.deltas.keys() == on.deltas.keys() == on.fused.keys()
    assert all(torch.equal(off.deltas[n], on.deltas[n]) for n in off.deltas)
    assert all(torch.equal(off.fused[n], on.fused[n]) for n in off.fused)


def test_constrained_keeps_the_fusion_state_and_leaves_unchanged_deltas() -> None:
    calls: list[str] = []

    def halve(name: str, d: torch.Tensor) -> torch.Tensor:
        calls.append(name)
        return d / 2

    fusion = DropRescale(p=0.5)
    assert constrained(fusion, None) is fusion
    wrapped = constrained(fusion, halve)
    assert isinstance(wrapped, Constrained) and isinstance(wrapped, FusionStrategy)
    deltas = {"a": torch.ones(3, 4), "b": torch.full((2, 2), 3.0)}
    state, out = wrapped.step(wrapped.init_state(), deltas, torch.Generator().manual_seed(1))
    _, plain = fusion.step(fusion.init_state(), deltas, torch.Generator().manual_seed(1))
    assert state.steps == 1 and sorted(calls) == ["a", "b"]
    assert all(torch.equal(out[n], plain[n] / 2) for n in deltas)
    calls.clear()
    state, out = constrained(Add(), halve).step(state, deltas, torch.Generator())
    assert state.steps == 2 and calls == []  # Add changed nothing: nothing to constrain
    assert all(torch.equal(out[n], deltas[n]) for n in deltas)
    layer = constrained(DropRescale(p=0.5, scope="layer"), halve).layer_fusion(SEED, STEP)
    plain_layer = DropRescale(p=0.5, scope="layer").layer_fusion(SEED, STEP)
    assert layer is not None and plain_layer is not None
    assert torch.equal(layer.fuse("a", deltas["a"]), plain_layer.fuse("a", deltas["a"]) / 2)
    assert constrained(DropRescale(p=0.5), halve).layer_fusion(SEED, STEP) is None


# ----------------------------------------------------------------------------- the config
def test_project_fused_is_the_default_with_drop_rescale_and_its_noise_control(
        compose: Compose) -> None:
    def method(*overrides: str):
        return compose(["method=alphaedit", *overrides]).method

    for fusion in ("drop_rescale", "matched_noise"):  # DR and its control: the same arm
        assert method(f"fusion={fusion}").project_fused is True
        assert method(f"fusion={fusion}", "fusion.scope=layer").project_fused is True
        assert method(f"fusion={fusion}", "method.project_fused=false").project_fused is False
    for fusion in ("add", "top_k"):
        assert method(f"fusion={fusion}").project_fused is False
    assert "project_fused" not in compose(["method=memit", "fusion=drop_rescale"]).method


# -------------------------------------------------------------------------------- a run
def test_projected_run_resumes_bit_identically(
    compose: Compose, tiny_run_overrides: list[str], tiny_corpus: Path, threshold: float,
    tmp_path: Path,
) -> None:
    overrides = [*tiny_run_overrides, "method=alphaedit", "fusion=drop_rescale",
                 "fusion.scope=layer", f"method.nullspace_threshold={threshold}",
                 "schedule.n_edits=3", "schedule.batch_size=1", "save_deltas=true",
                 "save_step_deltas=true"]
    assert compose(overrides).method.project_fused is True  # the default with DR
    ref_dir, run_dir, off_dir = tmp_path / "ref", tmp_path / "run", tmp_path / "off"
    ref = experiment.run(compose(overrides), run_dir=str(ref_dir))
    with crashes_at_call(AlphaEdit, 3), pytest.raises(RuntimeError, match="simulated crash"):
        experiment.run(compose(overrides), run_dir=str(run_dir))
    resumed = experiment.run(compose([*overrides, f"resume={run_dir}"]))
    assert resumed["steps"] == ref["steps"] == 3
    a, b = (pd.read_csv(d / "metrics.csv") for d in (ref_dir, run_dir))
    cols = [c for c in a.columns if not c.startswith("time/")]
    pd.testing.assert_frame_equal(a[cols], b[cols])
    final_ref, final = (load_file(str(d / "deltas.safetensors")) for d in (ref_dir, run_dir))
    assert final_ref.keys() == final.keys() and final
    assert all(torch.equal(final_ref[k], final[k]) for k in final)
    # the unprojected arm of the same run applies other increments
    experiment.run(compose([*overrides, "method.project_fused=false"]), run_dir=str(off_dir))
    step = "deltas/step-0001-fused.safetensors"
    on, off = (load_file(str(d / step)) for d in (ref_dir, off_dir))
    assert on.keys() == off.keys()
    assert not any(torch.equal(on[k], off[k]) for k in on)
