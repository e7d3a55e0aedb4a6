"""Experiment trackers with one interface: W&B, local CSV files, or nothing.

``conf/logger/*.yaml`` lists the trackers of a run; the runner instantiates each with
``run_dir`` and the resolved ``config`` and fans calls out through :class:`Trackers`, so
no code anywhere branches on whether W&B is on.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from kaedit.errors import ConfigError

log = logging.getLogger(__name__)


class Tracker(Protocol):
    """Constructed with ``run_dir``, ``run_config`` and ``resume`` (what ``state()``
    returned when the run was checkpointed, or None for a fresh run)."""

    def log(self, row: Mapping[str, Any], step: int) -> None: ...

    def state(self) -> dict[str, Any]: ...

    def summary(self, values: Mapping[str, Any]) -> None: ...

    def images(self, paths: Mapping[str, str]) -> None:
        """Figures already saved as files (``name -> path``)."""

    def table(self, name: str, rows: Sequence[Mapping[str, Any]]) -> None:
        """A table already saved as a file (e.g. ``retention.csv``), one dict per row."""

    def finish(self) -> None: ...


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


class CsvTracker:
    """``metrics.csv`` (one row per logged step, appended) and ``summary.json``."""

    def __init__(self, run_dir: str, run_config: Mapping[str, Any] | None = None,
                 resume: Mapping[str, Any] | None = None, filename: str = "metrics.csv") -> None:
        self.rows = CsvRows(Path(run_dir) / filename, keep=int((resume or {}).get("rows", 0)))
        self.summary_path = Path(run_dir) / "summary.json"

    def log(self, row: Mapping[str, Any], step: int) -> None:
        self.rows.append([row])

    def state(self) -> dict[str, Any]:
        """The number of rows written: a resumed run keeps those and drops the rest."""
        return {"rows": self.rows.n_rows}

    def summary(self, values: Mapping[str, Any]) -> None:
        clean = {k: (None if isinstance(v, float) and math.isnan(v) else v)
                 for k, v in values.items()}
        atomic_write(self.summary_path, json.dumps(clean, indent=2) + "\n")

    def images(self, paths: Mapping[str, str]) -> None:
        return None  # the figures are files in the run directory already

    def table(self, name: str, rows: Sequence[Mapping[str, Any]]) -> None:
        return None  # written by the runner as the rows came (retention.csv)

    def finish(self) -> None:
        return None


def _csv_text(columns: list[str], rows: Iterable[Mapping[str, Any]], header: bool = True) -> str:
    import io

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, restval="", lineterminator="\n")  # as pandas
    if header:
        w.writeheader()
    for r in rows:
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    return buf.getvalue()


class WandbTracker:
    """A W&B run saved under ``run_dir/wandb`` (offline by default; ``wandb sync`` later)."""

    def __init__(
        self,
        run_dir: str,
        run_config: Mapping[str, Any] | None = None,
        project: str = "kaedit",
        entity: str | None = None,
        mode: str = "offline",
        group: str | None = None,
        tags: Iterable[str] = (),
        name: str | None = None,
        resume: Mapping[str, Any] | None = None,
    ) -> None:
        import wandb

        valid = ("offline", "online", "disabled")
        if mode not in valid:
            raise ConfigError(f"logger.wandb.mode={mode!r} is not one of {valid}")
        run_id = (resume or {}).get("run_id")
        self.run = wandb.init(
            project=project, entity=entity, mode=mode, group=group, tags=list(tags) or None,
            name=name, id=run_id, resume="allow" if run_id else None, dir=str(Path(run_dir)),
            config=dict(run_config or {}), settings=wandb.Settings(silent=True, console="off"),
            reinit="finish_previous",
        )
        self.run_id = self.run.id
        log.info("W&B run %s (%s) in %s", self.run.id, mode, self.run.dir)

    def log(self, row: Mapping[str, Any], step: int) -> None:
        self.run.log({k: v for k, v in row.items() if k != "step"}, step=step)

    def state(self) -> dict[str, Any]:
        return {"run_id": self.run_id}

    def summary(self, values: Mapping[str, Any]) -> None:
        for k, v in values.items():
            self.run.summary[k] = v

    def images(self, paths: Mapping[str, str]) -> None:
        import wandb

        self.run.log({k: wandb.Image(str(p)) for k, p in paths.items()})

    def table(self, name: str, rows: Sequence[Mapping[str, Any]]) -> None:
        import pandas as pd
        import wandb

        if rows:
            self.run.log({name: wandb.Table(dataframe=pd.DataFrame(list(rows)))})

    def finish(self) -> None:
        self.run.finish()


class Trackers:
    """Fan-out to several trackers; ``finish`` reaches every one even if one fails."""

    def __init__(self, trackers: Iterable[Tracker]) -> None:
        self.trackers = list(trackers)

    def log(self, row: Mapping[str, Any], step: int) -> None:
        for t in self.trackers:
            t.log(row, step)

    def summary(self, values: Mapping[str, Any]) -> None:
        for t in self.trackers:
            t.summary(values)

    def images(self, paths: Mapping[str, str]) -> None:
        for t in self.trackers:
            t.images(paths)

    def table(self, name: str, rows: Sequence[Mapping[str, Any]]) -> None:
        for t in self.trackers:
            t.table(name, rows)

    def finish(self) -> None:
        errors = []
        for t in self.trackers:
            try:
                t.finish()
            except Exception as exc:  # noqa: BLE001 - report after finishing the others
                errors.append(exc)
        if errors:
            raise errors[0]
