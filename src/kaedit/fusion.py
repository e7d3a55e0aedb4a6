"""Fusion: how a step's deltas are merged into the model. Pure functions over tensors.

A fusion strategy maps the deltas Δ_t that a method computed at step t (on the model as
it stood after step t−1) to the increment actually added to the weights. Randomness comes
only from the ``generator`` passed in (the runner derives it from the run seed and the
step), so a step is reproducible and resumable.

Stateless strategies (``fusion(deltas, generator) -> increment``), W_t = W_{t−1} + f(Δ_t):

* :class:`Add` -- vanilla: W ← W + Δ.
* :class:`TopK` -- keep the k% largest-magnitude entries of each Δ ("TR", paper §3.2).
* :class:`DropRescale` -- DR, paper eq. 5: M ~ Bernoulli(p), Δ̂ = (1 − M) ⊙ Δ / (1 − p).
* :class:`MatchedNoise` -- DR's noise without its sparsity (a control, issue 28):
  Δ̂ = Δ + √(p/(1 − p)) · Δ ⊙ Z, Z ~ N(0, 1) entrywise: zero-mean noise with DR's mean
  and per-entry variance p/(1 − p)·Δᵢⱼ², every entry kept.

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
  :func:`kaedit.methods.solve.spread_residual` and return the undropped Δˡ, and the runner
  applies the same :class:`LayerFusion` to them (:meth:`LayerFusion.step`). Its
  randomness is a pure function of (run seed, step, weight name) (:func:`layer_generator`),
  so both calls draw the same mask and a resumed run draws the same masks again. Methods
  without a layer loop (ROME, FT, MEND) never call it: for them ``layer`` fuses each
  edited weight once after the method, as ``step`` does, only with the per-weight
  generators.

The stateful strategies carry state across steps per weight and run at step scope only;
``scope=layer`` for them is a :class:`~kaedit.errors.ConfigError` when the fusion is built.

A method whose deltas satisfy a linear constraint the fusion breaks (AlphaEdit's
Δ = ΔP: a drop mask does not commute with the null-space projection P, issue 28) can
have what the fusion made of each Δ mapped back: :func:`constrained` wraps the fusion in a
:class:`Constrained` that applies ``constraint(name, Δ̂)`` after it, at step scope to the
increment and at layer scope inside :meth:`LayerFusion.fuse` (so the layer loop and the
runner's increment both see the constrained Δ̂). A Δ the fusion left as it was (``add``)
is not mapped: it satisfies the constraint already, and stays bit-identical.

Stabilisers for lifelong editing (issue 26) that need the weights themselves, not only Δ:

* :class:`Rect` -- RECT (Gu et al. 2024): keep the k fraction of entries of each Δ with
  the largest relative change |Δ|/|W| (W: the weights the step edits, W_{t−1}).
* :class:`Prune` -- PRUNE (Ma et al., ICLR 2025): the method edits W₀ + Σ Δ_s unrestrained;
  the served weights are W₀ + F(Σ Δ_s), F reducing each singular value σ of the
  accumulated edit above σ_max(W₀) to σ_max(W₀) + log(σ / σ_max(W₀)). The state is Σ Δ_s
  and σ_max(W₀) per weight.

They read the weights through a :class:`WeightReader` (the run's
:class:`~kaedit.weights.EditedWeights`) that :func:`bind_weights` gives them: the fusion a
config builds has none, and the runner binds the one of its run before each step.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import ClassVar, Protocol, runtime_checkable

import torch

from kaedit.errors import ConfigError
from kaedit.records import Deltas

#: Where a stateless fusion runs: after the method (``step``) or inside its layer loop.
SCOPES = ("step", "layer")

#: ``constraint(weight name, Δ̂) -> Δ̂'``: a map a method asks to be applied to what the
#: fusion made of its Δ (:class:`Constrained`).
Constraint = Callable[[str, torch.Tensor], torch.Tensor]


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


@runtime_checkable
class WeightReader(Protocol):
    """Where a fusion that needs the weights reads them (:class:`~kaedit.weights.EditedWeights`
    is one): by parameter name, in float32, on the weight's device."""

    def unedited(self, name: str) -> torch.Tensor:
        """W₀: the weight as it was before the run's first edit of it."""
        ...

    def current(self, name: str) -> torch.Tensor:
        """The working weight the method edits next: W₀ + the increments applied so far."""
        ...


