"""MEMIT (Meng et al. 2022b): mass-editing with a residual spread over several layers.

Target values: a residual-stream delta at the last subject token of the last edit layer L
(:func:`~kaedit.methods.targets.optimize_targets`). For each edit layer l in order, with the
updates of the earlier layers in place: R = (z − h^L_current) / (number of layers left),
keys K at layer l, Δ_l = R Kᵀ(λC_l + KKᵀ)⁻¹ (paper eq. 2). The model is restored before
returning; the runner applies the deltas.

``batch_targets=False`` optimises each request's target alone, one after the other, as the
reference MEMIT code does; the result is the same up to numerics (tests check it), only
slower. ``make bench`` uses it as the labelled one-at-a-time baseline.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from kaedit.methods.base import EditContext, Stateless
from kaedit.methods.solve import solve_update, spread_residual
from kaedit.methods.targets import TargetConfig, optimize_targets
from kaedit.records import Deltas, EditRequest


@dataclass
class MEMIT(Stateless):
    layers: Sequence[int]
    #: λ: weight of the preserved-key covariance (MEMIT's ``mom2_update_weight``).
    lam: float = 15_000.0
    target: TargetConfig = field(default_factory=TargetConfig)
    #: Optimise the targets of a batch's requests together (False: one request at a time).
    batch_targets: bool = True

    def __post_init__(self) -> None:
        self.layers = [int(x) for x in self.layers]
        if isinstance(self.target, dict) or not isinstance(self.target, TargetConfig):
            self.target = TargetConfig(**dict(self.target))

    def prepare(self, ctx: EditContext) -> None:
        ctx.stats.get(ctx.lm, self.layers)

    def targets(self, ctx: EditContext, requests: Sequence[EditRequest]) -> torch.Tensor:
        """z ``[n, d]``: the target residual stream at the last subject token of layer L."""
        z_module = ctx.lm.spec.module("layer", self.layers[-1])
        groups = [requests] if self.batch_targets else [[r] for r in requests]
        parts = []
        for group in groups:
            init, delta = optimize_targets(ctx.lm, group, ctx.templates, [z_module],
                                           self.target)[z_module]
            parts.append(init + delta)
        return torch.cat(parts)

    def compute_deltas(self, ctx: EditContext, requests: Sequence[EditRequest]) -> Deltas:
        lm = ctx.lm
        z_module = lm.spec.module("layer", self.layers[-1])
        with ctx.clock("targets"):
            z = self.targets(ctx, requests)  # [n, d] target residual stream at layer L
        covs = ctx.stats.get(lm, self.layers)

        def solve(layer, resid, keys, weight):  # Δ = R Kᵀ(λC + KKᵀ)⁻¹ (paper eq. 2)
            return solve_update(resid, keys, covs[layer], self.lam)

        return spread_residual(lm, requests, ctx.templates, self.layers, z, z_module, solve,
                               clock=ctx.clock, fuse=ctx.layer_fusion)
