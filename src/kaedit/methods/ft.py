"""Constrained fine-tuning (FT-L, the ROME paper's baseline, Meng et al. 2022a §4).

The MLP down-projection weight of the chosen layers is fine-tuned with Adam on the NLL of
the new object given the rewrite prompt (teacher forcing, token-averaged per request,
averaged over the batch, all requests in one padded forward pass). After every step each
entry of the change is clamped to [−ε, ε] (``norm_constraint``, an L∞ bound). The change
is a leaf tensor substituted for the weight with :func:`torch.func.functional_call`
(W + Δ), so the model is never modified; the deltas are returned.

All layers are tuned jointly, with no layer loop: ``EditContext.layer_fusion`` is not used,
and ``fusion.scope=layer`` fuses each returned Δ once after the method, as ``step`` does
(each weight with its own generator, :func:`kaedit.fusion.layer_generator`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kaedit.methods.base import EditContext, Stateless
from kaedit.models import LoadedModel
from kaedit.records import Deltas, EditRequest
from kaedit.tokens import TeacherForced
from kaedit.weights import parameters


@dataclass
class FT(Stateless):
    layers: Sequence[int]
    lr: float = 5e-4
    steps: int = 25
    #: ε: |Δ_ij| ≤ ε after every step (L∞ bound); None = unconstrained.
    norm_constraint: float | None = 5e-4
    #: Stop once the batch's mean NLL is below this (ROME's FT: 1e-2).
    early_stop_loss: float = 1e-2

    def __post_init__(self) -> None:
        self.layers = [int(x) for x in self.layers]

    def compute_deltas(self, ctx: EditContext, requests: Sequence[EditRequest]) -> Deltas:
        lm = ctx.lm
        names = [lm.spec.weight("mlp_out", layer) for layer in self.layers]
        weights = {n: p.detach() for n, p in parameters(lm.model, names).items()}
        # The change lives in float32 whatever the model's dtype (Adam on fp16 leaves stalls).
        deltas = {
            n: torch.zeros_like(w, dtype=torch.float32, requires_grad=True)
            for n, w in weights.items()
        }
        opt = torch.optim.Adam(list(deltas.values()), lr=self.lr)
        batch = _TeacherForced.build(lm, requests)
        for _ in range(self.steps):
            loss = batch.loss(lm, {n: (weights[n] + deltas[n]).to(weights[n].dtype) for n in names})
            if loss.item() < self.early_stop_loss:
                break
            opt.zero_grad()
            loss.backward()
            opt.step()
            if self.norm_constraint is not None:
                with torch.no_grad():
                    for d in deltas.values():
                        d.clamp_(-self.norm_constraint, self.norm_constraint)
        return {n: d.detach().float() for n, d in deltas.items()}


class _TeacherForced(TeacherForced):
    """The rewrite prompt + new object of each request (:class:`kaedit.tokens.TeacherForced`)
    with FT's loss."""

    @classmethod
    def build(cls, lm: LoadedModel, requests: Sequence[EditRequest]) -> _TeacherForced:  # type: ignore[override]
        # tokenised as evaluation tokenises it
        return super().build(lm, [(r.rewrite_prompt, r.target_new) for r in requests])

    def loss(self, lm: LoadedModel, weights: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean over requests of the token-averaged NLL, with ``weights`` substituted."""
        return self.forced_nll(lm, self.hidden(lm, weights)[0]).mean()
