"""Atomic checkpoints of a sequential-editing run, and finding the run to resume.

A checkpoint is a folder ``run_dir/checkpoint/step-NNNNNN`` holding

* ``deltas.safetensors`` -- the sum of all applied (fused) deltas of the edited layers,
* ``method.safetensors`` -- the tensors of the method's state (e.g. AlphaEdit's keys),
* ``fusion.safetensors`` -- the tensors of the fusion's state (e.g. Lookahead's deltas
  since the last synchronisation; empty for stateless fusions),
* ``state.json`` -- step, edits done, tracker states (metric rows, W&B run id), retention
  rows, failed steps, the global torch RNG state and the method's and fusion's non-tensor
  state.

It is written to a temporary folder and renamed into place, then ``latest.json`` (itself
written then renamed) is pointed at it; older checkpoints are removed afterwards. A kill
at any moment leaves either the previous or the new checkpoint, never a partial one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from kaedit.records import Deltas
from kaedit.tracking import atomic_write

CKPT_DIR = "checkpoint"
POINTER = "latest.json"


@dataclass
class Checkpoint:
    step: int
    deltas: Deltas
    method_tensors: dict[str, torch.Tensor]
    state: dict[str, Any]
    #: The fusion's state as :meth:`kaedit.fusion.FusionState.flat` gave it ({} if none).
    fusion_state: dict[str, Any] = field(default_factory=dict)


def _split_state(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    rest = {k: v for k, v in state.items() if not isinstance(v, torch.Tensor)}
    return tensors, rest


def save(run_dir: Path, step: int, deltas: Deltas, method_state: dict[str, Any],
         state: dict[str, Any], fusion_state: dict[str, Any] | None = None) -> Path:
    root = Path(run_dir) / CKPT_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=".tmp-"))
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in deltas.items()},
                  str(tmp / "deltas.safetensors"))
        tensors, rest = _split_state(method_state)
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()},
                  str(tmp / "method.safetensors"))
        f_tensors, f_rest = _split_state(fusion_state or {})
        save_file({k: v.detach().contiguous().cpu() for k, v in f_tensors.items()},
                  str(tmp / "fusion.safetensors"))
        full = {**state, "step": step, "method_state": rest, "fusion_state": f_rest,
                "torch_rng": torch.get_rng_state().tolist()}
        (tmp / "state.json").write_text(json.dumps(full))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write(root / POINTER, json.dumps({"step": step, "path": final.name}) + "\n")
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
    state = json.loads((folder / "state.json").read_text())
    method_tensors = load_file(str(folder / "method.safetensors"))
    method_state = {**state.pop("method_state"), **method_tensors}
    fusion_file = folder / "fusion.safetensors"  # absent in checkpoints of older versions
    fusion_state = {**state.pop("fusion_state", {}),
                    **(load_file(str(fusion_file)) if fusion_file.is_file() else {})}
    return Checkpoint(step=int(state["step"]), deltas=load_file(str(folder / "deltas.safetensors")),
                      method_tensors=method_state, state=state, fusion_state=fusion_state)


def restore_rng(state: dict[str, Any]) -> None:
    if "torch_rng" in state:
        torch.set_rng_state(torch.tensor(state["torch_rng"], dtype=torch.uint8))


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
