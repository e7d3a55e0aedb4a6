"""Tokenisation shared by methods and evaluation: prompts, subject positions, padding, and
the teacher-forced batch.

Prompts and targets are tokenised separately and concatenated as ids, so what a method
optimises and what evaluation scores are the same token sequences (ROME/MEMIT append
``" " + target`` to the prompt in the same way). :func:`split_mismatches` checks that this
split tokenisation equals tokenising ``prompt + " " + target`` as one text.

:class:`TeacherForced` is the one padded batch of (prompt, target) pairs that FT's loss,
MEND's gradients and the scorer read NLLs and accuracies from. Target optimisation
(:func:`kaedit.methods.targets.optimize_targets`) takes its NLL rows' geometry (the columns
predicting each target token, their ids and owners) and token-mean NLL from it too, but
runs its own length-grouped, prefix-cached forward passes.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call

from kaedit.hooks import TraceResult, get_module, run_until, start_at
from kaedit.models import LoadedModel, ModelSpec


def fill(template: str, subject: str) -> tuple[str, int]:
    """Put ``subject`` in place of the first ``{}``; return the text and the subject's end."""
    i = template.find("{}")
    if i < 0:
        raise ValueError(f"prompt template {template!r} has no '{{}}' for the subject")
    # str.format semantics ("{{" is a literal brace), as EditRequest.rewrite_prompt uses.
    prefix, suffix = template[:i].format(), template[i + 2 :].format()
    return prefix + subject + suffix, len(prefix) + len(subject)


@dataclass(frozen=True)
class Encoded:
    ids: tuple[int, ...]
    #: Index of the last token that overlaps the subject (ROME's "subject_last").
    subject_last: int


def encode(tok, template: str, subject: str) -> Encoded:
    """Tokenise ``template`` filled with ``subject`` and locate the subject's last token."""
    text, end = fill(template, subject)
    enc = tok(text, return_offsets_mapping=True)
    last = max(
        (j for j, (a, b) in enumerate(enc["offset_mapping"]) if b > a and a < end), default=-1
    )
    if last < 0:
        raise ValueError(f"subject {subject!r} has no token in {text!r}")
    return Encoded(tuple(enc["input_ids"]), last)


def prompt_ids(tok, prompt: str) -> tuple[int, ...]:
    """Token ids of a prompt as evaluation scores it (with the tokenizer's special tokens)."""
    return tuple(tok(prompt)["input_ids"])


def target_ids(tok, target: str) -> tuple[int, ...]:
    """Token ids of the answer as it follows a prompt: ``" " + target``, no special tokens."""
    ids = tok(" " + target.strip(), add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"target {target!r} tokenises to nothing")
    return tuple(ids)


def split_mismatches(
    tok, pairs: Iterable[tuple[str, str]]
) -> list[tuple[str, str, tuple[int, ...], tuple[int, ...]]]:
    """The (prompt, target) pairs whose split tokenisation -- :func:`prompt_ids` followed by
    :func:`target_ids`, which is how kaedit scores and edits -- differs from tokenising
    ``prompt + " " + target`` as one text, each with both id sequences (split, joint).

    The reference code tokenises the joined text (ROME's ``test_batch_prediction``) but
    takes the target's tokens from ``" " + target`` tokenised alone (ROME's ``compute_v``,
    MEMIT's ``compute_z``), so it assumes the two agree too. They do unless the tokenizer
    merges across the space or puts a lone "▁" before a text tokenised alone
    (SentencePiece, as Llama-2's). Distinct texts are tokenised once, in batches.
    """
    unique = list(dict.fromkeys(pairs))
    if not unique:
        return []
    joint = tok([f"{p} {t.strip()}" for p, t in unique])["input_ids"]
    prompts = list(dict.fromkeys(p for p, _ in unique))
    prompt_of = dict(zip(prompts, tok(prompts)["input_ids"], strict=True))
    targets = list(dict.fromkeys(t for _, t in unique))
    target_of = dict(zip(targets, tok([" " + t.strip() for t in targets],
                                      add_special_tokens=False)["input_ids"], strict=True))
    out = []
    for (p, t), j in zip(unique, joint, strict=True):
        split = (*prompt_of[p], *target_of[t])
        if split != tuple(j):
            out.append((p, t, split, tuple(j)))
    return out


