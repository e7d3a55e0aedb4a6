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


class EditedWeights:
    """A run's edits to a model: each edited weight is set to W₀ + (sum of its deltas).

    The sum is kept in float32 on the CPU and the weight is recomputed from W₀ rather than
    incremented in place, so rounding never accumulates in a low-precision weight and a
    run resumed from a checkpoint of ``total`` has bit-identical weights.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.base: Deltas = {}
        self.total: Deltas = {}
        self._base_sq = 0.0  # ‖W₀‖_F² over ``base``, grown as weights are first edited

    def _check(self, deltas: Deltas) -> dict[str, torch.nn.Parameter]:
        params = parameters(self.model, deltas)
        for n, d in deltas.items():
            if d.shape != params[n].shape:
                raise ValueError(
                    f"delta for {n} has shape {tuple(d.shape)}, weight {tuple(params[n].shape)}"
                )
            if n not in self.base:  # never edited so far: its current value is W₀
                self.base[n] = params[n].detach().clone()
                self._base_sq += frobenius({n: self.base[n]}) ** 2
                self.total[n] = torch.zeros(params[n].shape, dtype=torch.float32)
        return params

    @staticmethod
    def _set(p: torch.nn.Parameter, base: torch.Tensor, total: torch.Tensor) -> None:
        p.copy_((base.float() + total.to(p.device)).to(p.dtype))

    @torch.no_grad()
    def add(self, deltas: Deltas) -> None:
        params = self._check(deltas)
        for n, d in deltas.items():
            self.total[n] = self.total[n] + d.detach().to("cpu", torch.float32)
            self._set(params[n], self.base[n], self.total[n])

    @contextlib.contextmanager
    @torch.no_grad()
    def serving(self, offset: Deltas) -> Iterator[None]:
        """Inside the block each weight in ``offset`` is W₀ + (total + offset) -- the weights
        a fusion serves, e.g. Lookahead's slow weights; after it, W₀ + total again, exactly
        as :meth:`add` left it. An empty ``offset`` changes nothing."""
        params = self._check(offset)
        try:
            for n, d in offset.items():
                self._set(
                    params[n], self.base[n], self.total[n] + d.detach().to("cpu", torch.float32)
                )
            yield
        finally:
            for n in offset:
                self._set(params[n], self.base[n], self.total[n])

    def drift(self) -> tuple[float, float]:
        """``(‖W − W₀‖_F, ‖W₀‖_F)`` over the weights edited so far (:func:`frobenius`; the
        working weights W₀ + total, not a fusion's served offset). ‖W₀‖ is summed once,
        when each weight is first edited, not every step."""
        return frobenius(self.total), math.sqrt(self._base_sq)

    @torch.no_grad()
    def unedited(self, name: str) -> torch.Tensor:
        """W₀ of parameter ``name`` in float32 on its device: the copy taken at its first
        edit, or the parameter itself (a copy) while it has not been edited
        (:class:`kaedit.fusion.WeightReader`)."""
        if name in self.base:
            return self.base[name].float()
        return parameters(self.model, [name])[name].detach().float().clone()

    @torch.no_grad()
    def current(self, name: str) -> torch.Tensor:
        """The working weight W₀ + total of ``name`` in float32 on its device, as :meth:`add`
        last set it (before its rounding to the parameter's dtype); W₀ if never edited."""
        if name in self.base:
            return self.base[name].float() + self.total[name].to(self.base[name].device)
        return self.unedited(name)

    def load(self, total: Deltas) -> None:
        """Re-apply a saved ``total`` to an unedited model (resume)."""
        self.add(total)


def frobenius(deltas: Deltas) -> float:
    """The Frobenius norm of all of ``deltas`` taken as one vector: √(Σ over tensors of the
    summed squares), accumulated in float64 (0.0 for none)."""
    return math.sqrt(sum(float(d.detach().double().square().sum()) for d in deltas.values()))


def difference(a: Deltas, b: Deltas) -> Deltas:
    """``a − b`` per weight; a weight only one side has counts as zero on the other."""
    names = [*a, *(n for n in b if n not in a)]  # a fixed order: the same sums every run
    return {n: a.get(n, 0) - b.get(n, 0) for n in names}


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
