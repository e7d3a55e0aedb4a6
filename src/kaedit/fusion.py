"""Fusion: how a step's deltas are merged into the model. Pure functions over tensors.

A fusion strategy maps the deltas Δ_t that a method computed at step t (on the model as
it stood after step t−1) to the increment actually added to the weights. Randomness comes
only from the ``generator`` passed in (the runner derives it from the run seed and the
step), so a step is reproducible and resumable.

Stateless strategies (``fusion(deltas, generator) -> increment``), W_t = W_{t−1} + f(Δ_t):

* :class:`Add` -- vanilla: W ← W + Δ.
* :class:`TopK` -- keep the k% largest-magnitude entries of each Δ ("TR", paper §3.2).
* :class:`DropRescale` -- DR, paper eq. 5: M ~ Bernoulli(p), Δ̂ = (1 − M) ⊙ Δ / (1 − p).

Stateful strategies (the model-fusion baselines of paper §6.1, Fig. 5) carry a
:class:`FusionState` from step to step. The runner owns it: it passes it to
``step(state, deltas, generator)``, gets back the next state and the increment of the
*working* weights (those the method edits next), keeps the new state only if the step is
applied, and checkpoints it with the run. A strategy may also serve different weights
than it works on (Lookahead's slow weights, WiSE-FT's interpolation): ``served_offset``
is what to add to the working weights to get them; the runner evaluates (and saves with
``save_deltas``) the served weights. With W₀ the unedited weights and Δ_t the deltas of
the t-th applied step:

* :class:`RunningAverage` -- vanilla averaging of the edit weights (task vectors):
  W_t = W₀ + (1/t) Σ_{s≤t} Δ_s. Each step moves the weights by (Δ_t − mean_{t−1}) / t;
  the state is t and the mean. Working = served.
* :class:`Lookahead` -- Zhang et al. 2019 ("k steps forward, 1 step back"): fast weights
  θ take every step, θ ← θ + Δ_t; after every k-th step the slow weights φ move toward
  them, φ ← φ + α(θ − φ), and θ ← φ. The method edits θ; the served weights are φ
  (``evaluate=slow``, Lookahead's output) or θ (``evaluate=fast``). The state is t and
  P = θ − φ = Σ of the deltas since the last synchronisation, so a synchronising step
  adds αΔ_t − (1 − α)P to θ and the served offset is −P.
* :class:`WiseFT` -- Wortsman et al. 2022, weight-space ensembling of the zero-shot and
  the fine-tuned model: the method edits the fully edited weights θ_t = W₀ + Σ_{s≤t} Δ_s,
  the served weights are (1 − α)W₀ + αθ_t = W₀ + α Σ_{s≤t} Δ_s. The state is t and
  Σ Δ_s; the served offset is (α − 1) Σ Δ_s.

For Add, TopK and DropRescale working = served, and their state only counts steps.

Scope (``fusion.scope``), for the stateless strategies:

* ``step`` -- the fusion runs once per step, after the method computed every layer's Δ
  (the masks of step t come from the run's step generator).
* ``layer`` -- the paper's Algorithm 1: the fusion runs on each edited weight's Δ *inside*
  the method's layer loop, W₁ˡ ← W₀ˡ + Δ̂ˡ before layer l+1 is solved, so later layers'
  keys and residual see (and compensate for) what was dropped. The runner hands the
  method a :class:`LayerFusion` through ``EditContext.layer_fusion``; the multi-layer
  methods (MEMIT, PMET, AdaPLE, AlphaEdit) apply it in
  :func:`kaedit.methods.core.spread_residual` and return the undropped Δˡ, and the runner
  applies the same :class:`LayerFusion` to them (:meth:`LayerFusion.step`). Its
  randomness is a pure function of (run seed, step, weight name) (:func:`layer_generator`),
  so both calls draw the same mask and a resumed run draws the same masks again. Methods
  without a layer loop (ROME, FT, MEND) never call it: for them ``layer`` fuses each
  edited weight once after the method, as ``step`` does, only with the per-weight
  generators.

The stateful strategies carry state across steps per weight and run at step scope only;
``scope=layer`` for them is a :class:`~kaedit.errors.ConfigError` when the fusion is built.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch

from kaedit.errors import ConfigError
from kaedit.records import Deltas

#: Where a stateless fusion runs: after the method (``step``) or inside its layer loop.
SCOPES = ("step", "layer")


@runtime_checkable
class Fusion(Protocol):
    """A stateless strategy: the increment is a function of this step's deltas only."""

    def __call__(self, deltas: Deltas, generator: torch.Generator) -> Deltas: ...


