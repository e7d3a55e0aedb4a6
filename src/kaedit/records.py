"""Typed records shared by every part of kaedit.

Raw dataset rows become :class:`EditRequest` (one per fact to edit); everything downstream
(methods, evaluation, the runner) sees only these records. ``Deltas`` maps a parameter name
(as in ``model.named_parameters()``) to the additive update for that parameter.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

Deltas = dict[str, torch.Tensor]


@dataclass(frozen=True)
class EditRequest:
    """One fact to rewrite: ``prompt.format(subject) + target_new`` should become true.

    ``prompt`` is a template holding exactly one ``{}`` where the subject goes (ROME
    convention). ``target_true`` is the object the model is expected to know before the
    edit (CounterFact) or the dataset's gold answer (zsRE); it may be ``None`` when a
    dataset has none.
    """

    case_id: str
    subject: str
    prompt: str
    target_new: str
    target_true: str | None = None
    relation_id: str | None = None
    #: Rephrasings of the edited prompt (full strings, subject already filled in).
    paraphrase_prompts: tuple[str, ...] = ()
    #: Prompts about *other* subjects whose answer must not change.
    neighborhood_prompts: tuple[str, ...] = ()
    #: Expected answer of the neighborhood prompts. ``None`` means ``target_true``
    #: (CounterFact: neighbors share the true object); zsRE gives its own ``loc_ans``.
    neighborhood_answer: str | None = None
    #: Prompts about subjects that already have ``target_new`` (CounterFact consistency).
    attribute_prompts: tuple[str, ...] = ()
    #: Open-ended prompts about the subject (CounterFact fluency / consistency).
    generation_prompts: tuple[str, ...] = ()
    #: Which schema the record came from: "counterfact", "easyedit", "zsre", ...
    source: str = "counterfact"
    #: Knowledge-base id of ``target_new`` (CounterFact's Wikidata id; ROME's attribute
    #: snippets for consistency are keyed by ``(relation_id, target_new_id)``).
    target_new_id: str | None = None

    @property
    def rewrite_prompt(self) -> str:
        """The edited prompt with the subject filled in."""
        return self.prompt.format(self.subject)

    @property
    def neighborhood_target(self) -> str | None:
        if self.neighborhood_answer is not None:
            return self.neighborhood_answer
        return self.target_true
