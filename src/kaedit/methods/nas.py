"""Norm-Anchor Scaling of value vectors (arXiv 2602.02543; SasyaTitech/NAS): v* rescaled to
a norm anchor, or replaced by its unedited value when far above it. Applied by
:func:`kaedit.methods.targets.optimize_targets` (``TargetConfig.nas_anchor``); the anchor
itself is :func:`kaedit.methods.targets.nas_anchor`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from kaedit.methods.keys import hidden_at_subject
from kaedit.models import LoadedModel
from kaedit.records import EditRequest


def nas_scale(v_star: torch.Tensor, v0: torch.Tensor, anchor: float,
              skip_factor: float) -> torch.Tensor:
    """Norm-Anchor Scaling of value vectors ``v_star`` ``[n, d]`` (one per row).

    SasyaTitech/NAS ``NAS/compute_z.py`` l. 219-229 (the same in its
    ``baselines/memit/compute_z.py`` l. 211-222): a row with ‖v*‖ > ``skip_factor`` ·
    ``anchor`` is replaced by its ``v0`` (the MLP output before the edit: that request is
    not edited); every other row is rescaled to norm ``anchor`` (``util/vstar_stats.py``
    l. 35-42, ``scale_vector_to_norm``). A zero row stays zero."""
    norm = v_star.norm(dim=1, keepdim=True)  # [n, 1]
    tiny = torch.finfo(v_star.dtype).tiny
    scaled = torch.where(norm > 0, v_star * (anchor / norm.clamp_min(tiny)), v_star)
    return torch.where(norm > skip_factor * anchor, v0, scaled)


def nas_v0(lm: LoadedModel, module: str, requests: Sequence[EditRequest],
           init: torch.Tensor) -> torch.Tensor | None:
    """v0 ``[n, d]`` of a target at ``module``: the MLP output of the model as it is (before
    this step's edit) at the last subject token of the plain prompt. At an MLP output the
    target's own ``init``; at a block's output (MEMIT's, AlphaEdit's z) the MLP output of
    that block, so that v* = v0 + δ (the
    reference's ``res_pre_mlp = target_init − v0``, ``v_star = delta + v0``,
    NAS/compute_z.py l. 202-216). None for any other module (PMET's attention output)."""
    layer = lm.spec.layer_of(module)
    if layer is None:
        return None
    mlp = lm.spec.module("mlp_out", layer)
    if module == mlp:
        return init
    if module == lm.spec.module("layer", layer):
        return hidden_at_subject(lm, mlp, requests)
    return None


def apply_nas(
    lm: LoadedModel,
    requests: Sequence[EditRequest],
    targets: dict[str, tuple[torch.Tensor, torch.Tensor]],
    anchor: float,
    skip_factor: float,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """:func:`optimize_targets`'s ``{module: (init, delta)}`` with NAS applied to every value
    vector v* = v0 + δ (:func:`nas_v0`): δ becomes nas_scale(v*) − v0 (:func:`nas_scale`),
    so the target init + δ is the reference's ``res_pre_mlp + v_star``. Other modules
    (attention outputs) are unchanged."""
    out = {}
    for module, (init, delta) in targets.items():
        v0 = nas_v0(lm, module, requests, init)
        if v0 is not None:
            v0 = v0.to(delta.dtype)
            delta = nas_scale(v0 + delta, v0, anchor, skip_factor) - v0
        out[module] = (init, delta)
    return out


def upper_trimmed_mean(values: torch.Tensor, upper_quantile: float = 0.95) -> float:
    """Mean of ``values`` without the largest ``floor((1 − q)·n)`` of them, in float64
    (SasyaTitech/NAS ``util/vstar_stats.py`` l. 358-374, ``_upper_trimmed_mean``)."""
    if not 0.0 < upper_quantile <= 1.0:
        raise ValueError(f"upper_quantile={upper_quantile} must be in (0, 1]")
    v = values.detach().double().flatten().sort().values
    drop = math.floor((1.0 - upper_quantile) * v.numel())
    kept = v[: v.numel() - drop]
    if kept.numel() == 0:
        raise ValueError("upper_trimmed_mean: no values left")
    return float(kept.mean())