@dataclass(frozen=True)
class FusionState:
    """What a fusion strategy carries from one applied step to the next.

    ``steps`` counts the steps applied so far (a step the runner's guard does not apply
    leaves the state as it was, so it does not count); ``tensors`` holds named groups of
    per-parameter float32 CPU tensors (e.g. ``{"mean": {weight name: tensor}}``).
    """

    steps: int = 0
    tensors: Mapping[str, Deltas] = field(default_factory=dict)

    def group(self, name: str) -> Deltas:
        return dict(self.tensors.get(name, {}))

    def flat(self) -> dict[str, int | torch.Tensor]:
        """``{"steps": n, "GROUP/PARAM": tensor}``: the form a checkpoint stores."""
        out: dict[str, int | torch.Tensor] = {"steps": self.steps}
        for g, tensors in self.tensors.items():
            out.update({f"{g}/{n}": t for n, t in tensors.items()})
        return out

    @classmethod
    def from_flat(cls, flat: Mapping[str, int | torch.Tensor]) -> FusionState:
        groups: dict[str, Deltas] = {}
        for key, value in flat.items():
            if key != "steps":
                g, _, name = key.partition("/")
                groups.setdefault(g, {})[name] = value
        return cls(steps=int(flat.get("steps", 0)), tensors=groups)


@runtime_checkable
class FusionStrategy(Protocol):
    """What the runner calls: every fusion, stateless or not, implements this."""

    def init_state(self) -> FusionState: ...

    def step(self, state: FusionState, deltas: Deltas,
             generator: torch.Generator) -> tuple[FusionState, Deltas]: ...

    def served_offset(self, state: FusionState) -> Deltas: ...

    def layer_fusion(self, seed: int, step: int) -> LayerFusion | None:
        """What the method applies in its layer loop at ``step`` (None: step scope)."""
        ...


def check_scope(fusion: object, scope: str, valid: tuple[str, ...] = SCOPES) -> None:
    """Raise ConfigError unless ``scope`` is one of ``valid`` for this fusion."""
    if scope not in valid:
        kind = type(fusion).__name__
        why = "" if valid == SCOPES else (
            f" ({kind} carries state across steps and runs after the method only)")
        raise ConfigError(f"fusion.scope={scope!r} is not available for kaedit.fusion.{kind}"
                          f"{why}; valid: {list(valid)}")


