"""Apply weight deltas to a model, temporarily or for good, and check them first."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from kaedit.records import Deltas


def parameters(model: nn.Module, names: Iterable[str]) -> dict[str, nn.Parameter]:
    params = dict(model.named_parameters())
    missing = [n for n in names if n not in params]
    if missing:
        raise KeyError(f"parameters {missing} do not exist in {type(model).__name__}")
    return {n: params[n] for n in names}


def snapshot(model: nn.Module, names: Iterable[str]) -> Deltas:
    """Copies of the named parameters (to restore them exactly later)."""
    return {n: p.detach().clone() for n, p in parameters(model, names).items()}


@torch.no_grad()
def restore(model: nn.Module, saved: Deltas) -> None:
    for n, p in parameters(model, saved).items():
        p.copy_(saved[n])


@torch.no_grad()
def apply_deltas(model: nn.Module, deltas: Deltas, alpha: float = 1.0) -> None:
    """``W += alpha * delta`` for every parameter in ``deltas`` (shapes must match)."""
    for n, p in parameters(model, deltas).items():
        d = deltas[n]
        if d.shape != p.shape:
            raise ValueError(f"delta for {n} has shape {tuple(d.shape)}, weight {tuple(p.shape)}")
        p.add_(d.to(device=p.device, dtype=p.dtype), alpha=alpha)


@contextlib.contextmanager
def applied(model: nn.Module, deltas: Deltas) -> Iterator[None]:
    """Add ``deltas`` while inside the block; restore the exact original weights after."""
    saved = snapshot(model, deltas)
    try:
        apply_deltas(model, deltas)
        yield
    finally:
        restore(model, saved)


def add_into(total: Deltas, deltas: Deltas) -> Deltas:
    """``total + deltas`` as a new dict (float32 on the CPU), for the run's running sum."""
    out = dict(total)
    for n, d in deltas.items():
        d = d.detach().to("cpu", torch.float32)
        out[n] = out[n] + d if n in out else d.clone()
    return out


def delta_problem(deltas: Deltas, max_norm: float | None) -> str | None:
    """Why ``deltas`` must not be applied (NaN/Inf, norm above ``max_norm``), or None."""
    for n, d in deltas.items():
        if not torch.isfinite(d).all():
            bad = int((~torch.isfinite(d)).sum())
            return f"delta for {n} has {bad} non-finite entries"
        if max_norm is not None:
            norm = float(d.float().norm())
            if not math.isfinite(norm) or norm > max_norm:
                return f"delta for {n} has norm {norm:.4g} > max_delta_norm={max_norm:g}"
    return None
