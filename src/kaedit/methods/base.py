"""The interface every editing method implements, and what the runner hands it."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch

from kaedit.models import LoadedModel
from kaedit.records import Deltas, EditRequest
from kaedit.stats import CovarianceStore
from kaedit.timing import Stopwatch


@dataclass
class EditContext:
    """Everything a method may read while computing deltas. Owned by one run."""

    lm: LoadedModel
    stats: CovarianceStore
    #: Prefix templates ("{}" = the prompt) used to average keys and optimise targets:
    #: a :class:`~kaedit.methods.templates.Templates` (grouped as MEMIT's context templates;
    #: iterates as the flat list) or a plain list (every template its own group).
    templates: Sequence[str] = field(default_factory=lambda: ["{}"])
    #: ``fuse(weight name, Δ) -> Δ̂`` for ``fusion.scope=layer``: the multi-layer methods
    #: apply it to each layer's Δ inside their layer loop (paper Algorithm 1) and still
    #: return the undropped Δ; None (step scope) leaves the loop as it is. The runner sets
    #: it before each step (:meth:`kaedit.fusion.LayerFusion.fuse`).
    layer_fusion: Callable[[str, torch.Tensor], torch.Tensor] | None = None
    #: Seconds per stage ("targets", "keys", "solve") of the current step; the runner
    #: logs and resets it after each step.
    clock: Stopwatch = field(default_factory=Stopwatch)


@runtime_checkable
class EditMethod(Protocol):
    """Compute weight deltas for a batch of requests; never leave the model changed.

    ``prepare`` runs once before the first edit (on the unedited model): load covariance
    statistics and anything else derived from the original weights. ``state_dict`` /
    ``load_state_dict`` carry state across steps (most methods have none) so a run can be
    checkpointed and resumed; ``commit`` is told which deltas were actually applied.
    ``layers`` are the layers it edits, which the runner checks against the model before
    anything else is built (empty when the weights come from elsewhere, e.g. MEND's
    checkpoint, checked when it is loaded).
    """

    layers: Sequence[int]

    def prepare(self, ctx: EditContext) -> None: ...

    def compute_deltas(self, ctx: EditContext, requests: Sequence[EditRequest]) -> Deltas: ...

    def commit(self, ctx: EditContext, requests: Sequence[EditRequest], applied: Deltas) -> None:
        ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class Stateless:
    """Mixin for methods that carry nothing across steps."""

    def prepare(self, ctx: EditContext) -> None:
        return None

    def commit(self, ctx: EditContext, requests: Sequence[EditRequest], applied: Deltas) -> None:
        return None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None
