"""The run state of a sequential-editing run, its atomic checkpoints, and finding the run
to resume.

A checkpoint is a folder ``run_dir/checkpoint/step-NNNNNN`` holding only what resuming
needs:

* ``deltas.safetensors`` -- the sum of all applied (fused) deltas of the edited layers,
* ``method.safetensors`` -- the tensors of the method's state (e.g. AlphaEdit's keys),
* ``fusion.safetensors`` -- the tensors of the fusion's state (e.g. Lookahead's deltas
  since the last synchronisation; empty for stateless fusions),
* ``state.json`` -- the :class:`RunState` (its fields are the file's keys), the global
  torch RNG state and the method's and fusion's non-tensor state.

The run's history is not in it: metric rows (``metrics.csv``) and retention rows
(``retention.csv``) are appended to their files as they are produced, and the state keeps
how many rows each file had at the checkpoint; a resumed run drops the rows written after
it (they are redone). The consistency references, generated once before the first edit,
are in ``run_dir/references.json``.

A checkpoint is written to a temporary folder and renamed into place, then ``latest.json``
(itself written then renamed) is pointed at it; older checkpoints are removed afterwards.
A kill at any moment leaves either the previous or the new checkpoint, never a partial one.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from kaedit.errors import ConfigError
from kaedit.files import atomic_write
from kaedit.records import Deltas

CKPT_DIR = "checkpoint"
POINTER = "latest.json"
#: Version of ``state.json``'s keys; a checkpoint of another version is not resumed.
FORMAT = 2


@dataclass
class RunState:
    """Where a run stands after a step: everything resuming needs but the tensors."""

    #: Steps done (0: only the unedited model evaluated).
    step: int = 0
    #: Edits made (applied or not) in those steps.
    n_done: int = 0
    #: Steps whose fused deltas were not applied: ``{"step", "reason"}``.
    faults: list[dict[str, Any]] = field(default_factory=list)
    #: The last evaluated row (the summary's metrics when the run ends).
    last_row: dict[str, Any] = field(default_factory=dict)
    #: Each tracker's :meth:`state` by name (CSV: rows written; W&B: the run id).
    trackers: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: Rows of ``retention.csv`` written so far.
    retention_rows: int = 0
    #: Seconds spent evaluating (step 0 included) and in the run overall, summed over
    #: every segment of a resumed run: the summary's ``eval_share`` is their ratio.
    eval_s: float = 0.0
    elapsed_s: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, **dataclasses.asdict(self)}

    @classmethod
    def from_json(cls, saved: dict[str, Any]) -> RunState:
        if saved.get("format") != FORMAT:
            raise ConfigError(
                f"checkpoint format {saved.get('format')!r}: this kaedit resumes format "
                f"{FORMAT} only; start the run again"
            )
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in saved.items() if k in names})


@dataclass
class Checkpoint:
    state: RunState
    deltas: Deltas
    method_state: dict[str, Any]
    #: The fusion's state as :meth:`kaedit.fusion.FusionState.flat` gave it ({} if none).
    fusion_state: dict[str, Any]
    #: The global torch RNG state at the checkpoint (restore with :meth:`restore_rng`).
    torch_rng: list[int]

    def restore_rng(self) -> None:
        torch.set_rng_state(torch.tensor(self.torch_rng, dtype=torch.uint8))


def _split_state(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    rest = {k: v for k, v in state.items() if not isinstance(v, torch.Tensor)}
    return tensors, rest


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path))


def save(run_dir: Path, state: RunState, deltas: Deltas, method_state: dict[str, Any],
         fusion_state: dict[str, Any] | None = None) -> Path:
    """Checkpoint ``state`` (at ``state.step``) with the run's tensors."""
    root = Path(run_dir) / CKPT_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{state.step:06d}"
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=".tmp-"))
    try:
        _save_tensors(deltas, tmp / "deltas.safetensors")
        m_tensors, m_rest = _split_state(method_state)
        _save_tensors(m_tensors, tmp / "method.safetensors")
        f_tensors, f_rest = _split_state(fusion_state or {})
        _save_tensors(f_tensors, tmp / "fusion.safetensors")
        full = {**state.to_json(), "method_state": m_rest, "fusion_state": f_rest,
                "torch_rng": torch.get_rng_state().tolist()}
        (tmp / "state.json").write_text(json.dumps(full))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write(root / POINTER, json.dumps({"step": state.step, "path": final.name}) + "\n")
    for old in root.glob("step-*"):
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load(run_dir: Path) -> Checkpoint | None:
    root = Path(run_dir) / CKPT_DIR
    pointer = root / POINTER
    if not pointer.is_file():
        return None
    folder = root / json.loads(pointer.read_text())["path"]
    saved = json.loads((folder / "state.json").read_text())
    method_state = {**saved.pop("method_state", {}),
                    **load_file(str(folder / "method.safetensors"))}
    fusion_state = {**saved.pop("fusion_state", {}),
                    **load_file(str(folder / "fusion.safetensors"))}
    torch_rng = saved.pop("torch_rng")
    return Checkpoint(state=RunState.from_json(saved),
                      deltas=load_file(str(folder / "deltas.safetensors")),
                      method_state=method_state, fusion_state=fusion_state, torch_rng=torch_rng)


def find_resumable(outputs: Path, fingerprint: str) -> Path | None:
    """The newest run dir under ``outputs`` with a checkpoint, not finished, same config."""
    candidates = []
    for pointer in Path(outputs).glob(f"**/{CKPT_DIR}/{POINTER}"):
        run_dir = pointer.parent.parent
        meta = run_dir / "resume.json"
        if not meta.is_file():
            continue
        info = json.loads(meta.read_text())
        if info.get("fingerprint") == fingerprint and not info.get("done"):
            candidates.append((pointer.stat().st_mtime, run_dir))
    return max(candidates)[1] if candidates else None
