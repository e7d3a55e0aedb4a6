"""ENCORE (Gupta et al. 2025, "Lifelong Sequential Knowledge Editing without Model
Degradation"): MEMIT with most-probable early stopping (MPES) of the targets and a
norm-constrained solve that keeps the keys of earlier edits in its normal equations.

Reference code: scalable-model-editing/knowledge-editing-regularization
``encore/encore_main.py`` (``execute_encore``), ``encore/compute_z.py`` (MPES),
``encore/compute_ks.py`` and ``hparams/ENCORE/*.json``.

Targets and residual spread as in :mod:`kaedit.methods.memit`: a residual-stream delta at
the last subject token of the last edit layer L gives z, optimised with
``target.early_stop_on="most_probable"`` (MPES, :class:`~kaedit.methods.targets.TargetConfig`);
for each edit layer l in order, with the earlier layers' updates in place,
R = (z − h^L_current) / (layers left) and keys K at layer l. The update is

    Δ_l = R Kᵀ (λC_l + μI + K_p K_pᵀ + K Kᵀ)⁻¹,

the minimiser of ‖ΔK − R‖² + λ tr(ΔC_lΔᵀ) + μ‖Δ‖²_F + ‖ΔK_p‖²
(:func:`~kaedit.methods.solve.solve_update`). As ``encore_main.py`` l. 253-283 forms it:
C_l = E[kkᵀ] of the unedited model scaled by ``mom2_update_weight`` (λ, l. 254-255), the
identity scaled by ``update_norm_lambda`` (μ, l. 257-258), the sum of K Kᵀ over every
earlier step added with weight 1 (its ``SEQ_CACHE``, l. 269-270; the comment at l. 279
speaks of scaling it by λ, the code does not), then the current K Kᵀ inside the solve
(l. 280-283). Only K Kᵀ is accumulated, no values: the earlier edits' outputs are kept at
what the current weights give them, not at their targets. μI penalises each step's Δ, not
the distance from the unedited weights.

K_p K_pᵀ is run state (:meth:`state_dict`), added to in :meth:`commit` once a step is
applied, with the keys the step's solve used (``encore_main.py`` l. 211, 272-276 stores
the ``layer_ks`` of the solve, computed with the earlier layers' updates in place).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from kaedit.errors import ConfigError
from kaedit.methods.base import EditContext
from kaedit.methods.keys import add_key_sum, compute_keys, key_sums_from_state, key_sums_state
from kaedit.methods.solve import solve_update, spread_residual
from kaedit.methods.targets import TargetConfig, optimize_targets
from kaedit.records import Deltas, EditRequest


def _mpes_target() -> TargetConfig:
    return TargetConfig(early_stop_on="most_probable")


def _nonnegative(name: str, value: Any, meaning: str) -> float:
    """``value`` as a float in [0, inf), else one ConfigError naming it and the range."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            0.0 <= float(value) < math.inf):
        raise ConfigError(f"ENCORE {name}={value!r} must be a finite number in [0, inf) "
                          f"({meaning})")
    return float(value)


