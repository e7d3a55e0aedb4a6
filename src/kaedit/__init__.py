"""kaedit: sequential knowledge editing of language models (AdaPLE and friends).

``import kaedit`` is light: :class:`kaedit.Editor` (the notebook API,
:mod:`kaedit.editor`) is imported, with torch and transformers, on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["Editor"]

if TYPE_CHECKING:
    from kaedit.editor import Editor


def __getattr__(name: str) -> Any:
    if name == "Editor":
        from kaedit.editor import Editor

        return Editor
    raise AttributeError(f"module 'kaedit' has no attribute {name!r}")
