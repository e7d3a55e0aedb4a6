"""``python -m kaedit.export RUN_DIR --out DIR [--step N]``: a run's edited model as a
Hugging Face folder.

The folder (``model.safetensors``, ``config.json``, the tokenizer) loads with plain
``transformers.AutoModelForCausalLM.from_pretrained(DIR)``, so lm-eval-harness, vLLM or
llama.cpp's converter can use it. Its weights are the ones the run *serves* at the chosen
checkpoint: W₀ (loaded by :func:`kaedit.setup.build_session` from the run's own
``config.yaml``) plus the float32 sum of the applied deltas plus the fusion's served
offset (Lookahead's slow weights, WiSE-FT's interpolation; nothing for the other fusions),
computed exactly as the runner's :meth:`~kaedit.weights.EditedWeights.serving` does.
Every other tensor is W₀.

Where the weights come from:

* no ``--step``: the run's latest checkpoint (``checkpoint/latest.json``), else its
  ``deltas.safetensors`` (written at the end with ``save_deltas=true``, already served);
* ``--step N``: the latest checkpoint if it is at step N, else a replay of the steps'
  deltas as the method computed them (``deltas/step-NNNN.safetensors``, written with
  ``save_step_deltas=true``) through the run's fusion as a step applies it (bound to the
  edited weights, with the method's fused constraint: :func:`~kaedit.experiment.step_fusion`)
  and its guard -- fusion and guard are deterministic given the run's fusion seed
  (``fusion.seed`` or ``seed``; :func:`~kaedit.experiment.fuse_step`), so the replay
  reproduces the run's weights. The replay builds the run's method on the unedited model
  (its statistics, from the cache).

Bad input (no such run, no such step, an existing non-empty ``--out``) is one error line
and exit status 2, with nothing written.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from omegaconf import DictConfig, OmegaConf

from kaedit.errors import ConfigError, user_errors_exit
from kaedit.models import LoadedModel
from kaedit.records import Deltas

if TYPE_CHECKING:
    from kaedit.setup import Session

log = logging.getLogger("kaedit.export")


def _config(run_dir: Path) -> DictConfig:
    path = run_dir / "config.yaml"  # the runner's resolved config (kaedit.experiment.run)
    if not run_dir.is_dir():
        raise ConfigError(f"RUN_DIR {str(run_dir)!r} is not a directory")
    if not path.is_file():
        raise ConfigError(f"RUN_DIR {str(run_dir)!r} has no config.yaml: not a kaedit run "
                          "directory (python -m kaedit.run writes one)")
    return OmegaConf.load(path)


def _replay(session: Session, run_dir: Path, step: int) -> Deltas:
    """Replay steps 1..``step`` from the saved per-step deltas onto ``session.edits`` (each
    step's deltas through the run's fusion as a step applies it,
    :func:`~kaedit.experiment.step_fusion`: the weights RECT and PRUNE read, AlphaEdit's
    ``project_fused``; then the guard) and return the fusion's served offset then."""
    from safetensors.torch import load_file

    from kaedit.experiment import fuse_step, step_fusion
    from kaedit.weights import delta_problem

    files = [run_dir / "deltas" / f"step-{t:04d}.safetensors" for t in range(1, step + 1)]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise ConfigError(f"--step {step}: the run has no checkpoint at that step and no "
                          f"saved step deltas {missing[:3]} to replay (run with "
                          "save_step_deltas=true to export any step)")
    cfg, state = session.cfg, session.fusion.init_state()
    for t, f in enumerate(files, start=1):
        fusion = step_fusion(session.method, session.ctx, session.fusion, session.edits)
        nxt, fused = fuse_step(fusion, state, load_file(str(f)), session.fusion_seed, t)
        if delta_problem(fused, cfg.guard.max_delta_norm) is None:  # as the runner's guard
            session.edits.add(fused)
            state = nxt
    return session.fusion.served_offset(state)


def _served(total: Deltas, offset: Deltas) -> Deltas:
    """total + offset, per weight (the argument of ``EditedWeights.serving``)."""
    return {n: total.get(n, 0) + offset.get(n, 0) for n in {*total, *offset}}