def pad(
    seqs: Sequence[Sequence[int]], pad_id: int, device: torch.device, left: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad to a ``[batch, max_len]`` id tensor and its attention mask.

    Right padding (the default) keeps every row's positions at 0..len-1; left padding is for
    generation, where every row's next token must be the last column.
    """
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        cols = slice(width - len(s), width) if left else slice(0, len(s))
        ids[i, cols] = torch.tensor(s, dtype=torch.long)
        mask[i, cols] = 1
    return ids.to(device), mask.to(device)


def final_hidden(
    model: nn.Module,
    spec: ModelSpec,
    ids: torch.Tensor,
    mask: torch.Tensor | None,
    *,
    position_ids: torch.Tensor | None = None,
    past_key_values=None,
    start: int = 0,
    block_input: torch.Tensor | None = None,
) -> torch.Tensor:
    """Hidden states after the final norm ``[batch, len, d]``; the LM head is not run.

    Callers apply :func:`lm_head` to just the positions they need, which saves most of the
    cost of a large-vocabulary head. Gradients flow if the caller enables them.

    With ``past_key_values`` (a ``transformers`` cache holding earlier positions), ``ids``
    are the positions after the cached ones: ``mask`` then covers cache + ``ids``
    ``[batch, cached + len]`` and ``position_ids`` ``[batch, len]`` give each row's true
    positions. The cache is extended in place (transformers' caches append).

    With ``start`` > 0, ``block_input`` ``[batch, len, d]`` is the input of decoder block
    ``start`` at these positions (:func:`block_inputs`) and only blocks ``start`` onwards
    run (:func:`kaedit.hooks.start_at`); ``ids`` is then unused. A cache must still hold
    every block's entries.
    """
    if start:
        if block_input is None:
            raise ValueError("final_hidden: start > 0 needs the block's input (block_input)")
        with start_at(model, spec.layers_path, start,
                      [spec.pos_embed] if spec.pos_embed else []):
            return _final_hidden(model, spec, mask, position_ids, past_key_values,
                                 inputs_embeds=block_input)
    return _final_hidden(model, spec, mask, position_ids, past_key_values, input_ids=ids)


def _final_hidden(model, spec: ModelSpec, mask, position_ids, past_key_values,
                  **inputs: torch.Tensor) -> torch.Tensor:
    ln_f = spec.module("ln_f")
    tr = run_until(model, [ln_f], detach=False, attention_mask=mask, **inputs,
                   **_position_kwargs(model, position_ids, past_key_values))
    return tr[ln_f].output


def _position_kwargs(model: nn.Module, position_ids, past_key_values) -> dict:
    """The forward's position ids and cache arguments (``use_cache`` with a cache)."""
    extra: dict = {} if position_ids is None else {"position_ids": position_ids}
    if past_key_values is not None:
        # transformers renamed the argument (``past_key_values`` deprecated from 5.2x)
        params = inspect.signature(model.forward).parameters
        extra["cache" if "cache" in params else "past_key_values"] = past_key_values
        extra["use_cache"] = True
    else:
        extra["use_cache"] = False
    return extra


@torch.no_grad()
def block_inputs(
    model: nn.Module,
    spec: ModelSpec,
    layer: int,
    ids: torch.Tensor,
    mask: torch.Tensor | None,
    *,
    position_ids: torch.Tensor | None = None,
    past_key_values=None,
) -> torch.Tensor:
    """Input of decoder block ``layer`` at ``ids`` ``[batch, len, d]`` (no grad): what
    :func:`final_hidden` takes as ``block_input`` to start there. Arguments as
    :func:`final_hidden`'s; the pass stops at the block, so a cache passed in gains entries
    for the blocks below ``layer`` only."""
    block = spec.module("layer", layer)
    tr = run_until(model, [block], inputs=True, outputs=False, input_ids=ids,
                   attention_mask=mask, **_position_kwargs(model, position_ids, past_key_values))
    return tr[block].input


def lm_head(model: nn.Module, spec: ModelSpec, hidden: torch.Tensor) -> torch.Tensor:
    return get_module(model, spec.lm_head)(hidden)


def chunks(n: int, size: int) -> Iterator[slice]:
    for i in range(0, n, size):
        yield slice(i, min(i + size, n))


@dataclass(frozen=True)
class TeacherForced:
    """One right-padded batch of teacher-forced (prompt, target) pairs, then plain rows.

    Pair ``i`` is the row ``prompt + target[:-1]``; the logits at position
    ``len(prompt) - 1 + j`` of that row predict target token ``j``. With ``share_rows``,
    pairs whose rows are the same token sequence (one prompt, two single-token answers)
    share one row. Plain rows (no target: MEND's locality inputs) follow the pair rows.

    The LM head runs only on ``positions`` (each distinct (row, column) once, sorted);
    ``at`` maps every target token to its position. Token-level values are reduced to
    pairs by ``owner`` (token-mean per pair).
    """

    ids: torch.Tensor  # [rows, len] right-padded
    mask: torch.Tensor  # [rows, len]
    #: Rows ``0..n_forced-1`` hold pairs; rows ``n_forced..`` are plain prompts.
    n_forced: int
    pair_row: torch.Tensor  # [pairs] the row of each pair
    row: torch.Tensor  # [tokens] the row of each target token
    col: torch.Tensor  # [tokens] the position whose logits predict it
    tok: torch.Tensor  # [tokens] the target token id
    owner: torch.Tensor  # [tokens] the pair it belongs to
    positions: torch.Tensor  # [positions, 2] distinct (row, col) that predict a target token
    at: torch.Tensor  # [tokens] index into ``positions``

    @property
    def n_pairs(self) -> int:
        return len(self.pair_row)

    @staticmethod
    def row_ids(prompt: Sequence[int], target: Sequence[int]) -> tuple[int, ...]:
        """The teacher-forced row of a pair: ``prompt + target[:-1]`` (its last column
        predicts the target's last token, so nothing after it is run)."""
        return (*prompt, *target[:-1])

    @classmethod
    def from_ids(
        cls,
        pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
        pad_id: int,
        device: torch.device,
        plain: Sequence[Sequence[int]] = (),
        share_rows: bool = False,
    ) -> TeacherForced:
        """From token ids: ``pairs`` of (prompt ids, target ids), then ``plain`` prompt ids."""
        seqs: list[tuple[int, ...]] = []
        row_of: dict[tuple[int, ...], int] = {}
        pair_row, rows, cols, toks, owner = [], [], [], [], []
        for i, (p, t) in enumerate(pairs):
            if not t:
                raise ValueError(f"pair {i} has an empty target")
            seq = cls.row_ids(p, t)
            r = row_of.get(seq) if share_rows else None
            if r is None:
                r = row_of[seq] = len(seqs)
                seqs.append(seq)
            pair_row.append(r)
            rows += [r] * len(t)
            cols += [len(p) - 1 + j for j in range(len(t))]
            toks += list(t)
            owner += [i] * len(t)
        n_forced = len(seqs)
        seqs += [tuple(p) for p in plain]
        ids, mask = pad(seqs, pad_id, device)
        pos = sorted(set(zip(rows, cols, strict=True)))
        index = {rc: k for k, rc in enumerate(pos)}

        def as_t(x: Sequence[int]) -> torch.Tensor:
            return torch.tensor(x, dtype=torch.long, device=device)

        at = [index[rc] for rc in zip(rows, cols, strict=True)]
        return cls(ids, mask, n_forced, as_t(pair_row), as_t(rows), as_t(cols), as_t(toks),
                   as_t(owner), as_t(pos).view(-1, 2), as_t(at))

    @classmethod
    def build(cls, lm: LoadedModel, pairs: Sequence[tuple[str, str]],
              plain: Sequence[str] = (), share_rows: bool = False) -> TeacherForced:
        """From text, tokenised as evaluation scores it (:func:`prompt_ids`, :func:`target_ids`)."""
        tok = lm.tokenizer
        return cls.from_ids([(prompt_ids(tok, p), target_ids(tok, t)) for p, t in pairs],
                            tok.pad_token_id, lm.device,
                            plain=[prompt_ids(tok, p) for p in plain], share_rows=share_rows)

    def hidden(
        self,
        lm: LoadedModel,
        weights: Mapping[str, torch.Tensor] | None = None,
        capture: Iterable[str] = (),
    ) -> tuple[torch.Tensor, TraceResult]:
        """Final hidden states ``[rows, len, d]`` (the LM head is not run) with ``weights``
        substituted for the named parameters (``functional_call``: the model is not
        touched); ``capture`` names modules whose input and output are recorded too.
        Gradients flow where the caller enables them (nothing is detached)."""
        capture = list(capture)
        ln_f = lm.spec.module("ln_f")
        inputs = {"input_ids": self.ids, "attention_mask": self.mask, "use_cache": False}
        call = (lambda: functional_call(lm.model, dict(weights), (), inputs)) if weights else None
        tr = run_until(lm.model, [*capture, ln_f], inputs=bool(capture), detach=False,
                       forward=call, **inputs)
        return tr[ln_f].output, tr

    def logp(self, lm: LoadedModel, hidden: torch.Tensor) -> torch.Tensor:
        """Log-probabilities ``[positions, vocab]`` (float32) from final hidden states
        ``[rows, len, d]``: the LM head runs on the predicting positions only."""
        h = hidden[self.positions[:, 0], self.positions[:, 1]]  # [positions, d]
        return torch.log_softmax(lm_head(lm.model, lm.spec, h).float(), dim=-1)

    def token_nll(self, logp: torch.Tensor) -> torch.Tensor:
        """NLL of every target token ``[tokens]`` from :meth:`logp`."""
        return -logp[self.at, self.tok]

    def token_hits(self, logp: torch.Tensor) -> torch.Tensor:
        """1.0 where a target token is the argmax of its position's distribution ``[tokens]``."""
        return (logp.argmax(-1)[self.at] == self.tok).float()

    def pair_mean(self, per_token: torch.Tensor) -> torch.Tensor:
        """Mean over each pair's target tokens ``[pairs]``."""
        total = torch.zeros(self.n_pairs, device=per_token.device, dtype=per_token.dtype)
        total = total.index_add(0, self.owner, per_token)
        return total / torch.bincount(self.owner, minlength=self.n_pairs).to(per_token.dtype)

    def forced_nll(self, lm: LoadedModel, hidden: torch.Tensor) -> torch.Tensor:
        """Token-mean NLL of each pair's target ``[pairs]``."""
        return self.pair_mean(self.token_nll(self.logp(lm, hidden)))

    def plain_logp(self, lm: LoadedModel, hidden: torch.Tensor) -> torch.Tensor:
        """Next-token log-probabilities at every real position of the plain rows ``[P, V]``."""
        sel = self.mask[self.n_forced :].bool()  # [plain, len]
        h = hidden[self.n_forced :][sel]  # [P, d]
        return torch.log_softmax(lm_head(lm.model, lm.spec, h).float(), dim=-1)