def bind_weights(fusion: FusionStrategy, weights: WeightReader) -> FusionStrategy:
    """``fusion`` reading ``weights`` if it needs them (``needs_weights``: :class:`Rect`,
    :class:`Prune`), else ``fusion`` itself. The runner calls it once per step, before
    :meth:`FusionStrategy.layer_fusion` and :meth:`FusionStrategy.step`, with its
    :class:`~kaedit.weights.EditedWeights`; the fusion a config builds reads no weights."""
    if getattr(fusion, "needs_weights", False):
        return replace(fusion, weights=weights)  # type: ignore[type-var]
    return fusion


class ReadsWeights:
    """Mixin of the fusions that read the weights (:func:`bind_weights`)."""

    needs_weights: ClassVar[bool] = True
    weights: WeightReader | None

    def reader(self) -> WeightReader:
        if self.weights is None:
            kind = type(self).__name__
            raise RuntimeError(
                f"kaedit.fusion.{kind} reads the weights, and none were bound: the runner "
                "must call kaedit.fusion.bind_weights(fusion, edits) before each step")
        return self.weights


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
    With ``then`` (:class:`Constrained`), Δ̂ is ``then(name, fusion(Δ))`` wherever the
    fusion changed Δ (:func:`constrain_changed`), in both calls.
    """

    fusion: Fusion
    seed: int
    step_index: int
    then: Constraint | None = None

    def fuse(self, name: str, delta: torch.Tensor) -> torch.Tensor:
        fused = self.fusion({name: delta},
                            layer_generator(self.seed, self.step_index, name))[name]
        return fused if self.then is None else constrain_changed(self.then, name, delta, fused)

    def step(self, state: FusionState, deltas: Deltas,
             generator: torch.Generator) -> tuple[FusionState, Deltas]:
        """As :meth:`Stateless.step`, each weight fused with its own generator (the step's
        ``generator`` is not used)."""
        return FusionState(steps=state.steps + 1), {n: self.fuse(n, d) for n, d in
                                                    deltas.items()}


def constrain_changed(constraint: Constraint, name: str, delta: torch.Tensor | None,
                      fused: torch.Tensor) -> torch.Tensor:
    """``constraint(name, fused)``, or ``fused`` itself where it equals ``delta`` bit for bit:
    a Δ the fusion did not change satisfies the constraint already (it is the method's
    own), and mapping it again would only add rounding."""
    if (delta is not None and delta.shape == fused.shape
            and torch.equal(fused, delta.to(fused.device, fused.dtype))):
        return fused
    return constraint(name, fused)


@dataclass(frozen=True)
class Constrained:
    """``fusion`` followed by ``constraint`` on each weight's increment (issue 28).

    Step scope: increment = constraint(f(Δ)); layer scope: the :class:`LayerFusion` of
    ``fusion`` with ``then=constraint``, so the Δ̂ˡ the method's layer loop keeps in place
    and the increment the runner applies are the same constrained tensor. Increments equal
    to the method's Δ are left as they are (:func:`constrain_changed`). State, served
    offset and checkpoints are ``fusion``'s own: the constraint carries nothing."""

    fusion: FusionStrategy
    constraint: Constraint

    def init_state(self) -> FusionState:
        return self.fusion.init_state()

    def step(self, state: FusionState, deltas: Deltas,
             generator: torch.Generator) -> tuple[FusionState, Deltas]:
        state, increments = self.fusion.step(state, deltas, generator)
        return state, {n: constrain_changed(self.constraint, n, deltas.get(n), d)
                       for n, d in increments.items()}

    def served_offset(self, state: FusionState) -> Deltas:
        return self.fusion.served_offset(state)

    def layer_fusion(self, seed: int, step: int) -> LayerFusion | None:
        layer = self.fusion.layer_fusion(seed, step)
        return None if layer is None else replace(layer, then=self.constraint)


