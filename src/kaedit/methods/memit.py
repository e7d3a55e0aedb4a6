"""MEMIT (Meng et al. 2022b): mass-editing with a residual spread over several layers.

Target values: a residual-stream delta at the last subject token of the last edit layer L
(:func:`~kaedit.methods.core.optimize_targets`). For each edit layer l in order, with the
updates of the earlier layers in place: R = (z − h^L_current) / (number of layers left),
keys K at layer l, Δ_l = R Kᵀ(λC_l + KKᵀ)⁻¹ (paper eq. 2). The model is restored before
returning; the runner applies the deltas.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from kaedit.methods.base import EditContext, Stateless
from kaedit.methods.core import (
    TargetConfig,
    compute_keys,
    hidden_at_subject,
    optimize_targets,
    solve_update,
)
from kaedit.records import Deltas, EditRequest
from kaedit.weights import applied


@dataclass
class MEMIT(Stateless):
    layers: Sequence[int]
    #: λ: weight of the preserved-key covariance (MEMIT's ``mom2_update_weight``).
    lam: float = 15_000.0
    target: TargetConfig = field(default_factory=TargetConfig)

    def __post_init__(self) -> None:
        self.layers = [int(x) for x in self.layers]
        if isinstance(self.target, dict) or not isinstance(self.target, TargetConfig):
            self.target = TargetConfig(**dict(self.target))

    def prepare(self, ctx: EditContext) -> None:
        ctx.stats.get(ctx.lm, self.layers)

    def compute_deltas(self, ctx: EditContext, requests: Sequence[EditRequest]) -> Deltas:
        lm = ctx.lm
        z_module = lm.spec.module("layer", self.layers[-1])
        init, delta = optimize_targets(lm, requests, ctx.templates, [z_module], self.target)[
            z_module
        ]
        z = init + delta  # [n, d] target residual stream at layer L
        covs = ctx.stats.get(lm, self.layers)
        deltas: Deltas = {}
        for i, layer in enumerate(self.layers):
            with applied(lm.model, deltas):  # earlier layers' updates in place
                keys = compute_keys(lm, layer, requests, ctx.templates)  # [d_in, n]
                cur = hidden_at_subject(lm, z_module, requests)  # [n, d]
            resid = (z - cur).T / (len(self.layers) - i)  # [d_out, n]
            upd = solve_update(resid, keys, covs[layer], self.lam)
            deltas[lm.spec.weight("mlp_out", layer)] = upd.to(torch.float32)
        return deltas
