"""Tokenisation shared by methods and evaluation: prompts, subject positions, padding.

Prompts and targets are tokenised separately and concatenated as ids, so what a method
optimises and what evaluation scores are the same token sequences (ROME/MEMIT append
``" " + target`` to the prompt in the same way).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from kaedit.hooks import get_module, run_until
from kaedit.models import ModelSpec


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


def target_ids(tok, target: str) -> tuple[int, ...]:
    """Token ids of the answer as it follows a prompt: ``" " + target``, no special tokens."""
    ids = tok(" " + target.strip(), add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"target {target!r} tokenises to nothing")
    return tuple(ids)


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
) -> torch.Tensor:
    """Hidden states after the final norm ``[batch, len, d]``; the LM head is not run.

    Callers apply :func:`lm_head` to just the positions they need, which saves most of the
    cost of a large-vocabulary head. Gradients flow if the caller enables them.

    With ``past_key_values`` (a ``transformers`` cache holding earlier positions), ``ids``
    are the positions after the cached ones: ``mask`` then covers cache + ``ids``
    ``[batch, cached + len]`` and ``position_ids`` ``[batch, len]`` give each row's true
    positions. The cache is extended in place (transformers' caches append).
    """
    ln_f = spec.module("ln_f")
    extra = {} if position_ids is None else {"position_ids": position_ids}
    if past_key_values is not None:
        # transformers renamed the argument (``past_key_values`` deprecated from 5.2x)
        params = inspect.signature(model.forward).parameters
        extra["cache" if "cache" in params else "past_key_values"] = past_key_values
        extra["use_cache"] = True
    else:
        extra["use_cache"] = False
    tr = run_until(model, [ln_f], detach=False, input_ids=ids, attention_mask=mask, **extra)
    return tr[ln_f].output


def lm_head(model: nn.Module, spec: ModelSpec, hidden: torch.Tensor) -> torch.Tensor:
    return get_module(model, spec.lm_head)(hidden)


def chunks(n: int, size: int) -> Iterator[slice]:
    for i in range(0, n, size):
        yield slice(i, min(i + size, n))
