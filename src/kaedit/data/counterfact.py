"""CounterFact rows -> :class:`EditRequest`, in ROME's layout and in EasyEdit's edit layout.

ROME (Meng et al. 2022, ``counterfact.json``)::

    {"case_id", "requested_rewrite": {"prompt": "{}, which is located in", "subject",
     "relation_id", "target_new": {"str"}, "target_true": {"str"}},
     "paraphrase_prompts", "neighborhood_prompts", "attribute_prompts", "generation_prompts"}

EasyEdit (``counterfact-edit.json``): a full sentence plus one rephrase and one locality probe::

    {"case_id", "prompt", "subject", "target_new", "ground_truth",
     "rephrase_prompt", "locality_prompt", "locality_ground_truth"}
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kaedit.data.fields import DatasetError, case_id, describe, template, text, texts
from kaedit.records import EditRequest

ROME_KEYS = ("requested_rewrite",)
EASYEDIT_KEYS = ("prompt", "subject", "target_new")


def _object(rw: Mapping[str, Any], key: str, where: str, optional: bool = False) -> str | None:
    """``requested_rewrite[key]["str"]`` (ROME stores objects as ``{"str", "id"}``)."""
    value = rw.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, Mapping):
        raise DatasetError(
            f"{where}: requested_rewrite.{key} must be an object with a 'str' "
            f"field, got {type(value).__name__ if key in rw else 'nothing'}"
        )
    return text(value, "str", f"{where} requested_rewrite.{key}")


def from_rome(row: Mapping[str, Any], index: int) -> EditRequest:
    """One ROME CounterFact row; the prompt template must hold exactly one ``{}``."""
    where = describe(row, index)
    if row.get("case_id") is None:
        raise DatasetError(f"{where}: required field 'case_id' is missing")
    rw = row.get("requested_rewrite")
    if not isinstance(rw, Mapping):
        raise DatasetError(
            f"{where}: field 'requested_rewrite' must be an object, got {type(rw).__name__}"
        )
    prompt = text(rw, "prompt", f"{where} requested_rewrite")
    if prompt.count("{}") != 1:
        raise DatasetError(
            f"{where}: requested_rewrite.prompt must contain exactly one '{{}}', got {prompt!r}"
        )
    subject = text(rw, "subject", f"{where} requested_rewrite")
    try:
        prompt.format(subject)
    except (IndexError, KeyError, ValueError) as err:
        raise DatasetError(
            f"{where}: requested_rewrite.prompt {prompt!r} is not a valid template ({err})"
        ) from None
    return EditRequest(
        case_id=str(row["case_id"]),
        subject=subject,
        prompt=prompt,
        target_new=_object(rw, "target_new", where),
        target_true=_object(rw, "target_true", where, optional=True),
        relation_id=text(rw, "relation_id", f"{where} requested_rewrite", optional=True),
        paraphrase_prompts=texts(row, "paraphrase_prompts", where),
        neighborhood_prompts=texts(row, "neighborhood_prompts", where),
        attribute_prompts=texts(row, "attribute_prompts", where),
        generation_prompts=texts(row, "generation_prompts", where),
        source="counterfact",
        target_new_id=(None if rw["target_new"].get("id") is None
                       else str(rw["target_new"]["id"])),
    )


def from_easyedit(row: Mapping[str, Any], index: int) -> EditRequest:
    """One EasyEdit CounterFact row; the template is ``prompt`` with its first occurrence of
    the subject replaced by ``{}``."""
    where = describe(row, index)
    subject = text(row, "subject", where)
    return EditRequest(
        case_id=case_id(row, index),
        subject=subject,
        prompt=template(text(row, "prompt", where), subject, where, "prompt"),
        target_new=text(row, "target_new", where, loose=True),
        target_true=text(row, "ground_truth", where, loose=True),
        relation_id=text(row, "relation_id", where, optional=True),
        paraphrase_prompts=texts(row, "rephrase_prompt", where),
        neighborhood_prompts=texts(row, "locality_prompt", where),
        neighborhood_answer=text(row, "locality_ground_truth", where, optional=True, loose=True),
        source="easyedit",
    )
