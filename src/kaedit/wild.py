"""WILD evaluation: answers generated the way a user would get them, scored as text.

After "The Mirage of Model Editing: Revisiting Evaluation in the Wild" (Yang et al., ACL
2025; code: WanliYoung/Revisit-Editing-Evaluation, also EasyEdit's
``evaluation_type="WILD"``). Where the teacher-forced scores (:mod:`kaedit.evaluate`)
feed the target to the model and read its token probabilities, WILD lets the model answer:

* **context** -- the prompt alone ("question-only", the reference's default
  ``context_type``: ``easyeditor/evaluate/evaluate_utils.py``, ``test_prediction_acc_real``,
  lines 104-115), tokenised as the scorer tokenises prompts;
* **decoding** -- greedy, at most ``max_new_tokens`` (50) new tokens, stopped at the first
  new token whose text contains a stop string (``"."`` or a newline) or that is an
  end-of-text token (lines 119-128: ``generate(max_new_tokens=50, stop_strings=[".", "\\n",
  eos], do_sample=False)``; transformers' ``StopStringCriteria`` fires on the token that
  completes a stop string, which for one-character stop strings is the first token that
  contains it). The answer is the new tokens up to and including that token;
* **efficacy** / **generalization** -- exact match of the answer with the target (the new
  object; zsRE: the answer) after SQuAD's normalisation (lower case, punctuation and the
  articles a/an/the removed, whitespace collapsed: lines 18-35, ``normalize_answer`` and
  ``exact_match_score``), on the rewrite prompt and on each paraphrase (mean per edit),
  and beside it SQuAD's token F1 on the same normalised words (:func:`token_f1`; the
  reference has exact match or an LLM judge, not F1);
* **locality** -- the share of an edit's neighbourhood prompts whose answer (its token
  ids) is the one the **unedited** model gave (``easyeditor/editors/editor.py`` lines
  294-300: the pre-edit outputs of every request, before any edit; lines 352-353:
  ``float(post_output == pre_output)``). The unedited answers are generated once per run,
  before the first edit (:meth:`WildEval.make_references`).

The differences from the reference are listed in docs/evaluation.md ("WILD").
"""

from __future__ import annotations

import itertools
import json
import re
import string
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kaedit.models import LoadedModel
from kaedit.records import EditRequest
from kaedit.schedule import every_due
from kaedit.tokens import final_hidden, lm_head, pad, prompt_ids

#: Per-request values of :meth:`WildEval.__call__` (exact match, token F1, unchanged share).
METRICS = ("efficacy", "efficacy_f1", "generalization", "generalization_f1", "locality")
#: The three whose harmonic mean is ``score`` (as efficacy, generalization, specificity
#: are for the teacher-forced scores).
HEADLINE = ("efficacy", "generalization", "locality")

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation, as the reference applies it (``evaluate_utils.py`` lines
    18-32): lower case, ASCII punctuation removed, the articles a/an/the removed,
    whitespace collapsed to single spaces."""
    text = text.lower().translate(_PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, target: str) -> float:
    """1.0 when both normalise to the same text (reference lines 34-35), else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(target))


