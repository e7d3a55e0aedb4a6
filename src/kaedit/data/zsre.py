"""MEND zsRE rows -> :class:`EditRequest` (MEND's ``zsre_mend_eval.json``, MEMIT's
``zsre_mem-eval.json``)::

    {"subject", "src": "When was the inception of X?", "rephrase", "alt", "answers": [...],
     "loc": "nq question: ...", "loc_ans", "pred", "cond"}

``src`` is kept verbatim (question mark included); the template replaces the first occurrence
of the subject with ``{}``. ``answers[0]`` is the gold answer, ``alt`` an alternative one, and
``loc``/``loc_ans`` an unrelated Natural Questions probe whose answer must not change.

Two readings of the same rows (schemas):

* ``zsre`` (the default, :func:`from_memit`) -- MEMIT's (kmeng01/memit ``dsets/zsre.py``,
  ``MENDQADataset``), which the paper's zsRE tables follow ("the same as MEMIT"): the edit
  asks for the gold answer (``target_new = answers[0]``) and the neighbourhood prompt is
  ``loc + "?"``, scored token by token against ``" " + loc_ans``.
* ``zsre_easyedit`` (:func:`from_easyedit`) -- EasyEdit's (zjunlp/EasyEdit
  ``easyeditor/dataset/zsre.py``, ``ZsreDataset``), which its published zsRE tables use:
  the edit asks for ``alt`` and the locality prompt is ``loc`` verbatim. kaedit scores
  locality the same way in both readings (token accuracy of ``loc_ans``); EasyEdit
  instead counts the tokens whose prediction the edit left unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kaedit.data.fields import case_id, describe, template, text, texts
from kaedit.records import EditRequest

MEND_KEYS = ("src", "alt", "subject")


def _request(row: Mapping[str, Any], index: int, *, target_key: str, loc_suffix: str,
             source: str) -> EditRequest:
    where = describe(row, index)
    subject = text(row, "subject", where)
    text(row, "rephrase", where)  # required: zsRE's generalization probe
    loc = text(row, "loc", where)  # required: zsRE's locality probe
    gold = text(row, "answers", where, optional=target_key != "answers", loose=True)
    return EditRequest(
        case_id=case_id(row, index),
        subject=subject,
        prompt=template(text(row, "src", where), subject, where, "src"),
        target_new=text(row, target_key, where, loose=True),
        target_true=gold,
        relation_id=text(row, "relation_id", where, optional=True),
        paraphrase_prompts=texts(row, "rephrase", where),
        neighborhood_prompts=(loc + loc_suffix,),
        neighborhood_answer=text(row, "loc_ans", where),
        source=source,
    )


def from_memit(row: Mapping[str, Any], index: int) -> EditRequest:
    """One zsRE row as MEMIT reads it (new answer ``answers[0]``, neighbourhood ``loc + "?"``);
    ``case_id`` is the row's own field or its index."""
    return _request(row, index, target_key="answers", loc_suffix="?", source="zsre")


def from_easyedit(row: Mapping[str, Any], index: int) -> EditRequest:
    """One zsRE row as EasyEdit reads it (new answer ``alt``, locality prompt ``loc``)."""
    return _request(row, index, target_key="alt", loc_suffix="", source="zsre_easyedit")
