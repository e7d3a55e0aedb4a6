"""MEND zsRE rows -> :class:`EditRequest` (MEND's ``zsre_mend_eval.json``, MEMIT's
``zsre_mem-eval.json``)::

    {"subject", "src": "When was the inception of X?", "rephrase", "alt", "answers": [...],
     "loc": "nq question: ...", "loc_ans", "pred", "cond"}

``src`` is kept verbatim (question mark included); the template replaces the first occurrence
of the subject with ``{}``. ``alt`` is the new answer, ``answers[0]`` the gold one, and
``loc``/``loc_ans`` an unrelated Natural Questions probe whose answer must not change.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kaedit.data.fields import case_id, describe, template, text, texts
from kaedit.records import EditRequest

MEND_KEYS = ("src", "alt", "subject")


def from_mend(row: Mapping[str, Any], index: int) -> EditRequest:
    """One MEND zsRE row; ``case_id`` is the row's own field or its index."""
    where = describe(row, index)
    subject = text(row, "subject", where)
    text(row, "rephrase", where)  # required: zsRE's generalization probe
    text(row, "loc", where)  # required: zsRE's locality probe
    return EditRequest(
        case_id=case_id(row, index),
        subject=subject,
        prompt=template(text(row, "src", where), subject, where, "src"),
        target_new=text(row, "alt", where),
        target_true=text(row, "answers", where, optional=True, loose=True),
        relation_id=text(row, "relation_id", where, optional=True),
        paraphrase_prompts=texts(row, "rephrase", where),
        neighborhood_prompts=texts(row, "loc", where),
        neighborhood_answer=text(row, "loc_ans", where),
        source="zsre",
    )
