"""AlphaEdit (Fang et al., ICLR 2025): MEMIT's update projected onto the preserved keys'
null space.

Targets and residual spread as in :mod:`kaedit.methods.memit`: a residual-stream delta at
the last subject token of the last edit layer L gives z; for each edit layer l in order,
with the earlier layers' updates in place, R = (z − h^L_current) / (layers left) and keys K
at layer l. The update is

    Δ_l = R Kᵀ P_l (K_p K_pᵀ P_l + K Kᵀ P_l + α I)⁻¹

(:func:`~kaedit.methods.projections.solve_projected`): P_l = Û Ûᵀ projects onto the
eigenvectors of C_l = E[kkᵀ] of the unedited model with eigenvalue below
``nullspace_threshold`` (computed once in :meth:`prepare`), so Δ_l k ≈ 0 for the keys of
ordinary text; K_p K_pᵀ sums the keys of all edits committed in earlier steps (updated in
:meth:`commit`, on the edited model, as the reference does), so new edits also leave old
ones alone. There is no λC term: the projection takes its place.

A fusion that changes Δ (drop-and-rescale, top-k, matched noise) breaks Δ = ΔP: the
dropped entries' noise lands on the preserved keys. Neither AlphaEdit nor the DR paper
defines the combination; with ``project_fused`` the fused update is projected again,
Δ̂ = f(Δ)P (:meth:`AlphaEdit.fused_constraint`, issue 28): at ``fusion.scope=layer`` the
update kept in place for the later layers and the increment the runner applies are both
f(Δ_l)P_l, at step scope the runner projects the fused deltas. An unchanged Δ (``add``)
is not projected again, so it stays bit-identical.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from kaedit.methods.base import EditContext
from kaedit.methods.keys import add_key_sum, compute_keys, key_sums_from_state, key_sums_state
from kaedit.methods.projections import nullspace_projector, solve_projected
from kaedit.methods.solve import spread_residual
from kaedit.methods.targets import TargetConfig, optimize_targets
from kaedit.records import Deltas, EditRequest


@dataclass
class AlphaEdit:
    layers: Sequence[int]
    target: TargetConfig = field(default_factory=TargetConfig)
    #: Eigenvalues of E[kkᵀ] below this span the null space (reference hparams: 2e-2).
    nullspace_threshold: float = 1e-2
    #: α: ridge term of the solve (the reference's ``L2``).
    l2: float = 10.0
    #: Project what the fusion made of each Δ_l onto the null space again, Δ̂ = f(Δ)P_l
    #: (issue 28; :meth:`fused_constraint`). Off: the fused update is applied as it is.
    project_fused: bool = False
    #: P_l per layer, from the unedited model's statistics. Both matrices are d_in x d_in
    #: per layer (GPT-J: 1 GiB each in float32), so they are kept in float32 on the model's
    #: device; the solve itself runs in float64.
    projectors: dict[int, torch.Tensor] = field(default_factory=dict, init=False, repr=False)
    #: K_p K_pᵀ per layer: the keys of every edit committed so far.
    prev_kk: dict[int, torch.Tensor] = field(default_factory=dict, init=False, repr=False)
    #: Number of edit requests committed so far.
    n_committed: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        self.layers = [int(x) for x in self.layers]
        if not isinstance(self.target, TargetConfig):
            self.target = TargetConfig(**dict(self.target))

    # -- state ------------------------------------------------------------------------
    def prepare(self, ctx: EditContext) -> None:
        covs = ctx.stats.get(ctx.lm, self.layers)
        self.projectors = {
            layer: nullspace_projector(covs[layer], self.nullspace_threshold).float()
            for layer in self.layers
        }

    def null_dims(self) -> dict[int, int]:
        """Rank of each projector: the dimension of the null space edits may use."""
        return {layer: round(float(p.trace())) for layer, p in self.projectors.items()}

    def fused_constraint(self, ctx: EditContext) -> Callable[[str, torch.Tensor],
                                                             torch.Tensor] | None:
        """With ``project_fused``: ``project(name, Δ̂) = Δ̂P_l``, Δ̂ in the weight's own
        layout, P_l the float32 projector of the layer ``name`` belongs to, the product in
        float32 on Δ̂'s device. The runner applies it after the fusion
        (:func:`kaedit.fusion.constrained`); None without ``project_fused``."""
        if not self.project_fused:
            return None
        spec = ctx.lm.spec
        layer_of = {spec.weight("mlp_out", layer): layer for layer in self.layers}

        def project(name: str, fused: torch.Tensor) -> torch.Tensor:
            delta = spec.as_linear("mlp_out", fused)  # [d_out, d_in]
            proj = self.projectors[layer_of[name]].to(delta.device, delta.dtype)
            return spec.to_param("mlp_out", delta @ proj)  # [d_out, d_in] Δ̂P

        return project

    def commit(self, ctx: EditContext, requests: Sequence[EditRequest], applied: Deltas) -> None:
        # The runner has applied the step's (fused) deltas: keys come from the edited model.
        for layer in self.layers:
            add_key_sum(self.prev_kk, layer,
                        compute_keys(ctx.lm, layer, requests, ctx.templates))  # [d_in, n]
        self.n_committed += len(requests)

    def state_dict(self) -> dict[str, Any]:
        """Tensors only (safetensors-ready): ``prev_kk.{layer}`` and ``n_committed``."""
        return key_sums_state(self.prev_kk, self.n_committed)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.prev_kk, self.n_committed = key_sums_from_state(state)

    # -- edit -------------------------------------------------------------------------
    def compute_deltas(self, ctx: EditContext, requests: Sequence[EditRequest]) -> Deltas:
        if not self.projectors:
            raise RuntimeError("AlphaEdit.prepare(ctx) must run (on the unedited model) first")
        lm = ctx.lm
        z_module = lm.spec.module("layer", self.layers[-1])
        with ctx.clock("targets"):
            init, delta = optimize_targets(lm, requests, ctx.templates, [z_module],
                                           self.target)[z_module]
        z = init + delta  # [n, d] target residual stream at layer L

        def solve(layer, resid, keys, weight):
            prev = self.prev_kk.get(layer)
            return solve_projected(
                resid,
                keys,
                self.projectors[layer].to(keys.device),
                None if prev is None else prev.to(keys.device),
                self.l2,
            )

        return spread_residual(lm, requests, ctx.templates, self.layers, z, z_module, solve,
                               clock=ctx.clock, fuse=ctx.layer_fusion)
