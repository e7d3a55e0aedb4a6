"""Batched evaluation of edit requests (ROME/MEMIT protocols).

:class:`Scorer` scores many (prompt, target) pairs with teacher forcing in padded batches
(sorted by length, the LM head run only on target positions, tokenisation cached). The
evaluators turn those scores into per-request metric values:

* :class:`CounterFactEval` (ROME's CounterFact protocol) -- a prompt counts as a success
  when the new object is more probable than the true one, each by its token-averaged NLL:
  efficacy on the rewrite prompt, generalization on paraphrases; specificity is the
  reverse comparison (true beats new) on neighborhood prompts. ``*_mag`` are the mean
  probability gaps P(new) − P(true) (reverse for specificity).
* :class:`ZsreEval` (MEND/MEMIT zsRE protocol) -- teacher-forced token accuracy of the new
  answer on the question (efficacy) and its rephrasing (generalization), and of ``loc_ans``
  on the unrelated ``loc`` question (specificity).

Values are per request in [0, 1]; :func:`aggregate` turns them into 0-100 means plus
``score``, the harmonic mean of efficacy, generalization and specificity (paper Table 1).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from kaedit.models import LoadedModel
from kaedit.records import EditRequest
from kaedit.tokens import chunks, final_hidden, lm_head, pad_right, target_ids

HEADLINE = ("efficacy", "generalization", "specificity")


@dataclass
class Scorer:
    """Teacher-forced scoring of (prompt, target) pairs, batched. One per run."""

    lm: LoadedModel
    batch_size: int = 64
    _prompt_ids: dict[str, tuple[int, ...]] = field(default_factory=dict, repr=False)
    _target_ids: dict[str, tuple[int, ...]] = field(default_factory=dict, repr=False)

    def _prompt(self, text: str) -> tuple[int, ...]:
        if text not in self._prompt_ids:
            self._prompt_ids[text] = tuple(self.lm.tokenizer(text)["input_ids"])
        return self._prompt_ids[text]

    def _target(self, text: str) -> tuple[int, ...]:
        if text not in self._target_ids:
            self._target_ids[text] = target_ids(self.lm.tokenizer, text)
        return self._target_ids[text]

    @torch.inference_mode()
    def score(self, prompts: Sequence[str], targets: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Per pair: mean NLL of the target tokens, and the fraction predicted by argmax.

        Pairs whose model input is the same token sequence (the same prompt with two
        single-token answers, as in most CounterFact comparisons) share one forward row.
        """
        pairs = [(self._prompt(p), self._target(t)) for p, t in zip(prompts, targets)]
        row_of: dict[tuple[int, ...], int] = {}
        seqs: list[tuple[int, ...]] = []
        pair_row = []
        for p, t in pairs:
            seq = p + t[:-1]
            if seq not in row_of:
                row_of[seq] = len(seqs)
                seqs.append(seq)
            pair_row.append(row_of[seq])
        by_row: list[list[int]] = [[] for _ in seqs]
        for i, r in enumerate(pair_row):
            by_row[r].append(i)
        order = sorted(range(len(seqs)), key=lambda r: len(seqs[r]))
        nll = np.zeros(len(pairs))
        acc = np.zeros(len(pairs))
        model, spec, dev = self.lm.model, self.lm.spec, self.lm.device
        for sl in chunks(len(order), self.batch_size):
            rows_here = order[sl]
            ids, mask = pad_right([seqs[r] for r in rows_here], self.lm.tokenizer.pad_token_id,
                                  dev)
            hidden = final_hidden(model, spec, ids, mask)
            rows, cols, toks, owner, owned = [], [], [], [], []
            for b, r in enumerate(rows_here):
                for i in by_row[r]:
                    p, t = pairs[i]
                    owned.append(i)
                    for j, tid in enumerate(t):
                        rows.append(b)
                        cols.append(len(p) - 1 + j)
                        toks.append(tid)
                        owner.append(len(owned) - 1)
            # the same position may serve several pairs: run the head once per position
            pos = sorted(set(zip(rows, cols)))
            pos_index = {rc: k for k, rc in enumerate(pos)}
            h = hidden[torch.tensor([r for r, _ in pos]), torch.tensor([c for _, c in pos])]
            logp = torch.log_softmax(lm_head(model, spec, h).float(), -1)
            at = torch.tensor([pos_index[rc] for rc in zip(rows, cols)], device=logp.device)
            tok_t = torch.tensor(toks, device=logp.device)
            tok_nll = -logp[at, tok_t]
            hit = (logp.argmax(-1)[at] == tok_t).float()
            own = torch.tensor(owner, device=logp.device)
            counts = torch.bincount(own, minlength=len(owned)).float()
            pair_nll = torch.zeros(len(owned), device=logp.device).index_add(0, own, tok_nll)
            pair_acc = torch.zeros(len(owned), device=logp.device).index_add(0, own, hit)
            nll[owned] = (pair_nll / counts).cpu().numpy()
            acc[owned] = (pair_acc / counts).cpu().numpy()
        return nll, acc


