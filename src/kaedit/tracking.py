"""Experiment trackers with one interface: W&B, local CSV files, or nothing.

``conf/logger/*.yaml`` lists the trackers of a run; the runner instantiates each with
``run_dir`` and the resolved ``config`` and fans calls out through :class:`Trackers`, so
no code anywhere branches on whether W&B is on.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from kaedit.errors import ConfigError
from kaedit.files import CsvRows, atomic_write

log = logging.getLogger(__name__)


class Tracker(Protocol):
    """Constructed with ``run_dir``, ``run_config`` and ``resume`` (what ``state()``
    returned when the run was checkpointed, or None for a fresh run)."""

    def log(self, row: Mapping[str, Any], step: int) -> None: ...

    def state(self) -> dict[str, Any]: ...

    def summary(self, values: Mapping[str, Any]) -> None: ...

    def images(self, paths: Mapping[str, str]) -> None:
        """Figures already saved as files (``name -> path``)."""

    def table(self, name: str, path: str | Path) -> None:
        """A table already saved as a CSV file (e.g. ``retention.csv``), of any length."""

    def files(self, name: str, paths: Sequence[str | Path]) -> None:
        """Outputs saved as files (final deltas, figures), for trackers that keep them."""

    def finish(self) -> None: ...


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

    def table(self, name: str, path: str | Path) -> None:
        return None  # written by the runner as the rows came (retention.csv)

    def files(self, name: str, paths: Sequence[str | Path]) -> None:
        return None  # in the run directory already

    def finish(self) -> None:
        return None


#: The x-axis of every W&B metric (issue 18): runs with batches of 1, 10 or 100 edits
#: share one curve axis; the step index stays a metric (``step``).
X_AXIS = "edits_done"
#: ``run_dir/wandb/<this>``: the last step the run's W&B segments logged.
LOGGED_STEP = "kaedit-logged-step"


class WandbTracker:
    """A W&B run saved under ``run_dir/wandb`` (offline by default; ``wandb sync`` later).

    Every metric is plotted against :data:`X_AXIS`. A resumed run (``resume`` holds the
    run id) opens a new segment of the same run (offline: a new ``offline-run-*-ID``
    directory) and skips the steps an earlier segment logged already (the runner redoes
    the steps after its checkpoint): synced together, the segments never repeat a step.
    Tables are logged as file artifacts, so no row is cut (``wandb.Table`` keeps
    ``wandb.Table.MAX_ROWS`` = 10,000 rows); one that fits is shown as a table too.
    ``log_artifacts``: figures and final deltas are logged as artifacts as well.
    ``console``: W&B's console capture (``wrap``: the log lines go to the run's
    ``output.log``; ``off``: none).
    """

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
        job_type: str | None = None,
        console: str = "off",
        log_artifacts: bool = False,
        resume: Mapping[str, Any] | None = None,
    ) -> None:
        import wandb

        valid = ("offline", "online", "disabled")
        if mode not in valid:
            raise ConfigError(f"logger.wandb.mode={mode!r} is not one of {valid}")
        consoles = ("off", "wrap", "redirect", "auto")
        if console not in consoles:
            raise ConfigError(f"logger.wandb.console={console!r} is not one of {consoles}")
        run_id = (resume or {}).get("run_id")
        self.run = wandb.init(
            project=project, entity=entity, mode=mode, group=group, tags=list(tags) or None,
            name=name, id=run_id, resume="allow" if run_id else None, dir=str(Path(run_dir)),
            job_type=job_type, config=dict(run_config or {}),
            settings=wandb.Settings(silent=True, console=console),
            reinit="finish_previous",
        )
        self.run_id = self.run.id
        self.log_artifacts = bool(log_artifacts)
        self.run.define_metric(X_AXIS)
        self.run.define_metric("*", step_metric=X_AXIS)
        self.step_file = Path(run_dir) / "wandb" / LOGGED_STEP
        self.logged_step = (int(self.step_file.read_text())
                            if run_id and self.step_file.is_file() else -1)
        log.info("W&B run %s (%s) in %s", self.run.id, mode, self.run.dir)

    def log(self, row: Mapping[str, Any], step: int) -> None:
        if step <= self.logged_step:  # an earlier segment of this run logged it
            return
        self.run.log(dict(row), step=step)
        self.logged_step = step
        atomic_write(self.step_file, f"{step}\n")

    def state(self) -> dict[str, Any]:
        return {"run_id": self.run_id}

    def summary(self, values: Mapping[str, Any]) -> None:
        for k, v in values.items():
            self.run.summary[k] = v

    def images(self, paths: Mapping[str, str]) -> None:
        import wandb

        self.run.log({k: wandb.Image(str(p)) for k, p in paths.items()})
        self.files("figures", list(paths.values()))

    def table(self, name: str, path: str | Path) -> None:
        import pandas as pd
        import wandb

        path = Path(path)
        if not path.is_file():
            return
        self._artifact(name, "table", [path])
        with path.open() as f:
            n_rows = sum(1 for _ in f) - 1  # without reading a long table into memory
        if n_rows <= wandb.Table.MAX_ROWS:  # also browsable in the run's page
            self.run.summary[name] = wandb.Table(dataframe=pd.read_csv(path))

    def files(self, name: str, paths: Sequence[str | Path]) -> None:
        if self.log_artifacts and paths:
            self._artifact(name, name, paths)

    def _artifact(self, name: str, kind: str, paths: Sequence[str | Path]) -> None:
        import wandb

        artifact = wandb.Artifact(f"{name}-{self.run.id}", type=kind)
        for p in paths:
            artifact.add_file(str(p), name=Path(p).name)
        self.run.log_artifact(artifact)

    def finish(self) -> None:
        self.run.finish()


class Trackers:
    """Fan-out to several trackers: every call reaches every tracker, in the order the
    config lists them (``csv`` first: ``summary.json`` is written before W&B is called),
    even if one fails; the first error is raised after the others ran."""

    def __init__(self, trackers: Iterable[Tracker]) -> None:
        self.trackers = list(trackers)

    def _each(self, method: str, *args: Any) -> None:
        errors = []
        for t in self.trackers:
            try:
                getattr(t, method)(*args)
            except Exception as exc:  # report after calling the others
                log.error("%s.%s failed: %s", type(t).__name__, method, exc)
                errors.append(exc)
        if errors:
            raise errors[0]

    def log(self, row: Mapping[str, Any], step: int) -> None:
        self._each("log", row, step)

    def summary(self, values: Mapping[str, Any]) -> None:
        self._each("summary", values)

    def images(self, paths: Mapping[str, str]) -> None:
        self._each("images", paths)

    def table(self, name: str, path: str | Path) -> None:
        self._each("table", name, path)

    def files(self, name: str, paths: Sequence[str | Path]) -> None:
        self._each("files", name, paths)

    def finish(self) -> None:
        self._each("finish")


def _duration(seconds: float) -> str:
    h, rest = divmod(round(seconds), 3600)
    return f"{h}h{rest // 60:02d}m" if h else f"{rest // 60}m{rest % 60:02d}s"


def progress_line(step: int, n_steps: int, n_done: int, row: Mapping[str, Any],
                  s_per_step: float) -> str:
    """One log line per step, for runs without a terminal (Slurm, joblib, nohup): step,
    edits made, the last evaluated seen metrics (named with their step, ``row["step"]``,
    when that is an earlier one: a step the schedule does not evaluate), seconds per step
    and the time left."""
    seen = " ".join(f"{k.split('/', 1)[1]} {row[k]:.1f}" for k in
                    ("seen/efficacy", "seen/generalization", "seen/specificity", "seen/score")
                    if isinstance(row.get(k), (int, float)))
    at = row.get("step")
    label = "seen" if at is None or at == step or not seen else f"seen at step {at}"
    return (f"step {step}/{n_steps} | edits {n_done} | {label}: {seen or '-'} | "
            f"{s_per_step:.2f} s/step | ETA {_duration(s_per_step * (n_steps - step))}")