def layer_generator(seed: int, step: int, name: str) -> torch.Generator:
    """The generator of weight ``name``'s mask at step ``step`` under ``scope=layer``: a pure
    function of (run seed, step, weight name), different for every edited weight (layer)."""
    digest = hashlib.sha256(f"{int(seed)}/{int(step)}/{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


@dataclass(frozen=True)
class LayerFusion:
    """A stateless fusion applied to one weight's Δ at a time (``scope=layer``).

    ``fuse(name, Δ) -> Δ̂`` is what a method's layer loop calls (through
    ``EditContext.layer_fusion``); :meth:`step` is what the runner calls on the deltas the
    method returns: the same function of each weight, hence the same Δ̂ the loop used.
    """

    fusion: Fusion
    seed: int
    step_index: int

    def fuse(self, name: str, delta: torch.Tensor) -> torch.Tensor:
        return self.fusion({name: delta}, layer_generator(self.seed, self.step_index, name))[name]

    def step(self, state: FusionState, deltas: Deltas,
             generator: torch.Generator) -> tuple[FusionState, Deltas]:
        """As :meth:`Stateless.step`, each weight fused with its own generator (the step's
        ``generator`` is not used)."""
        return FusionState(steps=state.steps + 1), {n: self.fuse(n, d) for n, d in
                                                    deltas.items()}


class Stateless:
    """Mixin: a ``__call__(deltas, generator)`` fusion as a :class:`FusionStrategy`, run
    after the method (``scope="step"``) or inside its layer loop (``scope="layer"``)."""

    scope: str = "step"

    def layer_fusion(self, seed: int, step: int) -> LayerFusion | None:
        """The fusion a method applies in its layer loop at ``step``; None for step scope."""
        if self.scope != "layer":
            return None
        return LayerFusion(self, int(seed), int(step))  # type: ignore[arg-type]

    def init_state(self) -> FusionState:
        return FusionState()

    def step(self, state: FusionState, deltas: Deltas,
             generator: torch.Generator) -> tuple[FusionState, Deltas]:
        return FusionState(steps=state.steps + 1), self(deltas, generator)  # type: ignore[operator]

    def served_offset(self, state: FusionState) -> Deltas:
        return {}


# ------------------------------------------------------------------ pure tensor functions
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


def running_average(mean: torch.Tensor, delta: torch.Tensor,
                    n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold the (n+1)-th delta into the mean of the first ``n``.

    Returns ``(new_mean, increment)`` with new_mean = mean + (delta − mean)/(n+1) and
    increment = new_mean − mean, the change of W = W₀ + mean.
    """
    if n < 0:
        raise ValueError(f"running_average: n={n} must be >= 0")
    increment = (delta.float() - mean) / (n + 1)
    return mean + increment, increment


def lookahead(pending: torch.Tensor, delta: torch.Tensor, step: int, k: int,
              alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One Lookahead step on the fast weights θ with slow weights φ = θ − ``pending``.

    ``step`` is the 1-based index of this step. Between synchronisations θ ← θ + Δ and
    pending ← pending + Δ. On every k-th step φ ← φ + α(θ + Δ − φ) and θ ← φ: θ changes
    by αΔ − (1 − α)·pending and pending becomes 0. Returns ``(new_pending, increment of
    θ)``.
    """
    delta = delta.float()
    if step % k:
        return pending + delta, delta
    return torch.zeros_like(pending), alpha * delta - (1.0 - alpha) * pending


def wise_ft_offset(edited: torch.Tensor, alpha: float) -> torch.Tensor:
    """Served − working weights for WiSE-FT: (1−α)W₀ + α(W₀ + E) − (W₀ + E) = (α − 1)E."""
    return (alpha - 1.0) * edited


def _zeros_like_cpu(d: torch.Tensor) -> torch.Tensor:
    return torch.zeros(d.shape, dtype=torch.float32)


# --------------------------------------------------------------------- stateless fusions
@dataclass(frozen=True)
class Add(Stateless):
    #: "step" or "layer" (module docstring); the same increments either way for Add.
    scope: str = "step"

    def __post_init__(self) -> None:
        check_scope(self, self.scope)

    def __call__(self, deltas: Deltas, generator: torch.Generator) -> Deltas:
        return {n: d.clone() for n, d in deltas.items()}


@dataclass(frozen=True)
class TopK(Stateless):
    #: Fraction of entries kept (the paper's "top 20%" is k=0.2).
    k: float = 0.2
    #: "step" or "layer" (module docstring).
    scope: str = "step"

    def __post_init__(self) -> None:
        if not 0.0 < self.k <= 1.0:
            raise ValueError(f"fusion.k={self.k} must be in (0, 1]")
        check_scope(self, self.scope)

    def __call__(self, deltas: Deltas, generator: torch.Generator) -> Deltas:
        return {n: top_k(d, self.k) for n, d in deltas.items()}


@dataclass(frozen=True)
class DropRescale(Stateless):
    #: Drop rate p (paper default 0.8; it sweeps 0.7-0.9).
    p: float = 0.8
    #: "step" or "layer" (module docstring; Algorithm 1 is "layer").
    scope: str = "step"

    def __post_init__(self) -> None:
        if not 0.0 <= self.p < 1.0:
            raise ValueError(f"fusion.p={self.p} must be in [0, 1)")
        check_scope(self, self.scope)

    def __call__(self, deltas: Deltas, generator: torch.Generator) -> Deltas:
        # sorted: the mask of each tensor must not depend on dict insertion order
        return {n: drop_rescale(deltas[n], self.p, generator) for n in sorted(deltas)}


class StepScoped:
    """Mixin for the stateful strategies: step scope only, no fusion in the layer loop."""

    def layer_fusion(self, seed: int, step: int) -> None:
        return None


# ---------------------------------------------------------------------- stateful fusions
@dataclass(frozen=True)
class RunningAverage(StepScoped):
    """Vanilla averaging: W_t = W₀ + mean(Δ_1, …, Δ_t) (see the module docstring)."""

    #: Only "step": the state (t, mean) is per step, not per layer.
    scope: str = "step"

    def __post_init__(self) -> None:
        check_scope(self, self.scope, ("step",))

    def init_state(self) -> FusionState:
        return FusionState()

    def step(self, state: FusionState, deltas: Deltas,
             generator: torch.Generator) -> tuple[FusionState, Deltas]:
        mean, increments = state.group("mean"), {}
        for name, delta in deltas.items():
            prev = mean.get(name, _zeros_like_cpu(delta))
            mean[name], increments[name] = running_average(prev, delta.cpu(), state.steps)
        return FusionState(state.steps + 1, {"mean": mean}), increments

    def served_offset(self, state: FusionState) -> Deltas:
        return {}


@dataclass(frozen=True)
class Lookahead(StepScoped):
    """Lookahead (Zhang et al. 2019) over the sequence of edits (see the module docstring)."""

    #: Fast steps per synchronisation (Lookahead's default 5).
    k: int = 5
    #: Slow-weight step size α (Lookahead's default 0.5).
    alpha: float = 0.5
    #: Which weights are evaluated and saved: "slow" (φ, Lookahead's output) or "fast" (θ).
    evaluate: str = "slow"
    #: Only "step".
    scope: str = "step"

    def __post_init__(self) -> None:
        check_scope(self, self.scope, ("step",))
        if isinstance(self.k, bool) or int(self.k) != self.k or self.k < 1:
            raise ValueError(f"fusion.k={self.k} must be an integer >= 1")
        if not 0.0 < self.alpha <= 1.0:
            raise ValueError(f"fusion.alpha={self.alpha} must be in (0, 1]")
        if self.evaluate not in ("slow", "fast"):
            raise ValueError(f"fusion.evaluate={self.evaluate!r} is not one of ['slow', 'fast']")

    def init_state(self) -> FusionState:
        return FusionState()

    def step(self, state: FusionState, deltas: Deltas,
             generator: torch.Generator) -> tuple[FusionState, Deltas]:
        t = state.steps + 1
        pending, increments = state.group("pending"), {}
        for name, delta in deltas.items():
            prev = pending.get(name, _zeros_like_cpu(delta))
            pending[name], increments[name] = lookahead(prev, delta.cpu(), t, int(self.k),
                                                        self.alpha)
        return FusionState(t, {"pending": pending}), increments

    def served_offset(self, state: FusionState) -> Deltas:
        if self.evaluate == "fast":
            return {}
        return {n: -p for n, p in state.group("pending").items() if p.any()}


@dataclass(frozen=True)
class WiseFT(StepScoped):
    """WiSE-FT (Wortsman et al. 2022) between W₀ and the edited weights (module docstring)."""

    #: Mixing coefficient α: 0 serves the unedited model, 1 the fully edited one.
    alpha: float = 0.5
    #: Only "step".
    scope: str = "step"

    def __post_init__(self) -> None:
        check_scope(self, self.scope, ("step",))
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"fusion.alpha={self.alpha} must be in [0, 1]")

    def init_state(self) -> FusionState:
        return FusionState()

    def step(self, state: FusionState, deltas: Deltas,
             generator: torch.Generator) -> tuple[FusionState, Deltas]:
        edited = state.group("edited")
        for name, delta in deltas.items():
            edited[name] = edited.get(name, _zeros_like_cpu(delta)) + delta.detach().cpu().float()
        return FusionState(state.steps + 1, {"edited": edited}), {
            n: d.clone() for n, d in deltas.items()}

    def served_offset(self, state: FusionState) -> Deltas:
        if self.alpha == 1.0:
            return {}
        return {n: wise_ft_offset(e, self.alpha) for n, e in state.group("edited").items()}
