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

On the steps where generation is due the runner also passes a :class:`TextMetrics`, and
CounterFact requests get ``fluency`` and ``consistency`` from greedy generations of their
``generation_prompts`` (ROME's generation metrics, defined in :mod:`kaedit.metrics`);
zsRE has no generation prompts and ignores it.

Values are per request in [0, 1] (fluency in bits); :func:`aggregate` turns them into x100
means plus ``score``, the harmonic mean of efficacy, generalization and specificity
(paper Table 1).
"""

from __future__ import annotations

import json
import logging
import math
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from kaedit import metrics
from kaedit.models import LoadedModel
from kaedit.records import EditRequest
from kaedit.tokens import chunks, final_hidden, lm_head, pad, target_ids

log = logging.getLogger(__name__)

HEADLINE = ("efficacy", "generalization", "specificity")


@dataclass
class Scorer:
    """Teacher-forced scoring of (prompt, target) pairs, batched. One per run."""

    lm: LoadedModel
    batch_size: int = 64
    _prompt_ids: dict[str, tuple[int, ...]] = field(default_factory=dict, repr=False)
    _target_ids: dict[str, tuple[int, ...]] = field(default_factory=dict, repr=False)
    #: (prompt, target) pairs scored so far (evaluation throughput = pairs / seconds).
    pairs_scored: int = 0

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
            ids, mask = pad([seqs[r] for r in rows_here], self.lm.tokenizer.pad_token_id, dev)
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
        self.pairs_scored += len(pairs)
        return nll, acc


@dataclass
class Generator:
    """Batched greedy generation; returns prompt + continuation as text, per prompt.

    The text is laid out as ROME's ``generate_fast`` returns it (the prompt included,
    NFKD-normalised, blank lines turned into spaces, special tokens dropped), but decoding
    is greedy where ROME samples from the top 5 tokens. Prompts are left-padded with an
    attention mask and batched by length; each distinct prompt is generated once (greedy
    decoding is deterministic and CounterFact repeats its generation prompts).
    """

    lm: LoadedModel
    #: New tokens per prompt (ROME: up to 100 tokens including the prompt).
    max_new_tokens: int = 50
    batch_size: int = 32
    _ids: dict[str, tuple[int, ...]] = field(default_factory=dict, repr=False)

    def _prompt(self, text: str) -> tuple[int, ...]:
        if text not in self._ids:
            self._ids[text] = tuple(self.lm.tokenizer(text)["input_ids"])
        return self._ids[text]

    def _stop_ids(self) -> set[int]:
        eos = getattr(self.lm.model.generation_config, "eos_token_id", None)
        eos = eos if isinstance(eos, list) else [eos]
        return {int(t) for t in [*eos, self.lm.tokenizer.eos_token_id] if t is not None}

    @torch.inference_mode()
    def __call__(self, prompts: Sequence[str]) -> list[str]:
        unique = list(dict.fromkeys(prompts))
        ids = [self._prompt(p) for p in unique]
        order = sorted(range(len(unique)), key=lambda i: len(ids[i]))
        tok, stop = self.lm.tokenizer, self._stop_ids()
        texts: dict[str, str] = {}
        for sl in chunks(len(order), self.batch_size):
            rows = order[sl]
            inp, mask = pad([ids[r] for r in rows], tok.pad_token_id, self.lm.device, left=True)
            out = self.lm.model.generate(  # [batch, width + new]
                input_ids=inp, attention_mask=mask, do_sample=False, num_beams=1,
                max_new_tokens=self.max_new_tokens, pad_token_id=tok.pad_token_id)
            for b, r in enumerate(rows):
                new = out[b, inp.shape[1]:].tolist()
                cut = next((j for j, t in enumerate(new) if t in stop), len(new))
                text = tok.decode([*ids[r], *new[:cut]], skip_special_tokens=True)
                texts[unique[r]] = unicodedata.normalize("NFKD", text).replace("\n\n", " ")
        return [texts[p] for p in prompts]


class TextMetrics:
    """Fluency and consistency of requests from greedy generations (ROME's CounterFact).

    Per request: the generations of its ``generation_prompts``; **fluency** is their mean
    weighted n-gram entropy, **consistency** the TF-IDF cosine similarity between them
    (joined) and reference text about the new object (:mod:`kaedit.metrics`). The
    reference text and TF-IDF statistics come from one of two sources (``source``):

    * ``rome_snippets`` -- when ``snippets`` (ROME's ``attribute_snippets.json``), ``idf``
      (``idf.npy``) and ``vocab`` (``tfidf_vocab.json``) are all given: the Wikipedia
      snippets about subjects with the same relation and new object (by the record's
      ``relation_id`` and ``target_new`` id), with ROME's vectorizer. Exactly ROME's
      ``reference_score``.
    * ``fallback_wikitext`` -- otherwise: the joined generations of the **unedited** model
      from the request's ``attribute_prompts`` (prompts about other subjects that have the
      new object), with a TF-IDF fitted once per run on ``corpus`` (its non-empty lines
      as documents; the WikiText files of ``stats.corpus`` by default).

    Fallback references must come from the unedited model, so the runner calls
    :meth:`make_references` once, before the first edit, for every request that a
    generation step will evaluate (the schedule fixes which), and keeps them in the
    checkpoint; :meth:`__call__` refuses a request whose reference is missing rather than
    generating it from an edited model.
    """

    def __init__(self, lm: LoadedModel, max_new_tokens: int = 50, batch_size: int = 32,
                 snippets: str | None = None, idf: str | None = None,
                 vocab: str | None = None, corpus: Sequence[str] | str = ()) -> None:
        self.generate = Generator(lm, int(max_new_tokens), int(batch_size))
        rome = {"snippets": snippets, "idf": idf, "vocab": vocab}
        given = {k: str(Path(str(v)).expanduser()) for k, v in rome.items() if v}
        if given and len(given) < len(rome):
            missing = sorted(set(rome) - set(given))
            raise ValueError(f"generation.{'/'.join(sorted(given))} set but generation."
                             f"{'/'.join(missing)} not: ROME's consistency needs all three "
                             "files (or none, for the WikiText fallback)")
        for k, v in given.items():
            if not Path(v).is_file():
                raise ValueError(f"generation.{k}={v!r} does not exist")
        self.paths = given
        self.corpus = [corpus] if isinstance(corpus, str) else [str(c) for c in corpus]
        self.source = "rome_snippets" if given else "fallback_wikitext"
        #: Fallback reference text per ``case_id`` (JSON-able: kept in the checkpoint).
        self.references: dict[str, str] = {}
        self._vectorizer: Any = None
        self._snippets: dict[tuple[str, str], list[str]] | None = None

    @property
    def needs_references(self) -> bool:
        return self.source == "fallback_wikitext"

    def vectorizer(self) -> Any:
        if self._vectorizer is None:
            if self.needs_references:
                from kaedit.stats import read_corpus

                docs = metrics.paragraphs(read_corpus(self.corpus, "generation.corpus"))
                self._vectorizer = metrics.fit_vectorizer(docs)
                log.info("TF-IDF fitted on %d paragraphs of %s", len(docs), self.corpus)
            else:
                vocab = json.loads(Path(self.paths["vocab"]).read_text())
                self._vectorizer = metrics.rome_vectorizer(np.load(self.paths["idf"]), vocab)
        return self._vectorizer

    def snippets(self) -> dict[tuple[str, str], list[str]]:
        """ROME's snippets by (relation id, target id)."""
        if self._snippets is None:
            self._snippets = {}
            for entry in json.loads(Path(self.paths["snippets"]).read_text()):
                key = (str(entry["relation_id"]), str(entry["target_id"]))
                self._snippets.setdefault(key, []).extend(s["text"] for s in entry["samples"])
        return self._snippets

    def make_references(self, requests: Sequence[EditRequest]) -> dict[str, str]:
        """Generate the missing fallback references with the model as it is now (unedited)."""
        todo = [r for r in {r.case_id: r for r in requests}.values()
                if r.case_id not in self.references and r.attribute_prompts]
        if self.needs_references and todo:
            texts = iter(self.generate([p for r in todo for p in r.attribute_prompts]))
            for r in todo:
                self.references[r.case_id] = " ".join(next(texts) for _ in r.attribute_prompts)
        return self.references

    def reference(self, request: EditRequest) -> str | None:
        """Reference text about the request's new object (None: the request has none)."""
        if not self.needs_references:
            texts = self.snippets().get((str(request.relation_id), str(request.target_new_id)))
            return " ".join(texts) if texts else None
        if not request.attribute_prompts:
            return None
        if request.case_id not in self.references:
            raise RuntimeError(f"no unedited-model reference text for request "
                               f"{request.case_id}: make_references must run before any edit")
        return self.references[request.case_id]

    def __call__(self, requests: Sequence[EditRequest]) -> dict[str, np.ndarray]:
        """``fluency`` (bits) and ``consistency`` (cosine) per request; {} if no request
        has generation prompts."""
        if not any(r.generation_prompts for r in requests):
            return {}
        texts = iter(self.generate([p for r in requests for p in r.generation_prompts]))
        fluency, consistency = [], []
        for r in requests:
            gens = [next(texts) for _ in r.generation_prompts]
            ref = self.reference(r) if gens else None
            fluency.append(metrics.fluency(gens))
            consistency.append(math.nan if ref is None else
                               metrics.tfidf_similarity(" ".join(gens), ref, self.vectorizer()))
        return {"fluency": np.array(fluency), "consistency": np.array(consistency)}


class Evaluator(Protocol):
    name: str

    def __call__(self, scorer: Scorer, requests: Sequence[EditRequest],
                 texts: TextMetrics | None = None) -> dict[str, np.ndarray]:
        """Per-request metric values in [0, 1] (NaN where a request has no such prompts);
        with ``texts``, also its generation metrics where the dataset has them."""
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

    def __call__(self, scorer: Scorer, requests: Sequence[EditRequest],
                 texts: TextMetrics | None = None) -> dict[str, np.ndarray]:
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
        generated = texts(requests) if texts is not None else {}
        return {**{k: np.array(v, dtype=float) for k, v in out.items()}, **generated}


@dataclass(frozen=True)
class ZsreEval:
    name: str = "zsre"

    def __call__(self, scorer: Scorer, requests: Sequence[EditRequest],
                 texts: TextMetrics | None = None) -> dict[str, np.ndarray]:
        """zsRE has no generation prompts: ``texts`` is accepted and not used."""
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