def served_deltas(run_dir: str | Path, step: int | None = None) -> tuple[DictConfig, Deltas, int]:
    """(the run's config, W_served − W₀ per edited weight, the step) of a run directory."""
    from safetensors.torch import load_file

    from kaedit import checkpoint
    from kaedit.fusion import FusionState
    from kaedit.setup import build_fusion

    run_dir = Path(run_dir)
    cfg = _config(run_dir)
    ckpt = checkpoint.load(run_dir)
    if ckpt is not None and step in (None, ckpt.state.step):
        fusion = build_fusion(cfg)
        state = (FusionState.from_flat(ckpt.fusion_state) if ckpt.fusion_state
                 else fusion.init_state())
        return cfg, _served(ckpt.deltas, fusion.served_offset(state)), ckpt.state.step
    if step is None:
        final = run_dir / "deltas.safetensors"
        if not final.is_file():
            raise ConfigError(f"RUN_DIR {str(run_dir)!r} has neither a checkpoint nor "
                              "deltas.safetensors (run with schedule.checkpoint_every > 0 or "
                              "save_deltas=true)")
        import json

        summary = run_dir / "summary.json"
        steps = json.loads(summary.read_text())["steps"] if summary.is_file() else -1
        return cfg, load_file(str(final)), int(steps)
    if step < 0:
        raise ConfigError(f"--step {step} must be >= 0")
    session = replay_session(cfg)
    offset = _replay(session, run_dir, step)
    return cfg, _served(session.edits.total, offset), step


def replay_session(cfg: DictConfig) -> Session:
    """The run's session with its method prepared on the unedited model (a replay applies
    the method's ``fused_constraint``); no records."""
    from kaedit.setup import build_session

    return build_session(cfg, plan=False)


def _needs_replay(run_dir: Path, step: int | None) -> bool:
    from kaedit import checkpoint

    ckpt = checkpoint.load(run_dir)
    return step is not None and step >= 0 and (ckpt is None or step != ckpt.state.step)


def save_model(lm: LoadedModel, out: str | Path) -> Path:
    """Write ``lm`` (as its weights are now) to ``out`` as a Hugging Face folder; ``out``
    must not exist or be empty. Written to a temporary folder, then renamed into place."""
    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out {str(out)!r} exists and is not an empty directory")
    model = lm.model
    # A model loaded from a GGUF file carries quantization markers that make
    # save_pretrained refuse; its weights are plain dequantized floats (models.load_gguf).
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-"))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        lm.tokenizer.save_pretrained(tmp)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def export(run_dir: str | Path, out: str | Path, step: int | None = None) -> Path:
    """Export the weights ``run_dir`` serves at ``step`` (None: its latest) to ``out``."""
    from kaedit.setup import build_session

    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out {str(out)!r} exists and is not an empty directory")
    run_dir = Path(run_dir)
    if _needs_replay(run_dir, step):
        # the replay's own session: its edits hold W₀ + total; adding the offset makes
        # W₀ + (total + offset), as the runner serves it
        cfg, at = _config(run_dir), int(step)
        session = replay_session(cfg)
        served = _replay(session, run_dir, at)
        session.edits.add(served)
    else:
        cfg, served, at = served_deltas(run_dir, step)
        # the run's session, model and fusion only (no records, templates or method)
        session = build_session(cfg, plan=False, templates=False, method=False)
        session.edits.add(served)  # W₀ + (total + offset), as the runner serves it
    save_model(session.lm, out)
    log.info("exported %s at step %d (%d edited weights) to %s", run_dir, at, len(served), out)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m kaedit.export", description=__doc__.split(
        "\n\n")[0])
    parser.add_argument("run_dir", help="a run directory of python -m kaedit.run")
    parser.add_argument("--out", required=True, help="the folder to write (new or empty)")
    parser.add_argument("--step", type=int, default=None,
                        help="the step to export (default: the latest checkpoint)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s")
    with user_errors_exit(log):
        export(args.run_dir, args.out, args.step)


if __name__ == "__main__":
    main(sys.argv[1:])
