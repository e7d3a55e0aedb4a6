"""MEMIT's context templates: generated prefixes that make edits generalise, made once per
run (MEMIT §3) and grouped as :class:`Templates`; keys (:mod:`kaedit.methods.keys`) and
target values (:mod:`kaedit.methods.targets`) are read under each of them."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from kaedit.models import LoadedModel
from kaedit.records import EditRequest
from kaedit.sampling import SeededTopK
from kaedit.tokens import (
    pad,
)


@dataclass(frozen=True)
class Templates(Sequence[str]):
    """Context templates in groups, as MEMIT's ``get_context_templates`` makes them
    (kmeng01/memit ``memit/memit_main.py``): ``(("{}",), (<generated>. {}, ...), ...)``,
    one group for the plain prompt and one per ``(length, count)`` spec.

    It iterates, indexes and measures as the flat list ``["{}", <generated>. {}, ...]``
    (what target optimisation uses, as ``compute_z`` flattens the groups); the grouping
    only changes how :func:`compute_keys` averages (:meth:`weights`).
    """

    groups: tuple[tuple[str, ...], ...]

    def __post_init__(self) -> None:
        if not self.groups or not all(self.groups):
            raise ValueError(f"Templates: every group needs a template, got {self.groups!r}")

    @classmethod
    def ungrouped(cls, templates: Sequence[str]) -> Templates:
        """Every template its own group: :meth:`weights` is then the flat mean (ROME's
        ``compute_u``). A plain list of templates means this."""
        return cls(tuple((t,) for t in templates))

    @property
    def flat(self) -> list[str]:
        return [t for group in self.groups for t in group]

    def __len__(self) -> int:
        return sum(len(g) for g in self.groups)

    def __getitem__(self, i):  # type: ignore[override]
        return self.flat[i]

    def __iter__(self) -> Iterator[str]:
        return iter(self.flat)

    def weights(self) -> torch.Tensor:
        """Weight of each flat template in the two-level mean ``[T]`` (float32, sums to 1):
        1 / (number of groups · size of its group)."""
        return torch.tensor([1.0 / (len(self.groups) * len(g)) for g in self.groups for _ in g])


def as_templates(templates: Sequence[str]) -> Templates:
    """``templates`` itself if grouped, else every template its own group."""
    return templates if isinstance(templates, Templates) else Templates.ungrouped(templates)


def context_templates(
    lm: LoadedModel,
    specs: Sequence[Sequence[int]] = ((10, 5),),
    starts: Sequence[str] = ("The", "Therefore", "Because", "I", "You"),
    seed: int = 0,
) -> Templates:
    """``(("{}",), ("<generated text>. {}", ...), ...)``: prefixes that make edits generalise.

    For each ``(length, count)`` in ``specs``, ``count`` continuations of ``length`` tokens
    are sampled (top-k 5) from the start words, with a CPU generator seeded anew for each
    spec: the same templates on every device, and the global RNG untouched. Each spec is
    one group (kmeng01/memit ``memit/memit_main.py``: ``get_context_templates``).
    """
    from transformers import LogitsProcessorList

    model, tok = lm.model, lm.tokenizer
    groups: list[tuple[str, ...]] = [("{}",)]
    for length, count in specs:
        sampler = SeededTopK(5, seed)  # each spec starts from the seed
        per_start = max(1, count // len(starts))
        enc = [list(tok(s)["input_ids"]) for s in starts for _ in range(per_start)]
        # left-padded so every row continues from its last real token
        ids, mask = pad(enc, tok.pad_token_id, lm.device, left=True)
        width = ids.shape[1]
        gen = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=length, do_sample=False,
            logits_processor=LogitsProcessorList([sampler]), pad_token_id=tok.pad_token_id,
        )
        group = []
        for row, m in zip(gen, mask, strict=True):
            text = tok.decode(row[int(width - m.sum()) :], skip_special_tokens=True)
            group.append(text.replace("{", " ").replace("}", " ") + ". {}")
        groups.append(tuple(group))
    return Templates(tuple(groups))


def prompt_template(context: str, request: EditRequest) -> str:
    """A context template applied to the request's prompt: still one ``{}`` (the subject)."""
    return context.replace("{}", request.prompt.replace("{}", "\x00"), 1).replace("\x00", "{}")
