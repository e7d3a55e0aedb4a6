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
from torch.func import functional_call

from kaedit.hooks import run_until
from kaedit.methods.base import EditContext, Stateless
from kaedit.models import LoadedModel
from kaedit.records import Deltas, EditRequest
from kaedit.tokens import lm_head, pad, target_ids
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


@dataclass
class _TeacherForced:
    """One padded batch: rewrite prompt + new object (minus its last token) per request."""

    ids: torch.Tensor  # [n, len]
    mask: torch.Tensor  # [n, len]
    rows: torch.Tensor  # [n_tokens] which sequence each target token belongs to
    cols: torch.Tensor  # [n_tokens] the position whose logits predict it
    toks: torch.Tensor  # [n_tokens] the target token
    n_req: int

    @classmethod
    def build(cls, lm: LoadedModel, requests: Sequence[EditRequest]) -> _TeacherForced:
        tok, dev = lm.tokenizer, lm.device
        seqs, rows, cols, toks = [], [], [], []
        for i, r in enumerate(requests):
            prompt = list(tok(r.rewrite_prompt)["input_ids"])  # as evaluation tokenises it
            target = list(target_ids(tok, r.target_new))
            seqs.append(prompt + target[:-1])
            for j, t in enumerate(target):
                rows.append(i)
                cols.append(len(prompt) - 1 + j)
                toks.append(t)
        ids, mask = pad(seqs, tok.pad_token_id, dev)
        rows_t, cols_t, toks_t = (torch.tensor(x, device=dev) for x in (rows, cols, toks))
        return cls(ids, mask, rows_t, cols_t, toks_t, len(requests))

    def loss(self, lm: LoadedModel, weights: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean over requests of the token-averaged NLL, with ``weights`` substituted."""
        ln_f = lm.spec.module("ln_f")
        inputs = {"input_ids": self.ids, "attention_mask": self.mask, "use_cache": False}
        tr = run_until(lm.model, [ln_f], detach=False,
                       forward=lambda: functional_call(lm.model, weights, (), inputs))
        hidden = tr[ln_f].output[self.rows, self.cols]  # [n_tokens, d]
        logp = torch.log_softmax(lm_head(lm.model, lm.spec, hidden).float(), dim=-1)
        nll = -logp.gather(1, self.toks[:, None]).squeeze(1)  # [n_tokens]
        per_req = torch.zeros(self.n_req, device=nll.device).index_add(0, self.rows, nll)
        counts = torch.bincount(self.rows, minlength=self.n_req).float()
        return (per_req / counts).mean()
