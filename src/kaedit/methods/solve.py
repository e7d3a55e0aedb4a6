"""The closed-form MLP update and the layer loop that spreads it (MEMIT, PMET, AdaPLE).

* :func:`solve_update` -- Δ = R Kᵀ (λC + c·K Kᵀ)⁻¹ (paper eq. 2 and 4), optionally with
  ENCORE's μI and earlier edits' K_p K_pᵀ in the inverse.
* :func:`spread_residual` -- the change z − cur spread over the edit layers in order,
  each layer solved with the earlier layers' (fused) updates in place.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from kaedit.methods.keys import (
    BlockStart,
    compute_keys,
    first_block,
    hidden_at_subject,
    key_encodings,
    plain_encodings,
)
from kaedit.models import LoadedModel
from kaedit.records import Deltas, EditRequest
from kaedit.timing import Stopwatch
from kaedit.weights import applied

#: ``solve(layer, resid [d_out, n], keys [d_in, n], weight [d_out, d_in]) -> Δ_l``;
#: ``weight`` is the layer's current down-projection (earlier layers' updates included).
LayerSolver = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def spread_residual(
    lm: LoadedModel,
    requests: Sequence[EditRequest],
    templates: Sequence[str],
    layers: Sequence[int],
    z: torch.Tensor,
    z_module: str,
    solve: LayerSolver,
    share: Callable[[int], float] = float,
    clock: Stopwatch | None = None,
    fuse: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
) -> Deltas:
    """Spread the change z − cur over the edit layers' down-projections, in order.

    For edit layer l (the updates of the earlier layers temporarily in place): keys K at l,
    cur = output of ``z_module`` at the last subject token, R = (z − cur) / share(layers
    left, l included), Δ_l = ``solve(l, R, K, W_l)``. ``share=float`` is MEMIT's even spread,
    ``math.sqrt`` PMET's / AdaPLE's (Algorithm 1). ``z`` is ``[n, d]``.

    ``fuse`` (``fusion.scope=layer``, ``EditContext.layer_fusion``): the update of layer l
    kept in place for the later layers is ``fuse(name, Δ_l)`` (Algorithm 1: W₁ˡ ← W₀ˡ + Δ̂ˡ
    inside the loop), so their keys and residual see what was dropped and compensate.
    Without it the undropped Δ_l stays in place (MEMIT/PMET; fusion after the loop).

    Returns ``{down-projection weight name: Δ_l}`` (float32), undropped (the runner fuses
    them with the same function); the model is left unchanged. Time goes to ``clock``'s
    stages "keys" (keys and current outputs) and "solve".
    """
    clock = clock or Stopwatch()
    deltas: Deltas = {}
    in_place: Deltas = {}  # what the later layers see: Δ_l, or fuse(Δ_l) at layer scope
    with clock("keys"):  # blocks below the lowest edited one never change in this loop:
        # their output, the input of that block, is computed once (issue 30)
        start = first_block(lm, [lm.spec.module("mlp_out", layer) for layer in layers])
        key_in = BlockStart.build(lm, key_encodings(lm, requests, templates), start)
        plain_in = BlockStart.build(lm, plain_encodings(lm, requests), start)
    for i, layer in enumerate(layers):
        name = lm.spec.weight("mlp_out", layer)
        with clock("keys"), applied(lm.model, in_place):  # earlier layers' updates in place
            keys = compute_keys(lm, layer, requests, templates, prepared=key_in)  # [d_in, n]
            cur = hidden_at_subject(lm, z_module, requests, prepared=plain_in)  # [n, d]
            weight = lm.spec.as_linear("mlp_out", lm.model.get_parameter(name))
            weight = weight.detach().clone()  # [d_out, d_in]
        resid = (z - cur).T / share(len(layers) - i)  # [d_out, n]
        with clock("solve"):  # stored in the weight's own layout (GPT-2: [d_in, d_out])
            deltas[name] = lm.spec.to_param("mlp_out", solve(layer, resid, keys, weight)
                                            .to(torch.float32))
        in_place[name] = deltas[name] if fuse is None else fuse(name, deltas[name])
    return deltas


def solve_update(
    resid: torch.Tensor,
    keys: torch.Tensor,
    cov: torch.Tensor,
    lam: float,
    kk_coef: float = 1.0,
    ridge: float = 0.0,
    prev_kk: torch.Tensor | None = None,
) -> torch.Tensor:
    """Δ = R Kᵀ (λC + μI + K_p K_pᵀ + c·K Kᵀ)⁻¹ in float64 (paper eq. 2 with c=1; eq. 4
    with c=2; μ = ``ridge`` and K_p K_pᵀ = ``prev_kk`` are 0 unless given).

    ``resid`` R ``[d_out, n]``, ``keys`` K ``[d_in, n]``, ``cov`` C ``[d_in, d_in]``;
    returns Δ ``[d_out, d_in]`` (the orientation of ``nn.Linear.weight``). Solved as
    A X = K with A symmetric, then Δ = R Xᵀ, never forming an inverse.

    With ``ridge`` and ``prev_kk`` (ENCORE, :mod:`kaedit.methods.encore`) Δ minimises
    ‖ΔK − R‖² + λ tr(ΔCΔᵀ) + μ‖Δ‖²_F + ‖ΔK_p‖² (c = 1): a Frobenius-norm penalty on the
    update and the keys K_p of earlier edits kept where they are.
    """
    K = keys.double()
    A = lam * cov.double()  # [d_in, d_in]
    if ridge:
        A.diagonal().add_(ridge)
    if prev_kk is not None:
        A = A + prev_kk.to(device=A.device, dtype=torch.float64)
    A = A + kk_coef * (K @ K.T)
    X = torch.linalg.solve(A, K)  # [d_in, n] = A⁻¹ K
    return (resid.double() @ X.T).float()
