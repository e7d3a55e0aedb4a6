"""AdaPLE (Li & Chu, "On the Knowledge Attenuation in Sequential Model Editing", §4, App. C).

Computing the edit weights, as Algorithm 1 (appendix C.2) does by default:

1. Targets as PMET (eq. 25): δᵃ and δᵐ at the last subject token of the last edit layer L,
   optimised jointly; z = m^L + δᵐ. ``optimize_attention=False`` optimises δᵐ alone
   (Table 3 "w/o δᵢᵃ").
2. For each edit layer l in order: keys K averaged over the prefixed prompts (eq. 26; per
   template group, then across groups, as MEMIT's ``compute_ks``), residual
   r = (z − m^L) / √(L − l + 1) (Algorithm 1; m^L re-read after each update, as in the
   PMET reference -- Algorithm 1 as printed writes h^l and "h^l ← h^{l−1} + 3m^l", which
   do not type-check against z = m^L + δᵐ).
3. A closed-form update of the down-projection W_l, chosen by ``objective``; default
   ``algorithm1``: Δˡ = Rˡ Kᵀ(λC + 2KKᵀ)⁻¹, the update line of Algorithm 1.
4. Drop-and-rescale of Δˡ *inside* the loop, W₁ˡ ← W₀ˡ + Δ̂ˡ before layer l+1 is solved:
   that is the fusion (``conf/fusion/drop_rescale.yaml``) at ``fusion.scope=layer``, which
   ``conf/method_fusion/adaple_drop_rescale.yaml`` makes the default for method=adaple
   (:func:`~kaedit.methods.solve.spread_residual` applies ``EditContext.layer_fusion``).

Mapping the single-matrix formulas of :mod:`kaedit.methods.objectives` onto the
multi-layer residual: at layer l, **W₀K** is the current output of that layer's
down-projection for the keys K (W_l @ K, from the weight with every applied edit in it),
**V₁ = W₀K** (eq. 22: the value being forgotten is what the layer outputs now), and the
spread residual r is the share of the target change assigned to layer l, so
**V₂ = W₀K + r**. Then, with C_l the key second moment and λ = ``lam``:

* ``algorithm1`` (default): Δ = r Kᵀ(λC + 2KKᵀ)⁻¹, Algorithm 1's line with Rˡ = r (the
  spread residual). It is ``erase`` at α = −1: the minimiser of
  ‖WK₀−V₀‖² + ‖WK−V₂‖² + ‖WK−V₁‖², i.e. eq. 3 with the erase term's sign as the
  appendix's block form (eq. 17) has it.
* ``paper``:  Δ = R Kᵀ(λC + 2KKᵀ)⁻¹, R = V₂ − 3W₀K = r − 2W₀K (eq. 4 exactly as printed).
* ``exact``:  Δ = (V₂ − V₁)Kᵀ(λC)⁻¹ = r Kᵀ(λC)⁻¹, the minimiser of eq. 3 as written: the
  quadratic terms of ‖WK−V₂‖² − ‖WK−V₁‖² cancel (derivation in
  :mod:`kaedit.methods.objectives`), confirming ``shared/notes/smollm2-editing.md``.
* ``memit``:  Δ = r Kᵀ(λC + KKᵀ)⁻¹ (eq. 2; Table 3 "w/o new optim"). With
  ``optimize_attention=True`` this is exactly PMET.
* ``erase``:  Δ = (V₂ − αV₁ − (1−α)W₀K)Kᵀ(λC + (1−α)KKᵀ)⁻¹ = r Kᵀ(λC + (1−α)KKᵀ)⁻¹, the
  minimiser of ‖WK₀−V₀‖² + ‖WK−V₂‖² − α‖WK−V₁‖² (α ≤ 1): α = 0 is ``memit``, α = 1 is
  ``exact``, α = −1 is ``algorithm1``.

Eq. 4 is not the minimiser of eq. 3 (the appendix's block form gives the erased keys +KKᵀ
instead of −KKᵀ): it minimises ‖WK₀−V₀‖² + 2‖WK − ½(V₂ − W₀K)‖², i.e. it pulls the
layer's output on the edited keys towards r/2, wiping out W₀K. Algorithm 1's line uses
the spread residual instead of V₂ − 3W₀K, so it moves nothing when r = 0.

Why ``algorithm1`` is the default: it is the paper's method as its pseudo-code states it,
and the one Table 3's ablations remove parts of. Measured earlier on SmolLM2
(``benchmarks/adaple_objectives.py``, 20 CounterFact edits in two sequential batches,
fusion add, λ = 2000, flat key mean), efficacy / generalization / specificity:
``memit`` 95 / 95 / 67, ``erase`` α = −1 (= ``algorithm1``) 90 / 87.5 / 67, α = 0.5
90 / 87.5 / 66, ``paper`` 65 / 70 / 68; one record is 5 points, so ``algorithm1`` and
``memit`` differ by one edit there. ``exact`` diverges: its update at a key is
r·kᵀ(λC)⁻¹k with kᵀ(λC)⁻¹k ≈ 0.5–6 for these subjects, so each layer overshoots and the
residual spread oscillates (max ‖Δ‖ 3.6·10⁴); at λ = 15000 it is stable but weaker
(80 / 72.5 / 68).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from kaedit.errors import ConfigError
from kaedit.methods import objectives
from kaedit.methods.base import EditContext, Stateless
from kaedit.methods.pmet import MLPTargets, mlp_targets, spread_mlp_target
from kaedit.methods.targets import TargetConfig
from kaedit.records import Deltas, EditRequest

OBJECTIVES = ("algorithm1", "paper", "exact", "memit", "erase")


@dataclass
class AdaPLE(Stateless):
    layers: Sequence[int]
    #: λ: weight of the preserved-key covariance, C_AdaPLE = λ·E[kkᵀ].
    lam: float = 15_000.0
    target: TargetConfig = field(default_factory=TargetConfig)
    #: Closed form of the weight update: one of :data:`OBJECTIVES` (module doc).
    objective: str = "algorithm1"
    #: Weight of the erase term for ``objective="erase"`` (α ≤ 1).
    alpha: float = 0.5
    #: Optimise δᵃ together with δᵐ (eq. 25); False is Table 3's "w/o δᵢᵃ".
    optimize_attention: bool = True

    def __post_init__(self) -> None:
        self.layers = [int(x) for x in self.layers]
        if not isinstance(self.target, TargetConfig):
            self.target = TargetConfig(**dict(self.target))
        if self.objective not in OBJECTIVES:
            raise ConfigError(
                f"AdaPLE objective={self.objective!r} is not one of {list(OBJECTIVES)}"
            )
        if self.objective == "erase":
            objectives.check_alpha(self.alpha)

    def prepare(self, ctx: EditContext) -> None:
        ctx.stats.get(ctx.lm, self.layers)

    def targets(self, ctx: EditContext, requests: Sequence[EditRequest]) -> MLPTargets:
        return mlp_targets(
            ctx.lm,
            requests,
            ctx.templates,
            self.layers[-1],
            self.target,
            optimize_attention=self.optimize_attention,
        )

    def solve(
        self, resid: torch.Tensor, keys: torch.Tensor, cov: torch.Tensor, weight: torch.Tensor
    ) -> torch.Tensor:
        """Δ_l ``[d_out, d_in]`` from the spread residual r ``[d_out, n]``, keys K
        ``[d_in, n]``, C_l ``[d_in, d_in]`` and the current W_l ``[d_out, d_in]``."""
        w0k = weight.double() @ keys.double()  # [d_out, n] W₀K = V₁ (eq. 22)
        v2 = w0k + resid.double()  # [d_out, n] V₂: this layer's share of the target
        if self.objective == "algorithm1":
            return objectives.algorithm1_update(v2, w0k, keys, cov, self.lam)
        if self.objective == "paper":
            return objectives.paper_update(v2, w0k, keys, cov, self.lam)
        if self.objective == "exact":
            return objectives.exact_update(v2, w0k, keys, cov, self.lam)
        if self.objective == "memit":
            return objectives.memit_update(v2, w0k, keys, cov, self.lam)
        return objectives.erase_update(v2, w0k, w0k, keys, cov, self.lam, self.alpha)

    def compute_deltas(self, ctx: EditContext, requests: Sequence[EditRequest]) -> Deltas:
        with ctx.clock("targets"):
            z = self.targets(ctx, requests).z
        covs = ctx.stats.get(ctx.lm, self.layers)

        def solve(layer, resid, keys, weight):
            return self.solve(resid, keys, covs[layer], weight)

        return spread_mlp_target(ctx.lm, requests, ctx.templates, self.layers, z, solve,
                                 ctx.clock, ctx.layer_fusion)
