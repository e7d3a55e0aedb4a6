"""Fusion: how a step's deltas are merged into the model. Pure functions over tensors.

A fusion strategy maps the deltas a method computed at step t to the increment actually
added to the weights. Randomness comes only from the ``generator`` passed in (the runner
derives it from the run seed and the step), so a step is reproducible and resumable.

* :class:`Add` -- vanilla: W ← W + Δ.
* :class:`TopK` -- keep the k% largest-magnitude entries of each Δ ("TR", paper §3.2).
* :class:`DropRescale` -- DR, paper eq. 5: M ~ Bernoulli(p), Δ̂ = (1 − M) ⊙ Δ / (1 − p).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from kaedit.records import Deltas


@runtime_checkable
class Fusion(Protocol):
    def __call__(self, deltas: Deltas, generator: torch.Generator) -> Deltas: ...


def top_k(delta: torch.Tensor, k: float) -> torch.Tensor:
    """Zero all but the ``k`` fraction (0 < k ≤ 1) of entries with the largest |value|."""
    if not 0.0 < k <= 1.0:
        raise ValueError(f"top_k fraction k={k} must be in (0, 1]")
    n_keep = max(1, round(k * delta.numel()))
    flat = delta.reshape(-1)
    idx = flat.abs().topk(n_keep, sorted=False).indices
    out = torch.zeros_like(flat)
    out[idx] = flat[idx]
    return out.view_as(delta)


def drop_rescale(delta: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
    """Paper eq. 5: drop each entry with probability ``p``, rescale survivors by 1/(1−p)."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"drop rate p={p} must be in [0, 1)")
    if p == 0.0:
        return delta.clone()
    keep = torch.rand(delta.shape, generator=generator, device=generator.device) >= p
    return delta * keep.to(delta.device, delta.dtype) / (1.0 - p)


@dataclass(frozen=True)
class Add:
    def __call__(self, deltas: Deltas, generator: torch.Generator) -> Deltas:
        return {n: d.clone() for n, d in deltas.items()}


@dataclass(frozen=True)
class TopK:
    #: Fraction of entries kept (the paper's "top 20%" is k=0.2).
    k: float = 0.2

    def __post_init__(self) -> None:
        if not 0.0 < self.k <= 1.0:
            raise ValueError(f"fusion.k={self.k} must be in (0, 1]")

    def __call__(self, deltas: Deltas, generator: torch.Generator) -> Deltas:
        return {n: top_k(d, self.k) for n, d in deltas.items()}


@dataclass(frozen=True)
class DropRescale:
    #: Drop rate p (paper default 0.8; it sweeps 0.7-0.9).
    p: float = 0.8

    def __post_init__(self) -> None:
        if not 0.0 <= self.p < 1.0:
            raise ValueError(f"fusion.p={self.p} must be in [0, 1)")

    def __call__(self, deltas: Deltas, generator: torch.Generator) -> Deltas:
        # sorted: the mask of each tensor must not depend on dict insertion order
        return {n: drop_rescale(deltas[n], self.p, generator) for n in sorted(deltas)}