def constrained(fusion: FusionStrategy, constraint: Constraint | None) -> FusionStrategy:
    """``fusion`` followed by ``constraint`` (:class:`Constrained`), or ``fusion`` itself
    when there is none. The runner calls it once per step with the method's
    ``fused_constraint(ctx)`` (AlphaEdit's ``project_fused``)."""
    return fusion if constraint is None else Constrained(fusion, constraint)


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


def check_drop_rate(p: float, name: str = "p") -> None:
    """A drop rate (or the drop rate whose variance a noise matches) is in [0, 1)."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"{name}={p} must be in [0, 1)")


def check_seed(seed: object, name: str = "fusion.seed") -> None:
    """A random fusion's own seed is an integer, or None (the run's seed)."""
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ValueError(f"{name}={seed!r} is not an integer; give an integer, or null for "
                         "the run's seed")


def drop_rescale(delta: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
    """Paper eq. 5: drop each entry with probability ``p``, rescale survivors by 1/(1−p)."""
    check_drop_rate(p, "drop rate p")
    if p == 0.0:
        return delta.clone()
    keep = torch.rand(delta.shape, generator=generator, device=generator.device) >= p
    return delta * keep.to(delta.device, delta.dtype) / (1.0 - p)


def matched_noise(delta: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
    """DR's first two moments without its sparsity: Δ + √(p/(1−p)) · Δ ⊙ Z, Z ~ N(0, 1).

    Entrywise, drop-and-rescale's Δ̂ᵢⱼ = mᵢⱼΔᵢⱼ/(1 − p) with mᵢⱼ ~ Bernoulli(1 − p) has mean
    Δᵢⱼ and variance p/(1 − p)·Δᵢⱼ²; this has the same mean and variance, and no entry is
    zeroed. If it harms a run as much as DR at the same p, the harm is DR's noise, not its
    sparsity (issue 28's control). ``p`` = 0: Δ unchanged."""
    check_drop_rate(p, "noise level p")
    if p == 0.0:
        return delta.clone()
    z = torch.randn(delta.shape, generator=generator, device=generator.device)
    return delta + math.sqrt(p / (1.0 - p)) * delta * z.to(delta.device, delta.dtype)


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


def relative_change(delta: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """|Δ| / |W| entrywise, in float32 (RECT's criterion). An entry of W that is 0 counts as
    an infinite relative change if Δ moves it, as none (0) if Δ does not."""
    rel = delta.float().abs() / weight.to(delta.device, torch.float32).abs()
    return torch.nan_to_num(rel, nan=0.0, posinf=math.inf)


def rect(delta: torch.Tensor, weight: torch.Tensor, k: float) -> torch.Tensor:
    """RECT (Gu et al. 2024, eq. 4-5): keep the entries of ``delta`` with the largest
    relative change |Δ|/|W| (:func:`relative_change`), zero the rest.

    As the reference (JasonForJoy/Model-Editing-Hurt ``easyeditor/models/rome/rome_main.py``
    l. 26-33, ``set_min_to_zero``) the ``int(n·(1 − k))`` entries with the smallest relative
    change are zeroed, so n − int(n·(1 − k)) of the n entries are kept (ties broken
    arbitrarily). ``weight`` has ``delta``'s shape: the weight the step edits."""
    if not 0.0 < k <= 1.0:
        raise ValueError(f"RECT fraction k={k} must be in (0, 1]")
    if weight.shape != delta.shape:
        raise ValueError(f"rect: weight shape {tuple(weight.shape)} != delta shape "
                         f"{tuple(delta.shape)}")
    n = delta.numel()
    n_keep = n - int(n * (1.0 - k))
    flat = delta.reshape(-1)
    idx = relative_change(delta, weight).reshape(-1).topk(n_keep, sorted=False).indices
    out = torch.zeros_like(flat)
    out[idx] = flat[idx]
    return out.view_as(delta)


def restrain_spectrum(edit: torch.Tensor, sigma0: float, log_base: float = math.e) -> torch.Tensor:
    """PRUNE's restraint F of an accumulated edit ΔW (Ma et al. 2025, eq. 8 with F = log):
    ΔW = U diag(σ) Vᵀ, every σᵢ > σ0 becomes σ0 + log_b(σᵢ / σ0), the others stay.

    mjy1111/PRUNE ``easyeditor/editors/bi_editor_loadw.py`` l. 56-61 (``func_log``:
    σ ← log σ + σ0 − log σ0, b = e) and l. 63-68 (``func_logn``, b = 2, 1.5, 1.2). Each
    restrained σ stays above σ0 and grows only logarithmically beyond it. If no σ exceeds σ0
    (checked first by ‖ΔW‖_F ≤ σ0, as ‖ΔW‖₂ ≤ ‖ΔW‖_F), ``edit`` is returned unchanged (a
    copy); otherwise the SVD and the product are computed in float64 and the result is
    cast back to ``edit``'s dtype."""
    if not (math.isfinite(log_base) and log_base > 1.0):
        raise ValueError(f"PRUNE log_base={log_base} must be a finite number > 1")
    if not (math.isfinite(sigma0) and sigma0 > 0.0):
        raise ValueError(f"PRUNE sigma0={sigma0} must be a finite number > 0")
    if float(edit.detach().double().norm()) <= sigma0:
        return edit.clone()
    u, s, vh = torch.linalg.svd(edit.detach().double(), full_matrices=False)
    s = torch.where(s > sigma0, sigma0 + torch.log(s / sigma0) / math.log(log_base), s)
    return ((u * s) @ vh).to(edit.dtype)  # U diag(σ̂) Vᵀ


def spectral_norm(weight: torch.Tensor) -> float:
    """σ_max(W): the largest singular value, in float64."""
    return float(torch.linalg.matrix_norm(weight.detach().double(), ord=2))


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
    #: The masks' seed, None for the run's: the runner makes the generators it is given
    #: from it (``kaedit.setup.fusion_seed``), so a replicate changes the masks alone.
    seed: int | None = None

    def __post_init__(self) -> None:
        check_drop_rate(self.p, "fusion.p")
        check_scope(self, self.scope)
        check_seed(self.seed)

    def __call__(self, deltas: Deltas, generator: torch.Generator) -> Deltas:
        # sorted: the mask of each tensor must not depend on dict insertion order
        return {n: drop_rescale(deltas[n], self.p, generator) for n in sorted(deltas)}


@dataclass(frozen=True)
class MatchedNoise(Stateless):
    """:func:`matched_noise`: DR's per-entry mean and variance at drop rate ``p``, as
    Gaussian noise on every entry (a control for :class:`DropRescale`, same scopes)."""

    #: The DR drop rate whose variance the noise matches (p/(1 − p)·Δᵢⱼ² per entry).
    p: float = 0.8
    scope: str = "step"
    #: The noise's seed, None for the run's (as :attr:`DropRescale.seed`).
    seed: int | None = None

    def __post_init__(self) -> None:
        check_drop_rate(self.p, "fusion.p")
        check_scope(self, self.scope)
        check_seed(self.seed)

    def __call__(self, deltas: Deltas, generator: torch.Generator) -> Deltas:
        return {n: matched_noise(deltas[n], self.p, generator) for n in sorted(deltas)}


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


# --------------------------------------------------------- stabilisers reading the weights
@dataclass(frozen=True)
class Rect(ReadsWeights, Stateless):
    """RECT (Gu et al. 2024, "Model Editing Harms General Abilities of Large Language
    Models: Regularization to the Rescue"): each edited weight keeps the ``k`` fraction of
    its Δ entries with the largest relative change |Δ|/|W| (:func:`rect`); W is the weight
    the step edits, W_{t−1} (the reference's ``w``, the parameter as it stands when the
    update is added: ``rome_main.py`` l. 64, 77; SasyaTitech/NAS
    ``baselines/memit/memit_rect_main.py`` l. 71, 81)."""

    #: Fraction of entries kept: the reference code zeroes 80 % (``set_min_to_zero(...,
    #: 0.8)``, rome_main.py l. 79), i.e. k = 0.2; SasyaTitech/NAS's MEMIT_rect keeps 40 %.
    k: float = 0.2
    #: "step" or "layer" (module docstring); the reference applies it after the method.
    scope: str = "step"
    #: Bound by the runner (:func:`bind_weights`), never set in a config.
    weights: WeightReader | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not 0.0 < self.k <= 1.0:
            raise ValueError(f"fusion.k={self.k} must be in (0, 1]")
        check_scope(self, self.scope)

    def __call__(self, deltas: Deltas, generator: torch.Generator) -> Deltas:
        reader = self.reader()
        return {n: rect(d, reader.current(n), self.k) for n, d in deltas.items()}


@dataclass(frozen=True)
class Prune(ReadsWeights, StepScoped):
    """PRUNE (Ma et al., ICLR 2025, "Perturbation-Restrained Sequential Model Editing").

    The method edits the unrestrained weights θ_t = W₀ + E_t, E_t = Σ_{s≤t} Δ_s, as PRUNE's
    code does (``edit_save.py`` stores each sequential edit unrestrained); the served and
    evaluated weights are W₀ + F(E_t), F = :func:`restrain_spectrum` with σ0 = σ_max(W₀) of
    the weight (``bi_editor_loadw.py`` l. 109-170: ``delta = w − w_origin``, its singular
    values restrained, ``w = w_origin + delta1``). The state is t, E_t (``edited``) and
    σ_max(W₀) (``sigma0``, taken from W₀ when a weight is first edited); the served offset
    is F(E_t) − E_t."""

    #: Base b of the logarithm: e is the reference's ``--reduce_type=log``; 1.2, 1.5 and 2
    #: its ``log1_2``, ``log1_5``, ``log2``.
    log_base: float = math.e
    #: Only "step": the state is carried per step.
    scope: str = "step"
    #: Bound by the runner (:func:`bind_weights`), never set in a config.
    weights: WeightReader | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        check_scope(self, self.scope, ("step",))
        if not (isinstance(self.log_base, (int, float)) and math.isfinite(self.log_base)
                and self.log_base > 1.0):
            raise ValueError(f"fusion.log_base={self.log_base} must be a finite number > 1 "
                             "(e = 2.718281828459045 is PRUNE's default)")

    def init_state(self) -> FusionState:
        return FusionState()

    def step(self, state: FusionState, deltas: Deltas,
             generator: torch.Generator) -> tuple[FusionState, Deltas]:
        edited, sigma0 = state.group("edited"), state.group("sigma0")
        for name, delta in deltas.items():
            if name not in sigma0:  # first edit of this weight: σ_max(W₀), kept in the state
                sigma0[name] = torch.tensor([spectral_norm(self.reader().unedited(name))],
                                            dtype=torch.float64)
            edited[name] = edited.get(name, _zeros_like_cpu(delta)) + delta.detach().cpu().float()
        return FusionState(state.steps + 1, {"edited": edited, "sigma0": sigma0}), {
            n: d.clone() for n, d in deltas.items()}

    def served_offset(self, state: FusionState) -> Deltas:
        sigma0, out = state.group("sigma0"), {}
        for name, e in state.group("edited").items():
            restrained = restrain_spectrum(e, float(sigma0[name]), self.log_base)
            if not torch.equal(restrained, e):
                out[name] = restrained - e
        return out