def token_f1(prediction: str, target: str) -> float:
    """SQuAD's token F1: the harmonic mean of precision and recall of the normalised
    words the answer shares with the target (each word counted as often as both have
    it); when either has no word, 1.0 if both have none, else 0.0."""
    pred, gold = normalize_answer(prediction).split(), normalize_answer(target).split()
    if not pred or not gold:
        return float(pred == gold)
    same = sum((Counter(pred) & Counter(gold)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(gold)
    return 2 * precision * recall / (precision + recall)


def _mean(values: Sequence[float]) -> float:
    return float(np.mean(values)) if len(values) else float("nan")


@dataclass
class WildEval:
    """A run's WILD evaluation (``cfg.wild``): generation, scoring and the unedited
    model's neighbourhood answers (``references``: prompt → answer token ids, JSON-able)."""

    #: The run's model; the runner passes it (``cfg.wild`` holds only the settings).
    lm: LoadedModel | None = None
    #: 0: never; k: step 0, every k-th step and the last step; None: step 0 and the last.
    every: int | None = 0
    #: The WILD steps that also score locality, by the same rule ("every": as ``every``).
    #: Its neighbourhood prompts (CounterFact: 10 per edit, against 1 rewrite and 2
    #: paraphrases) are ~3/4 of a WILD step's cost; retention by age needs only efficacy.
    locality_every: int | str | None = "every"
    max_new_tokens: int = 50
    batch_size: int = 128
    #: A new token whose text contains one of these ends the answer (with it).
    stop_strings: Sequence[str] = (".", "\n")
    references: dict[str, tuple[int, ...]] = field(default_factory=dict)
    _ids: dict[str, tuple[int, ...]] = field(default_factory=dict, repr=False)
    _stop: dict[int, bool] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.lm is None:
            raise ValueError("WildEval needs the run's model: WildEval(lm=..., **cfg.wild)")
        if self.locality_every == "every":
            self.locality_every = self.every
        for key in ("every", "locality_every"):
            value = getattr(self, key)
            if value is not None and (not str(value).isdigit() or int(value) < 0):
                raise ValueError(f"wild.{key}={value} must be an integer >= 0 (0 = never, "
                                 "k = step 0, every k-th step and the last) or null (step 0 "
                                 "and the last step)")
        if int(self.max_new_tokens) < 1:
            raise ValueError(f"wild.max_new_tokens={self.max_new_tokens} must be >= 1")
        if int(self.batch_size) < 1:
            raise ValueError(f"wild.batch_size={self.batch_size} must be >= 1 (rows decoded "
                             "at once)")
        self.stop_strings = tuple(str(s) for s in self.stop_strings)

    def due(self, step: int, n_steps: int) -> bool:
        """Whether evaluated step ``step`` also runs WILD (as ``perplexity.every``)."""
        return every_due(self.every, step, n_steps)

    def locality_due(self, step: int, n_steps: int) -> bool:
        """Whether WILD at step ``step`` also scores locality (``locality_every``)."""
        return self.due(step, n_steps) and every_due(self.locality_every, step, n_steps)

    def _eos(self) -> set[int]:
        eos = getattr(self.lm.model.generation_config, "eos_token_id", None)
        eos = eos if isinstance(eos, list) else [eos]
        return {int(t) for t in [*eos, self.lm.tokenizer.eos_token_id] if t is not None}

    def is_stop(self, token: int) -> bool:
        """Whether ``token`` ends an answer: an end-of-text token, or a token whose text
        contains a stop string (cached per token id)."""
        if token not in self._stop:
            text = self.lm.tokenizer.decode([token])
            self._stop[token] = (token in self._eos()
                                 or any(s in text for s in self.stop_strings))
        return self._stop[token]

    def cut(self, new: Sequence[int]) -> tuple[int, ...]:
        """The answer in ``new`` (generated ids): up to and including the first stop token,
        or all of it when none (the length cap)."""
        end = next((k + 1 for k, t in enumerate(new) if self.is_stop(t)), len(new))
        return tuple(new[:end])

    def text(self, answer: Sequence[int]) -> str:
        """The answer as text: special tokens dropped, one trailing stop string removed
        (reference lines 139-143; the normalisation drops punctuation anyway)."""
        out = self.lm.tokenizer.decode(list(answer), skip_special_tokens=True)
        for s in self.stop_strings:
            if out.endswith(s):
                out = out[: -len(s)]
        return out

    def _prompt(self, text: str) -> tuple[int, ...]:
        if text not in self._ids:
            self._ids[text] = prompt_ids(self.lm.tokenizer, text)
        return self._ids[text]

    @torch.inference_mode()
    def answers(self, prompts: Sequence[str]) -> dict[str, tuple[int, ...]]:
        """Greedy answers (new token ids, :meth:`cut`) of each distinct prompt, decoded with
        the KV cache by :func:`greedy_pool` in a pool of ``batch_size`` rows (prompts enter
        shortest first)."""
        distinct = list(dict.fromkeys(prompts))
        ids = [self._prompt(p) for p in distinct]
        said = greedy_pool(self.lm, ids, int(self.batch_size), int(self.max_new_tokens),
                           self.is_stop)
        return dict(zip(distinct, said, strict=True))

    def make_references(self, requests: Sequence[EditRequest]) -> dict[str, tuple[int, ...]]:
        """The answers of the model as it is now (unedited: call before the first edit) to
        the neighbourhood prompts of ``requests`` that have none yet."""
        todo = [p for r in requests for p in r.neighborhood_prompts if p not in self.references]
        self.references.update(self.answers(todo))
        return self.references

    def __call__(self, requests: Sequence[EditRequest],
                 locality: bool = True) -> dict[str, np.ndarray]:
        """Per request (:data:`METRICS`): exact match and token F1 of the rewrite prompt's
        answer (efficacy) and the paraphrases' (generalization, mean over them), and the
        share of neighbourhood prompts answered as the unedited model did (locality;
        with ``locality`` False, not generated and NaN). NaN where a request has no such
        prompts."""
        missing = [p for r in requests for p in r.neighborhood_prompts
                   if locality and p not in self.references]
        if missing:
            raise RuntimeError(f"no unedited-model WILD answer for {len(missing)} neighbourhood "
                               f"prompts, e.g. {missing[0]!r}: make_references must run "
                               "before any edit")
        said = self.answers([p for r in requests for p in (
            r.rewrite_prompt, *r.paraphrase_prompts,
            *(r.neighborhood_prompts if locality else ()))])
        out: dict[str, list[float]] = {m: [] for m in METRICS}
        for r in requests:
            rewrite = self.text(said[r.rewrite_prompt])
            para = [self.text(said[p]) for p in r.paraphrase_prompts]
            out["efficacy"].append(exact_match(rewrite, r.target_new))
            out["efficacy_f1"].append(token_f1(rewrite, r.target_new))
            out["generalization"].append(_mean([exact_match(a, r.target_new) for a in para]))
            out["generalization_f1"].append(_mean([token_f1(a, r.target_new) for a in para]))
            out["locality"].append(_mean([float(said[p] == tuple(self.references[p]))
                                          for p in r.neighborhood_prompts]) if locality
                                   else float("nan"))
        return {m: np.array(v, dtype=float) for m, v in out.items()}


@dataclass
class _Pool:
    """The rows :func:`greedy_pool` is decoding: ``live[j]`` is the prompt of row ``j``;
    ``kv`` the key/value cache per layer ``[rows, heads, width, d]``, left-padded to one
    width, ``mask`` ``[rows, width]`` its attention mask, ``pos`` ``[rows, 1]`` each row's
    last position and ``hidden`` ``[rows, d]`` its final hidden state there."""

    live: list[int]
    kv: list[tuple[torch.Tensor, torch.Tensor]]
    mask: torch.Tensor
    pos: torch.Tensor
    hidden: torch.Tensor

    @classmethod
    def prefill(cls, lm: LoadedModel, live: list[int],
                prompts: Sequence[Sequence[int]]) -> _Pool:
        """The pool of ``prompts`` (of ``live``) after one forward of their tokens."""
        from transformers import DynamicCache

        ids, mask = pad(prompts, lm.tokenizer.pad_token_id, lm.device, left=True)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)  # true positions; pads at 0, as generate
        cache = DynamicCache(config=lm.model.config)
        hidden = final_hidden(lm.model, lm.spec, ids, mask, position_ids=pos,
                              past_key_values=cache)[:, -1]
        return cls(live, [(layer.keys, layer.values) for layer in cache.layers], mask,
                   pos[:, -1:], hidden)

    def join(self, other: _Pool) -> _Pool:
        """Both pools' rows in one, the narrower left-padded (masked) to the other's width."""
        if not self.live:
            return other
        gap = self.mask.shape[1] - other.mask.shape[1]

        def cat(mine: torch.Tensor, theirs: torch.Tensor, dim: int) -> torch.Tensor:
            return torch.cat([_left_pad(mine, -gap, dim), _left_pad(theirs, gap, dim)])

        return _Pool(self.live + other.live,
                     [(cat(k, ok, 2), cat(v, ov, 2))
                      for (k, v), (ok, ov) in zip(self.kv, other.kv, strict=True)],
                     cat(self.mask, other.mask, 1), torch.cat([self.pos, other.pos]),
                     torch.cat([self.hidden, other.hidden]))

    def select(self, keep: list[int]) -> _Pool:
        """Rows ``keep`` only, without the leading columns none of them uses."""
        sel = torch.tensor(keep, dtype=torch.long, device=self.mask.device)
        mask = self.mask[sel]
        start = int(mask.ne(0).any(0).long().argmax()) if keep else 0
        return _Pool([self.live[j] for j in keep],
                     [(k[sel][:, :, start:], v[sel][:, :, start:]) for k, v in self.kv],
                     mask[:, start:], self.pos[sel], self.hidden[sel])

    def step(self, lm: LoadedModel, token: torch.Tensor) -> _Pool:
        """The pool after one forward of each row's next token ``token`` ``[rows]``."""
        from transformers import DynamicCache

        cache = DynamicCache(self.kv, config=lm.model.config)
        mask = torch.cat([self.mask, self.mask.new_ones(len(self.live), 1)], dim=1)
        pos = self.pos + 1
        hidden = final_hidden(lm.model, lm.spec, token[:, None], mask, position_ids=pos,
                              past_key_values=cache)[:, -1]
        return _Pool(self.live, [(layer.keys, layer.values) for layer in cache.layers], mask,
                     pos, hidden)


def greedy_pool(lm: LoadedModel, prompts: Sequence[Sequence[int]], rows: int, cap: int,
                is_stop: Callable[[int], bool]) -> list[tuple[int, ...]]:
    """Greedy answers of ``prompts`` (token ids; each answer up to and including its first
    token with ``is_stop``, or ``cap`` tokens), decoded with the KV cache.

    What ``generate(do_sample=False)`` does batch by batch, but as a pool of at most
    ``rows`` rows (continuous batching): a row leaves the pool, and its entries the cache,
    as soon as its answer ends, and waiting prompts (shortest first) are prefilled into the
    free rows once a quarter of them are free. A batch then never waits for its longest
    answer (a few run to the cap; most stop within ~20 tokens), and every forward runs on
    a nearly full batch: on a CPU, a forward of one row costs about a tenth of one of 128
    rows (it reads the same weights). Each row attends to its own tokens only, at its own
    positions: the padding a row gets to share the pool's width is masked."""
    waiting = sorted(range(len(prompts)), key=lambda i: len(prompts[i]), reverse=True)
    answers: list[list[int]] = [[] for _ in prompts]
    pool: _Pool | None = None
    while waiting or (pool is not None and pool.live):
        free = rows - (len(pool.live) if pool else 0)
        if waiting and (pool is None or not pool.live or free >= max(1, rows // 4)):
            take = [waiting.pop() for _ in range(min(free, len(waiting)))]
            new = _Pool.prefill(lm, take, [prompts[i] for i in take])
            pool = new if pool is None else pool.join(new)
        token = lm_head(lm.model, lm.spec, pool.hidden).argmax(-1)  # [rows]
        keep = []
        for j, t in enumerate(token.tolist()):
            answers[pool.live[j]].append(t)
            if not is_stop(t) and len(answers[pool.live[j]]) < cap:
                keep.append(j)
        if len(keep) < len(pool.live):
            pool, token = pool.select(keep), token[keep]
        if pool.live:
            pool = pool.step(lm, token)
    return [tuple(a) for a in answers]


def _left_pad(x: torch.Tensor, n: int, dim: int) -> torch.Tensor:
    """``x`` with ``n`` zero columns before dimension ``dim`` (none when ``n`` <= 0)."""
    if n <= 0:
        return x
    shape = list(x.shape)
    shape[dim] = n
    return torch.cat([x.new_zeros(shape), x], dim=dim)


def aggregate(per_request: dict[str, np.ndarray], prefix: str) -> dict[str, float]:
    """Means over requests x100, keys ``{prefix}/{metric}``, and ``{prefix}/score``, the
    harmonic mean of :data:`HEADLINE`."""
    from kaedit.evaluate import harmonic_mean

    out = {f"{prefix}/{k}": float(np.nanmean(v) * 100) if np.isfinite(v).any() else np.nan
           for k, v in per_request.items()}
    out[f"{prefix}/score"] = harmonic_mean([out.get(f"{prefix}/{m}", np.nan) for m in HEADLINE])
    return out


#: The unedited model's neighbourhood answers, in the run directory (read on resume).
REFERENCES = "wild_references.json"


def due_indices(wild: WildEval, evaluation: Any, schedule: Any,
                batches: Sequence[Sequence[int]]) -> list[int]:
    """Planned edits whose locality some WILD step will score: its batch and the tracked
    edits (``evaluation``: :class:`kaedit.evaluation.Evaluation`; ``schedule``:
    :class:`kaedit.schedule.Schedule`)."""
    n_steps, ends = len(batches), [0, *itertools.accumulate(len(b) for b in batches)]
    due: set[int] = set()
    for step in range(n_steps + 1):
        if schedule.evaluate_at(step, n_steps) and wild.locality_due(step, n_steps):
            first = max(step, 1)  # step 0 scores the first batch as its batch
            due.update(range(ends[first - 1], ends[first]))
            due.update(evaluation.tracked_indices(ends[step]))
    return sorted(due)


def start(wild: WildEval | None, run_dir: Path, step: int, evaluation: Any,
          schedule: Any, batches: Sequence[Sequence[int]]) -> WildEval | None:
    """The run's :class:`WildEval` (built by :func:`kaedit.setup.build_session`; None when
    ``wild.every`` is 0) with the unedited model's answers: at step 0, before any edit,
    generated for the neighbourhood prompts of every edit a WILD step will score
    (:func:`due_indices`) and saved as :data:`REFERENCES`; on a resumed run (first
    evaluation after step 0), read from it."""
    from kaedit.files import atomic_write

    if wild is None:
        return None
    path = Path(run_dir) / REFERENCES
    if step > 0:
        wild.references = {p: tuple(ids) for p, ids in json.loads(path.read_text()).items()}
        return wild
    due = due_indices(wild, evaluation, schedule, batches)
    wild.make_references([evaluation.planned[i] for i in due])
    atomic_write(path, json.dumps({p: list(ids) for p, ids in wild.references.items()}) + "\n")
    return wild
