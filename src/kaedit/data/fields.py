"""Reading the fields of a raw dataset row, with errors that name the row: shared by the
schema converters (:mod:`kaedit.data.counterfact`, :mod:`kaedit.data.zsre`) and
:mod:`kaedit.data.base`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kaedit.errors import ConfigError

Row = Mapping[str, Any]


class DatasetError(ConfigError):
    """A dataset file, value or record is unusable; the message says which and why."""


# ----------------------------------------------------------------------------- row fields
def describe(row: Row, index: int) -> str:
    """``record 5 (case_id=123)``: how error messages name a row."""
    cid = row.get("case_id") if isinstance(row, Mapping) else None
    return f"record {index}" + (f" (case_id={cid})" if cid is not None else "")


def case_id(row: Row, index: int) -> str:
    """The row's ``case_id`` as a string, or its index when it has none."""
    cid = row.get("case_id")
    return str(index) if cid is None else str(cid)


def text(
    row: Row, key: str, where: str, *, optional: bool = False, loose: bool = False
) -> str | None:
    """A non-empty string field; missing -> error unless ``optional``. With ``loose``,
    ``{"str": s}`` and lists (first element) are accepted too, since EasyEdit variants and
    zsRE's ``answers`` store answers that way."""
    if key not in row or row[key] is None:
        if optional:
            return None
        raise DatasetError(f"{where}: required field {key!r} is missing")
    value = row[key]
    if loose and isinstance(value, Mapping) and "str" in value:
        value = value["str"]
    elif loose and isinstance(value, (list, tuple)):
        if not value:
            if optional:
                return None
            raise DatasetError(f"{where}: field {key!r} is an empty list")
        value = value[0]
    if not isinstance(value, str):
        raise DatasetError(f"{where}: field {key!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise DatasetError(f"{where}: field {key!r} is an empty string")
    return value


def texts(row: Row, key: str, where: str) -> tuple[str, ...]:
    """An optional field holding one prompt or a list of prompts, as a tuple of non-empty
    strings (``()`` when absent)."""
    value = row.get(key)
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)):
        raise DatasetError(
            f"{where}: field {key!r} must be a string or a list of strings, "
            f"got {type(value).__name__}"
        )
    for i, item in enumerate(items):
        if not isinstance(item, str) or not item.strip():
            raise DatasetError(
                f"{where}: field {key!r}[{i}] must be a non-empty string, got {item!r}"
            )
    return tuple(items)


def template(sentence: str, subject: str, where: str, key: str) -> str:
    """``sentence`` with the FIRST occurrence of ``subject`` replaced by ``{}``; other braces
    are escaped so that ``template(...).format(subject) == sentence``."""
    at = sentence.find(subject)
    if at < 0:
        raise DatasetError(f"{where}: subject {subject!r} does not occur in {key} {sentence!r}")

    def esc(s: str) -> str:
        return s.replace("{", "{{").replace("}", "}}")

    return esc(sentence[:at]) + "{}" + esc(sentence[at + len(subject) :])
