"""Several datasets read as one stream of edits (``conf/dataset/counterfact_11k.yaml``).

**Union by case id.** The parts are read in the order given and each part's records in
file order; a record whose ``case_id`` an earlier record already has is skipped, so the
first part wins. That part is listed first where it holds more fields for the same fact
(ROME's CounterFact: paraphrases, neighbourhood, attribute and generation prompts, against
EasyEdit's one rephrase and one locality prompt); evaluation scores each record on the
prompts it has (a metric without prompts is NaN for that record and left out of means).
A skipped record must be the same edit (subject, filled prompt, new object), otherwise the
two files do not mean the same thing by a case id and :class:`DatasetError` says so.

**Order.** Parts first to last, each in its own order: CounterFact's 2,180 ROME records
come first, exactly ``dataset=counterfact``'s sequence (earlier runs on it are a prefix of
the long stream, save for dropped conflicts), then the EasyEdit-only records in theirs
(both files are sorted by case id). No shuffling: the stream is the same on every machine.

**Conflicts.** Two records *conflict* when they edit the same subject and relation to
different objects: the later edit would overwrite the earlier one. The relation is the
record's ``relation_id``; a record without one (EasyEdit) takes the relation id that the
other records with its prompt template carry, when they all carry the same one, and
otherwise its template stands for the relation. ``on_conflict`` decides: ``error`` raises
:class:`DatasetError` naming both records, ``drop_later`` drops the later record (logged),
``keep`` keeps both (logged). Records with the same subject, relation and object are kept.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

from kaedit.data.fields import DatasetError
from kaedit.records import EditRequest

log = logging.getLogger(__name__)

ON_CONFLICT = ("error", "drop_later", "keep")


def union(parts: Iterable[Sequence[EditRequest]]) -> list[EditRequest]:
    """The records of all parts, each ``case_id`` once (its first record), in part order."""
    first: dict[str, EditRequest] = {}
    for part in parts:
        for r in part:
            kept = first.setdefault(r.case_id, r)
            same = (kept.subject, kept.rewrite_prompt, kept.target_new)
            if same != (r.subject, r.rewrite_prompt, r.target_new):
                raise DatasetError(
                    f"case_id={r.case_id} names two different edits: {kept.rewrite_prompt!r} "
                    f"-> {kept.target_new!r} ({kept.source}) and {r.rewrite_prompt!r} -> "
                    f"{r.target_new!r} ({r.source}); the sources do not share case ids"
                )
    return list(first.values())


def relations(records: Iterable[EditRequest]) -> dict[str, str]:
    """Prompt template -> relation id, for the templates whose records with a relation id
    all have the same one."""
    seen: dict[str, set[str]] = {}
    for r in records:
        if r.relation_id is not None:
            seen.setdefault(r.prompt, set()).add(r.relation_id)
    return {t: next(iter(ids)) for t, ids in seen.items() if len(ids) == 1}


def check_on_conflict(on_conflict: str) -> str:
    """``on_conflict`` if it is one of :data:`ON_CONFLICT`, else :class:`DatasetError`."""
    if on_conflict not in ON_CONFLICT:
        raise DatasetError(
            f"unknown on_conflict {on_conflict!r}; valid options: {', '.join(ON_CONFLICT)}"
        )
    return on_conflict


def drop_conflicts(records: Sequence[EditRequest], on_conflict: str) -> list[EditRequest]:
    """``records`` less the later record of each conflict (``drop_later``), all of them
    (``keep``), or :class:`DatasetError` at the first conflict (``error``)."""
    check_on_conflict(on_conflict)
    by_template = relations(records)
    first: dict[tuple[str, str], EditRequest] = {}
    out, conflicts = [], []
    for r in records:
        relation = r.relation_id or by_template.get(r.prompt, r.prompt)
        kept = first.setdefault((r.subject, relation), r)
        if kept.target_new == r.target_new:
            out.append(r)
            continue
        message = (
            f"case_id={kept.case_id} ({kept.rewrite_prompt!r} -> {kept.target_new!r}) and "
            f"case_id={r.case_id} ({r.rewrite_prompt!r} -> {r.target_new!r}) edit subject "
            f"{r.subject!r}, relation {relation!r}, to different objects "
            f"{kept.target_new!r} and {r.target_new!r}"
        )
        if on_conflict == "error":
            raise DatasetError(
                f"{message}; set dataset.on_conflict=drop_later to drop the later record "
                "or dataset.on_conflict=keep to keep both"
            )
        conflicts.append(message)
        if on_conflict == "keep":
            out.append(r)
    if conflicts:
        log.warning(
            "%d records edit a subject and relation an earlier record edits to another object "
            "(on_conflict=%s: %s them), e.g. %s",
            len(conflicts), on_conflict, "kept" if on_conflict == "keep" else "dropped",
            conflicts[0],
        )
    return out


def merge(parts: Iterable[Sequence[EditRequest]], on_conflict: str = "error") -> list[EditRequest]:
    """One stream from several parts: :func:`union`, then :func:`drop_conflicts`."""
    return drop_conflicts(union(parts), on_conflict)
