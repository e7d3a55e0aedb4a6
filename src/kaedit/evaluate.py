"""Batched evaluation of edit requests (ROME/MEMIT protocols).

:class:`Scorer` scores many (prompt, target) pairs with teacher forcing in padded batches
(sorted by length, the LM head run only on target positions, tokenisation cached). The
evaluators turn those scores into per-request metric values:

* :class:`CounterFactEval` (ROME's CounterFact protocol) -- a prompt counts as a success
  when the new object is more probable than the true one, each by its token-averaged NLL:
  efficacy on the rewrite prompt, generalization on paraphrases; specificity is the
  reverse comparison (true beats new) on neighborhood prompts. ``*_mag`` are the mean
  probability gaps P(new) − P(true) (reverse for specificity).
* :class:`ZsreEval` (MEMIT's zsRE protocol, kmeng01/rome and kmeng01/memit
  ``experiments/py/eval_utils_zsre.py``) -- per-token argmax accuracy with teacher forcing
  of the new answer on the question (efficacy) and its rephrasing (generalization), and of
  ``loc_ans`` on the unrelated ``loc`` question (specificity), averaged over the answer's
  tokens. Which answer and which ``loc`` text the records hold is the dataset schema's
  choice (:mod:`kaedit.data.zsre`).

On the steps where generation is due the runner also passes a :class:`TextMetrics`, and
CounterFact requests get ``fluency`` and ``consistency`` from generations of their
``generation_prompts`` (ROME's generation metrics, defined in :mod:`kaedit.metrics`; by
default ROME's top-5 sampling, :class:`Generator`); zsRE has no generation prompts and
ignores it.

:func:`check_tokenisation` checks, before a run edits anything, that the scorer's split
tokenisation of every pair equals tokenising ``prompt + " " + target`` as one text.

Values are per request in [0, 1] (fluency in bits); :func:`aggregate` turns them into x100
means plus ``score``, the harmonic mean of efficacy, generalization and specificity
(paper Table 1).
"""

from __future__ import annotations

import hashlib
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
from kaedit.sampling import SeededTopK
from kaedit.tokens import (
    TeacherForced,
    chunks,
    pad,
    prompt_ids,
    split_mismatches,
    target_ids,
)

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
            self._prompt_ids[text] = prompt_ids(self.lm.tokenizer, text)
        return self._prompt_ids[text]

    def _target(self, text: str) -> tuple[int, ...]:
        if text not in self._target_ids:
            self._target_ids[text] = target_ids(self.lm.tokenizer, text)
        return self._target_ids[text]

    @torch.inference_mode()
    def score(
        self, prompts: Sequence[str], targets: Sequence[str]
    ) -> tuple[np.ndarray, np.ndarray]:
        """Per pair: mean NLL of the target tokens, and the fraction predicted by argmax.

        Pairs whose model input is the same token sequence (the same prompt with two
        single-token answers, as in most CounterFact comparisons) share one forward row.
        """
        pairs = [(self._prompt(p), self._target(t)) for p, t in zip(prompts, targets, strict=True)]
        # Rows (prompt + target[:-1]) sorted by length, so each padded batch wastes little;
        # the pairs of one batch are those whose row falls in it.
        row_of: dict[tuple[int, ...], int] = {}
        by_row: list[list[int]] = []
        for i, (p, t) in enumerate(pairs):
            r = row_of.setdefault((*p, *t[:-1]), len(by_row))
            if r == len(by_row):
                by_row.append([])
            by_row[r].append(i)
        seq_len = {r: len(seq) for seq, r in row_of.items()}
        order = sorted(range(len(by_row)), key=seq_len.__getitem__)
        nll = np.zeros(len(pairs))
        acc = np.zeros(len(pairs))
        for sl in chunks(len(order), self.batch_size):
            owned = [i for r in order[sl] for i in by_row[r]]
            batch = TeacherForced.from_ids([pairs[i] for i in owned],
                                           self.lm.tokenizer.pad_token_id, self.lm.device,
                                           share_rows=True)
            logp = batch.logp(self.lm, batch.hidden(self.lm)[0])
            nll[owned] = batch.pair_mean(batch.token_nll(logp)).cpu().numpy()
            acc[owned] = batch.pair_mean(batch.token_hits(logp)).cpu().numpy()
        self.pairs_scored += len(pairs)
        return nll, acc


