"""Files a run writes: whole files replaced atomically (:func:`atomic_write`) and CSV files
that rows are appended to as they are produced (:class:`CsvRows`: ``metrics.csv``,
``retention.csv``)."""

from __future__ import annotations

import csv
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any


def atomic_write(path: Path, text: str) -> None:
    """Write then rename, so a crash never leaves a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


class CsvRows:
    """A CSV file that rows are appended to as they are produced (never rewritten per row).

    Columns are the rows' keys in order of first appearance; a row with a key the file has
    no column for rewrites it once with the wider header (rare: the first edited step adds
    the timing columns, a generation step the text metrics). ``keep`` rows of an existing
    file are kept and the rest dropped (a resumed run redoes the rows logged after its
    checkpoint); ``keep=0`` starts an empty file.
    """

    def __init__(self, path: Path, keep: int = 0) -> None:
        self.path = Path(path)
        self.columns: list[str] = []
        self.n_rows = 0
        old = self._read() if keep and self.path.is_file() else []
        if keep > len(old):
            raise ValueError(f"{self.path} has {len(old)} rows, the checkpoint expects {keep}")
        if keep:
            self._rewrite(old[:keep])
        elif self.path.exists():
            self.path.unlink()  # a fresh run in a used directory

    def _read(self) -> list[dict[str, str]]:
        with self.path.open(newline="") as f:
            reader = csv.DictReader(f)
            self.columns = list(reader.fieldnames or [])
            return list(reader)

    def _rewrite(self, rows: Sequence[Mapping[str, Any]]) -> None:
        atomic_write(self.path, _csv_text(self.columns, rows))
        self.n_rows = len(rows)

    def append(self, rows: Iterable[Mapping[str, Any]]) -> None:
        rows = [dict(r) for r in rows]
        new = [k for k in dict.fromkeys(k for r in rows for k in r) if k not in self.columns]
        if new or not self.path.exists():
            old = self._read() if self.path.exists() else []
            self.columns += [k for k in new if k not in self.columns]
            self._rewrite(old + rows)
            return
        with self.path.open("a", newline="") as f:
            f.write(_csv_text(self.columns, rows, header=False))
        self.n_rows += len(rows)


def _csv_text(columns: list[str], rows: Iterable[Mapping[str, Any]], header: bool = True) -> str:
    import io

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, restval="", lineterminator="\n")  # as pandas
    if header:
        w.writeheader()
    for r in rows:
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    return buf.getvalue()