class Evaluator(Protocol):
    name: str

    def __call__(self, scorer: Scorer, requests: Sequence[EditRequest]) -> dict[str, np.ndarray]:
        """Per-request metric values in [0, 1] (NaN where a request has no such prompts)."""
        ...


@dataclass
class _Pairs:
    """Collects (prompt, target) pairs tagged by (metric, request) to score in one call."""

    prompts: list[str] = field(default_factory=list)
    targets: list[str] = field(default_factory=list)
    tags: list[tuple[str, int]] = field(default_factory=list)

    def add(self, tag: str, req: int, prompt: str, target: str) -> None:
        self.prompts.append(prompt)
        self.targets.append(target)
        self.tags.append((tag, req))

    def per_request(self, values: np.ndarray, tag: str, n: int) -> list[list[float]]:
        out: list[list[float]] = [[] for _ in range(n)]
        for v, (t, r) in zip(values, self.tags):
            if t == tag:
                out[r].append(float(v))
        return out


def _mean_or_nan(xs: list[float]) -> float:
    return float(np.mean(xs)) if xs else math.nan


@dataclass(frozen=True)
class CounterFactEval:
    name: str = "counterfact"

    def __call__(self, scorer: Scorer, requests: Sequence[EditRequest]) -> dict[str, np.ndarray]:
        pairs = _Pairs()
        for i, r in enumerate(requests):
            if r.target_true is None:
                raise ValueError(f"request {r.case_id} has no target_true: CounterFact "
                                 "evaluation compares the new object with the true one")
            for tag, prompts in (("rewrite", [r.rewrite_prompt]),
                                 ("paraphrase", r.paraphrase_prompts)):
                for p in prompts:
                    pairs.add(f"{tag}:new", i, p, r.target_new)
                    pairs.add(f"{tag}:true", i, p, r.target_true)
            for p in r.neighborhood_prompts:
                pairs.add("neighborhood:new", i, p, r.target_new)
                pairs.add("neighborhood:true", i, p, r.neighborhood_target)
        nll, _ = scorer.score(pairs.prompts, pairs.targets)
        n = len(requests)
        out: dict[str, list[float]] = {}
        for metric, kind, new_wins in (("efficacy", "rewrite", True),
                                       ("generalization", "paraphrase", True),
                                       ("specificity", "neighborhood", False)):
            new = pairs.per_request(nll, f"{kind}:new", n)
            true = pairs.per_request(nll, f"{kind}:true", n)
            succ, mag = [], []
            for a, b in zip(new, true):
                a_, b_ = np.array(a), np.array(b)
                won = a_ < b_ if new_wins else b_ < a_
                gap = np.exp(-a_) - np.exp(-b_)
                succ.append(_mean_or_nan(list(won.astype(float))))
                mag.append(_mean_or_nan(list(gap if new_wins else -gap)))
            out[metric] = succ
            out[f"{metric}_mag"] = mag
        return {k: np.array(v, dtype=float) for k, v in out.items()}


@dataclass(frozen=True)
class ZsreEval:
    name: str = "zsre"

    def __call__(self, scorer: Scorer, requests: Sequence[EditRequest]) -> dict[str, np.ndarray]:
        pairs = _Pairs()
        for i, r in enumerate(requests):
            pairs.add("efficacy", i, r.rewrite_prompt, r.target_new)
            for p in r.paraphrase_prompts:
                pairs.add("generalization", i, p, r.target_new)
            for p in r.neighborhood_prompts:
                if r.neighborhood_target is not None:
                    pairs.add("specificity", i, p, r.neighborhood_target)
        _, acc = scorer.score(pairs.prompts, pairs.targets)
        n = len(requests)
        return {m: np.array([_mean_or_nan(v) for v in pairs.per_request(acc, m, n)])
                for m in HEADLINE}


def harmonic_mean(values: Sequence[float]) -> float:
    vals = [v for v in values if not math.isnan(v)]
    if not vals or len(vals) < len(values):
        return math.nan
    if min(vals) <= 0:
        return 0.0
    return len(vals) / sum(1.0 / v for v in vals)


def aggregate(per_request: dict[str, np.ndarray], prefix: str) -> dict[str, float]:
    """Means over requests on a 0-100 scale, plus ``score``; keys ``{prefix}/{metric}``."""
    out = {}
    for k, v in per_request.items():
        out[f"{prefix}/{k}"] = float(np.nanmean(v) * 100) if np.isfinite(v).any() else math.nan
    out[f"{prefix}/score"] = harmonic_mean([out[f"{prefix}/{m}"] for m in HEADLINE])
    return out
