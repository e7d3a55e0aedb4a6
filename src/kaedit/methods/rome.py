"""ROME (Meng et al. 2022a): a rank-one update of one layer's MLP down-projection.

For a request: the key k* is the input of the down-projection at the last subject token,
averaged flat over the context templates (:func:`~kaedit.methods.keys.compute_keys`,
every template its own group, as ROME's ``compute_u``); the value
v* = m + δ is the projection's original output m at the plain prompt plus a delta
optimised at that output so the new object becomes likely
(:func:`~kaedit.methods.targets.optimize_targets`). The closed form (ROME eq. 2)

    Δ = (v* − W k*) (C⁻¹k*)ᵀ / ((C⁻¹k*)ᵀ k*),    C = E[kkᵀ] (uncentered)

makes (W + Δ) k* = v* exactly (W k* includes the projection's bias, if any). A batch is
edited one request after the other, each computed on the model with the earlier requests'
updates in place (temporarily); the sum of the rank-one updates is returned.

One matrix, no layer loop: ``EditContext.layer_fusion`` is not used, and
``fusion.scope=layer`` fuses the returned Δ once after the method, as ``step`` does
(with the weight's own generator, :func:`kaedit.fusion.layer_generator`).

This is the paper's equation. The reference code (``rome/compute_v.py``) keeps the
direction C⁻¹k* but uses the plain prompt's key k_p for the value:
Δ = (v* − W k_p)(C⁻¹k*)ᵀ / ((C⁻¹k*)ᵀ k_p), exact at k_p instead of at k*. On SmolLM2 the
two gave the same efficacy (6 records, layers 3 and 5).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from kaedit.hooks import get_module
from kaedit.methods.base import EditContext, Stateless
from kaedit.methods.keys import compute_keys
from kaedit.methods.projections import rank_one_update
from kaedit.methods.targets import TargetConfig, optimize_targets
from kaedit.methods.templates import Templates
from kaedit.models import LoadedModel
from kaedit.records import Deltas, EditRequest
from kaedit.weights import applied


@dataclass
class ROME(Stateless):
    layer: int
    #: v* optimisation; the delta is clamped relative to the MLP output's norm (ROME: 4).
    target: TargetConfig = field(default_factory=lambda: TargetConfig(clamp_norm_factor=4.0))

    def __post_init__(self) -> None:
        self.layer = int(self.layer)
        if not isinstance(self.target, TargetConfig):
            self.target = TargetConfig(**dict(self.target))

    @property
    def layers(self) -> tuple[int]:
        """The one layer ROME edits (``EditMethod.layers``)."""
        return (self.layer,)

    def prepare(self, ctx: EditContext) -> None:
        ctx.stats.get(ctx.lm, [self.layer])

    def key_value(
        self, lm: LoadedModel, request: EditRequest, templates: Sequence[str]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(k* ``[d_in]``, v* ``[d_out]``) for one request on the model as it is now."""
        module = lm.spec.module("mlp_out", self.layer)
        # ROME averages k* flat over its templates (kmeng01/rome ``rome/compute_u.py``),
        # not per group as MEMIT's compute_ks does.
        k = compute_keys(lm, self.layer, [request], Templates.ungrouped(templates))[:, 0]
        init, delta = optimize_targets(lm, [request], templates, [module], self.target)[module]
        return k, (init + delta)[0]  # v* [d_out]

    def compute_deltas(self, ctx: EditContext, requests: Sequence[EditRequest]) -> Deltas:
        lm = ctx.lm
        cov = ctx.stats.get(lm, [self.layer])[self.layer]  # [d_in, d_in]
        proj = get_module(lm.model, lm.spec.module("mlp_out", self.layer))
        name = lm.spec.weight("mlp_out", self.layer)
        total: torch.Tensor | None = None  # float64 [d_out, d_in]
        for request in requests:
            done = {} if total is None else {name: lm.spec.to_param("mlp_out", total.float())}
            with applied(lm.model, done):
                k, v = self.key_value(lm, request, ctx.templates)
                with torch.no_grad():
                    wk = proj(k.to(proj.weight.dtype)).float()  # W k* (+ b) [d_out]
            delta = rank_one_update(v - wk, k, cov)  # [d_out, d_in]
            total = delta if total is None else total + delta
        return {} if total is None else {name: lm.spec.to_param("mlp_out", total.float())}