#: Generation protocols: ROME's top-k sampling, or greedy decoding.
DECODINGS = ("top_k", "greedy")


@dataclass
class Generator:
    """Batched generation; returns prompt + continuation as text, per prompt.

    The text is laid out as ROME's ``generate_fast`` returns it (kmeng01/rome
    ``util/generate.py``): the prompt included, NFKD-normalised, blank lines turned into
    spaces, special tokens dropped. Prompts are left-padded with an attention mask and
    batched by length. Two protocols (``decoding``):

    * ``top_k`` -- ROME's: every token drawn from the ``top_k`` most probable ones, and
      every generation ``max_length`` tokens long with its prompt (ROME's ``max_out_len``;
      ``experiments/py/eval_utils_counterfact.py`` calls it with 100), not stopped at an
      end-of-text token (ROME keeps generating past one and drops it from the text). The
      draws come from a CPU generator seeded from ``seed`` and the batch's prompts
      (:class:`kaedit.sampling.SeededTopK`): a run gives the same texts on every device
      and when resumed. Every occurrence of a prompt is its own sample, as in ROME.
    * ``greedy`` -- the most probable token, stopping at the first end-of-text token;
      each distinct prompt is generated once (CounterFact repeats generation prompts).

    ``max_new_tokens`` caps the new tokens of either (``None``: no cap but ``max_length``).
    """

    lm: LoadedModel
    #: New tokens per prompt at most (None: only ``max_length`` bounds them).
    max_new_tokens: int | None = 50
    batch_size: int = 32
    decoding: str = "greedy"
    #: Tokens per generation with its prompt at most (ROME's max_out_len); None: no bound.
    max_length: int | None = None
    top_k: int = 5
    seed: int = 0
    _ids: dict[str, tuple[int, ...]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.decoding not in DECODINGS:
            raise ValueError(f"generation.decoding={self.decoding!r} is not one of "
                             f"{list(DECODINGS)}")
        if self.max_new_tokens is None and self.max_length is None:
            raise ValueError("generation.max_new_tokens and generation.max_length are both "
                             "null: set at least one (ROME: max_length=100)")
        if self.top_k < 1:
            raise ValueError(f"generation.top_k={self.top_k} must be at least 1")

    @property
    def protocol(self) -> str:
        """What produced the texts, for ``summary.json``."""
        length = f"max_length={self.max_length}, max_new_tokens={self.max_new_tokens}"
        if self.decoding == "greedy":
            return f"greedy({length})"
        return f"top_k(k={self.top_k}, {length}, seed={self.seed})"

    def _prompt(self, text: str) -> tuple[int, ...]:
        if text not in self._ids:
            self._ids[text] = prompt_ids(self.lm.tokenizer, text)
        return self._ids[text]

    def _new_tokens(self, n_prompt: int) -> int:
        """New tokens for a prompt of ``n_prompt`` tokens."""
        caps = [c for c in (self.max_new_tokens,
                            None if self.max_length is None else self.max_length - n_prompt)
                if c is not None]
        return max(0, min(caps))

    def _stop_ids(self) -> set[int]:
        eos = getattr(self.lm.model.generation_config, "eos_token_id", None)
        eos = eos if isinstance(eos, list) else [eos]
        return {int(t) for t in [*eos, self.lm.tokenizer.eos_token_id] if t is not None}

    def _batch_seed(self, prompts: Sequence[str]) -> int:
        """A seed from the run's seed and the batch's prompts (no hidden state: the same
        batch is drawn the same way wherever and whenever it is generated)."""
        digest = hashlib.sha256("\x1f".join([str(self.seed), *prompts]).encode()).digest()
        return int.from_bytes(digest[:8], "little") >> 1

    def __call__(self, prompts: Sequence[str]) -> list[str]:
        tok = self.lm.tokenizer
        texts = [tok.decode(list(ids), skip_special_tokens=True)
                 for ids in self.token_ids(prompts)]
        return [unicodedata.normalize("NFKD", t).replace("\n\n", " ") for t in texts]

    @torch.inference_mode()
    def token_ids(self, prompts: Sequence[str]) -> list[tuple[int, ...]]:
        """Prompt + generated token ids per prompt (what :meth:`__call__` decodes)."""
        from transformers import LogitsProcessorList

        sample = self.decoding == "top_k"
        # rows: every prompt when sampling, each distinct prompt once when greedy
        rows_text = list(prompts) if sample else list(dict.fromkeys(prompts))
        ids = [self._prompt(p) for p in rows_text]
        order = sorted(range(len(rows_text)), key=lambda i: len(ids[i]))
        tok, stop = self.lm.tokenizer, self._stop_ids()
        done: list[tuple[int, ...]] = [()] * len(rows_text)
        for sl in chunks(len(order), self.batch_size):
            rows = order[sl]
            n_new = [self._new_tokens(len(ids[r])) for r in rows]
            inp, mask = pad([ids[r] for r in rows], tok.pad_token_id, self.lm.device, left=True)
            extra: dict[str, Any] = {}
            if sample:
                seed = self._batch_seed([rows_text[r] for r in rows])
                extra = {"logits_processor": LogitsProcessorList([SeededTopK(self.top_k, seed)]),
                         "eos_token_id": None}  # ROME generates past end-of-text
            out = inp
            if max(n_new) > 0:
                out = self.lm.model.generate(  # [batch, width + new]
                    input_ids=inp, attention_mask=mask, do_sample=False, num_beams=1,
                    max_new_tokens=max(n_new), pad_token_id=tok.pad_token_id, **extra)
            for b, r in enumerate(rows):
                new = out[b, inp.shape[1]:].tolist()[: n_new[b]]
                if not sample:
                    new = new[: next((j for j, t in enumerate(new) if t in stop), len(new))]
                done[r] = (*ids[r], *new)
        if sample:
            return done
        by_prompt = dict(zip(rows_text, done, strict=True))
        return [by_prompt[p] for p in prompts]


class TextMetrics:
    """Fluency and consistency of requests from generations (ROME's CounterFact); by
    default ROME's protocol (top-5 sampling, 100 tokens with the prompt, seeded), greedy
    decoding on request (:class:`Generator`).

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

    def __init__(self, lm: LoadedModel, max_new_tokens: int | None = None,
                 batch_size: int = 32, snippets: str | None = None, idf: str | None = None,
                 vocab: str | None = None, corpus: Sequence[str] | str = (),
                 decoding: str = "top_k", max_length: int | None = 100, top_k: int = 5,
                 seed: int = 0) -> None:
        self.generate = Generator(
            lm, None if max_new_tokens is None else int(max_new_tokens), int(batch_size),
            decoding, None if max_length is None else int(max_length), int(top_k), int(seed))
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
    def protocol(self) -> str:
        """The generation protocol behind fluency and consistency (``summary.json``)."""
        return self.generate.protocol

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

    def pairs(self, requests: Sequence[EditRequest]) -> ScoredPairs:
        """The (prompt, target) pairs that scoring ``requests`` reads."""
        ...

    def __call__(self, scorer: Scorer, requests: Sequence[EditRequest],
                 texts: TextMetrics | None = None) -> dict[str, np.ndarray]:
        """Per-request metric values in [0, 1] (NaN where a request has no such prompts);
        with ``texts``, also its generation metrics where the dataset has them."""
        ...


@dataclass
class ScoredPairs:
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
        for v, (t, r) in zip(values, self.tags, strict=True):
            if t == tag:
                out[r].append(float(v))
        return out


def _mean_or_nan(xs: list[float]) -> float:
    return float(np.mean(xs)) if xs else math.nan


@dataclass(frozen=True)
class CounterFactEval:
    name: str = "counterfact"

    def pairs(self, requests: Sequence[EditRequest]) -> ScoredPairs:
        pairs = ScoredPairs()
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
        return pairs

    def __call__(self, scorer: Scorer, requests: Sequence[EditRequest],
                 texts: TextMetrics | None = None) -> dict[str, np.ndarray]:
        pairs = self.pairs(requests)
        nll, _ = scorer.score(pairs.prompts, pairs.targets)
        n = len(requests)
        out: dict[str, list[float]] = {}
        for metric, kind, new_wins in (("efficacy", "rewrite", True),
                                       ("generalization", "paraphrase", True),
                                       ("specificity", "neighborhood", False)):
            new = pairs.per_request(nll, f"{kind}:new", n)
            true = pairs.per_request(nll, f"{kind}:true", n)
            succ, mag = [], []
            for a, b in zip(new, true, strict=True):
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

    def pairs(self, requests: Sequence[EditRequest]) -> ScoredPairs:
        pairs = ScoredPairs()
        for i, r in enumerate(requests):
            pairs.add("efficacy", i, r.rewrite_prompt, r.target_new)
            for p in r.paraphrase_prompts:
                pairs.add("generalization", i, p, r.target_new)
            for p in r.neighborhood_prompts:
                if r.neighborhood_target is not None:
                    pairs.add("specificity", i, p, r.neighborhood_target)
        return pairs

    def __call__(self, scorer: Scorer, requests: Sequence[EditRequest],
                 texts: TextMetrics | None = None) -> dict[str, np.ndarray]:
        """zsRE has no generation prompts: ``texts`` is accepted and not used."""
        pairs = self.pairs(requests)
        _, acc = scorer.score(pairs.prompts, pairs.targets)
        n = len(requests)
        return {m: np.array([_mean_or_nan(v) for v in pairs.per_request(acc, m, n)])
                for m in HEADLINE}


def check_tokenisation(tok: Any, evaluator: Evaluator, requests: Sequence[EditRequest]) -> None:
    """At run start: a :class:`~kaedit.errors.ConfigError` naming the tokenizer and one
    record if, for any (prompt, target) pair the run scores, tokenising the prompt and
    ``" " + target`` apart (as kaedit scores and edits) gives other tokens than tokenising
    ``prompt + " " + target`` (:func:`kaedit.tokens.split_mismatches`; SentencePiece's
    lone "▁" before a target tokenised alone is the known case)."""
    from kaedit.errors import ConfigError

    pairs = evaluator.pairs(requests)
    texts = list(zip(pairs.prompts, pairs.targets, strict=True))
    bad = split_mismatches(tok, texts)
    if not bad:
        return
    prompt, target, split, joint = bad[0]
    record = requests[pairs.tags[texts.index((prompt, target))][1]]
    # the first token where they differ; if one is a prefix of the other, its length
    same = next((k for k, (a, b) in enumerate(zip(split, joint, strict=False)) if a != b),
                min(len(split), len(joint)))
    name = getattr(tok, "name_or_path", "") or type(tok).__name__
    raise ConfigError(
        f"tokenizer {name!r} ({type(tok).__name__}) splits prompt + ' ' + target differently "
        f"from the prompt and ' ' + target tokenised apart, which is how kaedit scores and "
        f"edits: {len(bad)} of {len(set(texts))} (prompt, target) pairs, e.g. record "
        f"case_id={record.case_id} {prompt!r} + {target!r}: apart "
        f"{tok.convert_ids_to_tokens(list(split[same:]))} vs joint "
        f"{tok.convert_ids_to_tokens(list(joint[same:]))}")


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