@dataclass
class ENCORE:
    layers: Sequence[int]
    #: λ: weight of the preserved keys' E[kkᵀ] (the reference's ``mom2_update_weight``).
    lam: float = 15_000.0
    #: μ: weight of the Frobenius-norm penalty μ‖Δ‖² on each step's update (the
    #: reference's ``update_norm_lambda``; 10 for GPT2-XL and Llama-2-7B, 20 for Llama-3-8B,
    #: whose λ of 15,000 is the default here too).
    norm_weight: float = 20.0
    #: Keep the keys of every earlier edit in the solve (the reference's
    #: ``add_prev_edits``, true in all its ENCORE files). False: the solve is MEMIT's plus
    #: μI, and nothing is accumulated.
    add_prev_edits: bool = True
    #: MPES is ENCORE's; its step count is the reference's ``-prob_cutoff``.
    target: TargetConfig = field(default_factory=_mpes_target)
    #: K_p K_pᵀ per layer ``[d_in, d_in]`` float32: the keys of every edit committed so far.
    prev_kk: dict[int, torch.Tensor] = field(default_factory=dict, init=False, repr=False)
    #: Number of edit requests committed so far.
    n_committed: int = field(default=0, init=False)
    #: (requests, {layer: K}) of the last :meth:`compute_deltas`, for :meth:`commit`; not
    #: run state (a resumed run recomputes its step).
    _pending: tuple[tuple[EditRequest, ...], dict[int, torch.Tensor]] | None = field(
        default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.layers = [int(x) for x in self.layers]
        if not self.layers:
            raise ConfigError("ENCORE layers=[] must name at least one edit layer")
        if not isinstance(self.target, TargetConfig):
            self.target = TargetConfig(**dict(self.target))
        self.lam = _nonnegative("lam", self.lam, "the weight of the preserved keys' E[kkᵀ]")
        self.norm_weight = _nonnegative("norm_weight", self.norm_weight,
                                        "the weight of the penalty μ‖Δ‖² on the update")
        if self.lam == 0.0 and self.norm_weight == 0.0:
            raise ConfigError("ENCORE lam=0 and norm_weight=0 leave the solve singular (K Kᵀ "
                              "has rank ≤ the number of edits): one of them must be > 0")
        if not isinstance(self.add_prev_edits, bool):
            raise ConfigError(f"ENCORE add_prev_edits={self.add_prev_edits!r} must be true "
                              "or false")

    # -- state ------------------------------------------------------------------------
    def prepare(self, ctx: EditContext) -> None:
        ctx.stats.get(ctx.lm, self.layers)

    def commit(self, ctx: EditContext, requests: Sequence[EditRequest], applied: Deltas) -> None:
        pending, self._pending = self._pending, None
        if self.add_prev_edits:
            # The keys the step's solve used (encore_main.py l. 272-276); if this step was
            # not computed here (another caller), those of the edited model, which equal
            # them for an unfused step: layer l's keys only see the layers below l.
            used = pending[1] if pending is not None and pending[0] == tuple(requests) else {}
            for layer in self.layers:
                keys = used.get(layer)
                if keys is None:
                    keys = compute_keys(ctx.lm, layer, requests, ctx.templates)
                add_key_sum(self.prev_kk, layer, keys)  # [d_in, n]
        self.n_committed += len(requests)

    def state_dict(self) -> dict[str, Any]:
        """Tensors only (safetensors-ready): ``prev_kk.{layer}`` and ``n_committed``."""
        return key_sums_state(self.prev_kk, self.n_committed)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.prev_kk, self.n_committed = key_sums_from_state(state)
        self._pending = None

    # -- edit -------------------------------------------------------------------------
    def compute_deltas(self, ctx: EditContext, requests: Sequence[EditRequest]) -> Deltas:
        lm = ctx.lm
        z_module = lm.spec.module("layer", self.layers[-1])
        with ctx.clock("targets"):
            init, delta = optimize_targets(lm, requests, ctx.templates, [z_module],
                                           self.target)[z_module]
        z = init + delta  # [n, d] target residual stream at layer L
        covs = ctx.stats.get(lm, self.layers)
        used: dict[int, torch.Tensor] = {}

        def solve(layer, resid, keys, weight):  # Δ = R Kᵀ(λC + μI + K_pK_pᵀ + KKᵀ)⁻¹
            used[layer] = keys.detach()
            prev = self.prev_kk.get(layer) if self.add_prev_edits else None
            return solve_update(resid, keys, covs[layer], self.lam, ridge=self.norm_weight,
                                prev_kk=None if prev is None else prev.to(keys.device))

        deltas = spread_residual(lm, requests, ctx.templates, self.layers, z, z_module, solve,
                                 clock=ctx.clock, fuse=ctx.layer_fusion)
        self._pending = (tuple(requests), used)
        return deltas
