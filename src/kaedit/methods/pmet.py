"""PMET (Li et al. 2023b, "Precise Model Editing in a Transformer").

Target values: additive deltas δᵃ on the attention output a^L and δᵐ on the MLP output m^L
at the last subject token of the last edit layer L, optimised jointly
(:func:`~kaedit.methods.targets.optimize_targets` with both modules); only the MLP target
z = m^L + δᵐ is kept. Only the MLP down-projections of the edit layers are updated: for
each edit layer l in order, with the earlier layers' updates in place,
cur = m^L (recomputed), R = (z − cur) / √(number of layers left), keys K at layer l
(template-averaged), Δ_l = R Kᵀ(λC_l + KKᵀ)⁻¹.

Checked against the reference code (github.com/xpq-tech/PMET, ``edit/pmet/pmet_main.py``
and ``compute_zs.py``): the target is the output of the MLP down-projection at layer L
(``mlp_module_tmp``, the same module whose weights are rewritten), ``cur`` is re-read at
layer L after each layer's update, the residual is divided by ``np.sqrt(len(layers) - i)``
and the solve is ``R Kᵀ (KKᵀ + mom2_update_weight · C)⁻¹`` -- all as above, so nothing
here departs from it. Differences that remain live in the shared target optimisation
(:mod:`kaedit.methods.targets`, used unchanged by every method): the reference's weight decay
is ‖δ‖/‖init‖² (not squared), its KL term is KL(edited ‖ original) with ``batchmean``, it
lowers the NLL weight 10× once the target token is already the argmax, and its GPT-J
settings are ``clamp_norm_factor`` 0.75 and ``kl_factor`` 1; here the model config's
``edit.target`` settings apply, as for MEMIT.

:func:`mlp_targets` and :func:`spread_mlp_target` are shared with AdaPLE
(:mod:`kaedit.methods.adaple`), which only changes the closed-form solve.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from kaedit.methods.base import EditContext, Stateless
from kaedit.methods.solve import LayerSolver, solve_update, spread_residual
from kaedit.methods.targets import TargetConfig, optimize_targets
from kaedit.models import LoadedModel
from kaedit.records import Deltas, EditRequest
from kaedit.timing import Stopwatch


@dataclass(frozen=True)
class MLPTargets:
    """Optimised targets at the last edit layer L."""

    #: Target MLP output z = m^L + δᵐ at the last subject token ``[n, d]``.
    z: torch.Tensor
    #: The optimised delta of every module that had one (attention output and/or MLP
    #: output, keyed by module path), each ``[n, d]``.
    deltas: dict[str, torch.Tensor]


def mlp_targets(
    lm: LoadedModel,
    requests: Sequence[EditRequest],
    templates: Sequence[str],
    layer: int,
    cfg: TargetConfig,
    optimize_attention: bool = True,
) -> MLPTargets:
    """Optimise δᵃ (if ``optimize_attention``) and δᵐ jointly at ``layer``; z = m^L + δᵐ.

    PMET's targets, AdaPLE eq. 25 (``optimize_attention=False``: δᵐ only, Table 3
    "w/o δᵃ"). δᵃ shapes the optimum of δᵐ but is then dropped.
    """
    mlp = lm.spec.module("mlp_out", layer)
    modules = ([lm.spec.module("attn_out", layer)] if optimize_attention else []) + [mlp]
    out = optimize_targets(lm, requests, templates, modules, cfg)
    init, delta = out[mlp]  # [n, d] each
    return MLPTargets(z=init + delta, deltas={m: d for m, (_, d) in out.items()})


def spread_mlp_target(
    lm: LoadedModel,
    requests: Sequence[EditRequest],
    templates: Sequence[str],
    layers: Sequence[int],
    z: torch.Tensor,
    solve: LayerSolver,
    clock: Stopwatch | None = None,
    fuse: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
) -> Deltas:
    """PMET's spread: z is the MLP output target at L = ``layers[-1]``, R = (z − m^L)/√(left)
    (√(L − l + 1) of the paper's Algorithm 1 for contiguous layers). ``fuse``: the layer
    fusion of :func:`~kaedit.methods.solve.spread_residual` (``fusion.scope=layer``)."""
    z_module = lm.spec.module("mlp_out", layers[-1])
    return spread_residual(lm, requests, templates, layers, z, z_module, solve, math.sqrt,
                           clock, fuse)


@dataclass
class PMET(Stateless):
    layers: Sequence[int]
    #: λ: weight of the preserved-key covariance (``mom2_update_weight``).
    lam: float = 15_000.0
    target: TargetConfig = field(default_factory=TargetConfig)

    def __post_init__(self) -> None:
        self.layers = [int(x) for x in self.layers]
        if not isinstance(self.target, TargetConfig):
            self.target = TargetConfig(**dict(self.target))

    def prepare(self, ctx: EditContext) -> None:
        ctx.stats.get(ctx.lm, self.layers)

    def targets(self, ctx: EditContext, requests: Sequence[EditRequest]) -> MLPTargets:
        return mlp_targets(ctx.lm, requests, ctx.templates, self.layers[-1], self.target)

    def compute_deltas(self, ctx: EditContext, requests: Sequence[EditRequest]) -> Deltas:
        with ctx.clock("targets"):
            z = self.targets(ctx, requests).z
        covs = ctx.stats.get(ctx.lm, self.layers)

        def solve(layer, resid, keys, weight):  # Δ = R Kᵀ(λC + KKᵀ)⁻¹ (paper eq. 2)
            return solve_update(resid, keys, covs[layer], self.lam)

        return spread_mlp_target(ctx.lm, requests, ctx.templates, self.layers, z, solve,
                                 ctx.clock, ctx.layer_fusion)
