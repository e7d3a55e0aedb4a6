"""``python -m kaedit.train_mend [overrides]``: train a MEND editor, save it, edit with it.

Composes ``conf/train_mend.yaml`` (the ``model`` and ``dataset`` groups of the runner) and
calls :func:`train`. Then ``python -m kaedit.run method=mend method.checkpoint=PATH``
edits with the editor (``conf/method/mend.yaml`` defaults to the same PATH).

**Records.** The editor is trained on the *last* ``train.records`` records of the dataset;
the first ``train.val_records`` of those are held out to validate it (edited, never trained
on). The runner edits records ``schedule.start`` .. ``start + n_edits − 1`` from the
*front*, so with the defaults (CounterFact's 2,180 records: validation 1,580..1,599,
training 1,600..2,179; runs 0..99) the two never overlap; the checkpoint lists the
case_ids it was trained on and ``method=mend`` warns when it is asked to edit one of them.

**One training step** (MEND's training loop), on a batch of ``train.batch_size`` records:

1. the gradient factors (u, δ) of Σ NLL(new object | rewrite prompt) at the edited weights,
   with the unedited model's next-token distributions on locality prompts from the same
   forward pass (the records' neighbourhood prompts: other subjects, same relation);
2. Δ = editor(u, δ) (differentiable in the editor's parameters);
3. with W + Δ substituted: L_edit = mean token-averaged NLL of the new object on the
   rewrite prompt and ``train.paraphrases`` paraphrases per record, and L_loc = KL(p_W ‖
   p_W+Δ) averaged over every token of the locality prompts;
4. one Adam step on ``c_edit · L_edit + c_loc · L_loc`` (MEND's weighting: c_edit = 0.1,
   c_loc = 1), editor networks at ``train.lr``, the per-weight step sizes log α at
   ``train.lr_lr``; gradient norm clipped at ``train.grad_clip``.

Before the first step the inputs' normalisation statistics are estimated on
``train.stat_batches`` batches of training edits and then kept fixed (MEND updates
running statistics while training). Bad input ends the process with one line, exit 2;
a failure while training keeps its traceback (exit 1).
"""

from __future__ import annotations

import csv
import logging
import math
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import hydra
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from kaedit.errors import ConfigError, user_errors_exit
from kaedit.paths import CONF_DIR
from kaedit.records import EditRequest

log = logging.getLogger("kaedit")


@dataclass(frozen=True)
class TrainConfig:
    """``train.*`` of ``conf/train_mend.yaml``; the defaults are that file's values (a test
    checks they agree), so code that builds one without the config trains the same way."""

    #: The last this-many records of the dataset are MEND's (validation + training).
    records: int = 600
    #: The first this-many of those are held out for validation.
    val_records: int = 20
    steps: int = 80
    #: Stop earlier once this much wall time has passed (None: run all steps).
    max_minutes: float | None = None
    batch_size: int = 10
    #: Paraphrases per record in the edit loss (besides the rewrite prompt).
    paraphrases: int = 1
    #: Neighbourhood prompts per record in the locality loss.
    loc_prompts: int = 1
    lr: float = 3e-3
    lr_lr: float = 1e-2
    c_edit: float = 0.1
    c_loc: float = 1.0
    grad_clip: float = 100.0
    stat_batches: int = 10
    #: Validate every this many steps (0: before and after training only).
    val_every: int = 0
    log_every: int = 10

    def __post_init__(self) -> None:
        positive = ("records", "steps", "batch_size", "stat_batches")
        for name in positive:
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"train.{name}={getattr(self, name)} must be >= 1")
        for name in ("val_records", "paraphrases", "loc_prompts", "val_every"):
            if int(getattr(self, name)) < 0:
                raise ConfigError(f"train.{name}={getattr(self, name)} must be >= 0")
        for name in ("lr", "lr_lr", "grad_clip", "c_edit"):
            if not float(getattr(self, name)) > 0:
                raise ConfigError(f"train.{name}={getattr(self, name)} must be > 0")
        if not float(self.c_loc) >= 0:
            raise ConfigError(f"train.c_loc={self.c_loc} must be >= 0")
        if self.max_minutes is not None and not float(self.max_minutes) > 0:
            raise ConfigError(f"train.max_minutes={self.max_minutes} must be > 0 or null")
        if int(self.log_every) < 1:
            raise ConfigError(f"train.log_every={self.log_every} must be >= 1")


def train_config(node: Any) -> TrainConfig:
    """``cfg.train`` as a :class:`TrainConfig` (an unknown key is a ConfigError)."""
    values = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node
    unknown = sorted(set(values) - set(TrainConfig.__dataclass_fields__))
    if unknown:
        raise ConfigError(f"unknown train settings {unknown}; valid: "
                          f"{sorted(TrainConfig.__dataclass_fields__)}")
    return TrainConfig(**values)


def split(n_available: int, records: int, val_records: int) -> tuple[range, range]:
    """(validation, training) index ranges: the last ``records`` of ``n_available``."""
    if records > n_available:
        raise ConfigError(
            f"train.records={records} is more than the dataset's {n_available} records"
        )
    if val_records >= records:
        raise ConfigError(
            f"train.val_records={val_records} must be less than "
            f"train.records={records} (the rest is trained on)"
        )
    start = n_available - records
    return range(start, start + val_records), range(start + val_records, n_available)


def locality_prompts(
    batch: Sequence[EditRequest], per_record: int, rng: random.Random
) -> list[str]:
    """``per_record`` neighbourhood prompts of each record (fewer if it has fewer); a
    record without any lends the next record's rewrite prompt (another subject)."""
    out = []
    for i, r in enumerate(batch):
        pool = list(r.neighborhood_prompts)
        if not pool and len(batch) > 1:
            pool = [batch[(i + 1) % len(batch)].rewrite_prompt]
        out += rng.sample(pool, min(per_record, len(pool)))
    return out


def step_losses(
    lm,
    editor,
    names: Sequence[str],
    batch: Sequence[EditRequest],
    tc: TrainConfig,
    rng: random.Random,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(L_edit, L_loc) of one batch, differentiable in the editor's parameters."""
    from kaedit.methods.mend import forward, gradient_factors
    from kaedit.tokens import TeacherForced
    from kaedit.weights import parameters

    edit = [(r.rewrite_prompt, r.target_new) for r in batch]
    loc = locality_prompts(batch, int(tc.loc_prompts), rng)
    rows_a = TeacherForced.build(lm, edit, loc)
    factors, hidden_a = gradient_factors(lm, names, rows_a)
    with torch.no_grad():
        base = rows_a.plain_logp(lm, hidden_a) if loc else None  # unedited, [P, V]
    deltas = editor.deltas(factors)
    params = parameters(lm.model, names)
    weights = {n: (params[n].detach() + deltas[n]).to(params[n].dtype) for n in names}
    para = [
        (p, r.target_new)
        for r in batch
        for p in rng.sample(
            list(r.paraphrase_prompts), min(int(tc.paraphrases), len(r.paraphrase_prompts))
        )
    ]
    # The same rows with W + Δ, and the paraphrases in a pass of their own (so that the
    # short rows are not padded to the paraphrases' length).
    hidden_b, _ = forward(lm, rows_a, weights)
    nll = [rows_a.forced_nll(lm, hidden_b)]
    if para:
        rows_p = TeacherForced.build(lm, para)
        nll.append(rows_p.forced_nll(lm, forward(lm, rows_p, weights)[0]))
    l_edit = torch.cat(nll).mean()
    if base is None:
        return l_edit, torch.zeros((), device=l_edit.device)
    # KL(p_W ‖ p_W+Δ) per locality token, averaged ("batchmean" over the [P, V] rows).
    l_loc = F.kl_div(rows_a.plain_logp(lm, hidden_b), base, log_target=True, reduction="batchmean")
    return l_edit, l_loc


def validate(
    lm, editor, names: Sequence[str], records: Sequence[EditRequest], batch_size: int
) -> dict[str, float]:
    """CounterFact metrics (x100) of ``records`` edited in batches of ``batch_size``, each
    batch from the unedited model; ``editor=None`` scores the unedited model."""
    from kaedit.evaluate import CounterFactEval, Scorer, aggregate
    from kaedit.methods.mend import edit_factors
    from kaedit.tokens import chunks
    from kaedit.weights import applied

    if not records:
        return {}
    scorer, evaluator = Scorer(lm), CounterFactEval()
    parts: list[dict] = []
    for sl in chunks(len(records), batch_size):
        batch = list(records[sl])
        deltas = {}
        if editor is not None:
            with torch.no_grad():
                deltas = editor.deltas(edit_factors(lm, names, batch))
        with applied(lm.model, deltas):
            parts.append(evaluator(scorer, batch))
    import numpy as np

    merged = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    row = aggregate(merged, "val")
    return {k.removeprefix("val/"): round(v, 2) for k, v in row.items() if not k.endswith("_mag")}


def train(cfg: DictConfig, run_dir: str | None = None) -> dict[str, Any]:
    """Train an editor as ``cfg`` says, save it to ``cfg.output``; returns the summary."""
    from kaedit.methods.mend import (
        EditorSpec,
        MendEditor,
        edit_factors,
        edited_weights,
        save_editor,
    )
    from kaedit.models import LoadedModel
    from kaedit.setup import build_model, build_records, resolve_data_root

    cfg = cfg.copy()
    resolve_data_root(cfg)
    seed = int(cfg.seed)
    tc = train_config(cfg.train)
    if cfg.get("threads") is not None:
        torch.set_num_threads(int(cfg.threads))
    output = Path(str(cfg.output)).expanduser()
    if output.suffix != ".safetensors":
        raise ConfigError(f"output={str(output)!r} must end in .safetensors")

    # 1. data: fail on bad input before the model is loaded
    records = build_records(cfg)
    val_idx, train_idx = split(len(records), int(tc.records), int(tc.val_records))
    val = [records[i] for i in val_idx]
    pool = [records[i] for i in train_idx]
    if len(pool) < tc.batch_size:
        raise ConfigError(
            f"train.batch_size={tc.batch_size} is more than the {len(pool)} training records"
        )
    log.info(
        "MEND training records %d..%d (%d), validation %s of %d records",
        train_idx.start,
        train_idx.stop - 1,
        len(pool),
        f"{val_idx.start}..{val_idx.stop - 1}" if val else "none",
        len(records),
    )

    # 2. model and editor
    lm: LoadedModel = build_model(cfg)
    ed = OmegaConf.to_container(cfg.editor, resolve=True)
    names = edited_weights(lm, ed.pop("layers"), ed.pop("kinds"))
    spec = EditorSpec.for_model(lm, names, **ed)
    editor = MendEditor(spec, seed=seed).to(lm.device)
    rng = random.Random(seed)
    torch.manual_seed(seed)

    order: list[int] = []

    def next_batch() -> list[EditRequest]:
        nonlocal order
        if len(order) < tc.batch_size:  # a new epoch: reshuffle
            order = list(range(len(pool)))
            rng.shuffle(order)
        taken, order = order[: tc.batch_size], order[tc.batch_size :]
        return [pool[i] for i in taken]

    # 3. normalisation statistics of the factors, from training edits
    t0 = time.perf_counter()
    stats_rng = random.Random(seed + 1)
    stat_batches = [stats_rng.sample(pool, tc.batch_size) for _ in range(tc.stat_batches)]
    n_tok = editor.set_normalisation(edit_factors(lm, names, b) for b in stat_batches)
    log.info(
        "normalisation from %d tokens of %d edits (%.1f s)",
        n_tok,
        tc.stat_batches * tc.batch_size,
        time.perf_counter() - t0,
    )

    history: list[dict[str, Any]] = []
    val_unedited = validate(lm, None, names, val, tc.batch_size)
    val_before = validate(lm, editor, names, val, tc.batch_size)
    log.info("validation unedited %s | identity editor %s", val_unedited, val_before)

    # 4. training
    net_params = [p for k, p in editor.named_parameters() if k != "log_lr"]
    opt = torch.optim.Adam(
        [{"params": net_params, "lr": tc.lr}, {"params": [editor.log_lr], "lr": tc.lr_lr}]
    )
    start = time.perf_counter()
    steps_done, stopped_early = 0, False
    for step in range(1, tc.steps + 1):
        if tc.max_minutes is not None and time.perf_counter() - start > 60 * tc.max_minutes:
            stopped_early = True
            log.info("train.max_minutes=%s reached after %d steps", tc.max_minutes, step - 1)
            break
        l_edit, l_loc = step_losses(lm, editor, names, next_batch(), tc, rng)
        loss = tc.c_edit * l_edit + tc.c_loc * l_loc
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"MEND training loss is {float(loss)} at step {step}; "
                "lower train.lr / editor.init_lr"
            )
        opt.zero_grad()
        loss.backward()
        gnorm = float(torch.nn.utils.clip_grad_norm_(editor.parameters(), tc.grad_clip))
        opt.step()
        steps_done = step
        row: dict[str, Any] = {
            "step": step,
            "loss": loss.item(),
            "edit_nll": l_edit.item(),
            "loc_kl": l_loc.item(),
            "grad_norm": gnorm,
            "mean_lr": float(editor.log_lr.detach().exp().mean()),
            "seconds": round(time.perf_counter() - start, 2),
        }
        if tc.val_every and step % tc.val_every == 0 and step < tc.steps:
            row.update(
                {f"val_{k}": v for k, v in validate(lm, editor, names, val, tc.batch_size).items()}
            )
        history.append(row)
        if step % tc.log_every == 0 or step == 1 or "val_efficacy" in row:
            log.info(
                "step %d  loss %.4f  edit NLL %.3f  loc KL %.4f  α %.2e  %.0f s%s",
                step,
                row["loss"],
                row["edit_nll"],
                row["loc_kl"],
                row["mean_lr"],
                row["seconds"],
                "  val " + str({k[4:]: v for k, v in row.items() if k.startswith("val_")})
                if "val_efficacy" in row
                else "",
            )
    train_s = time.perf_counter() - start
    val_after = validate(lm, editor, names, val, tc.batch_size)
    log.info(
        "validation after %d steps (%.0f s): %s (unedited %s)",
        steps_done,
        train_s,
        val_after,
        val_unedited,
    )

    # 5. save
    summary = {
        "steps": steps_done,
        "stopped_early": stopped_early,
        "train_s": round(train_s, 1),
        "val_unedited": val_unedited,
        "val_identity_editor": val_before,
        "val_trained": val_after,
        "final": {k: history[-1][k] for k in ("loss", "edit_nll", "loc_kl")} if history else {},
    }
    extra = {
        "seed": seed,
        "train": asdict(tc),
        "dataset": {
            "name": str(cfg.dataset.name),
            "n_records": len(records),
            "validation_indices": [val_idx.start, val_idx.stop],
            "training_indices": [train_idx.start, train_idx.stop],
        },
        "summary": summary,
        "lr_per_weight": dict(zip(names, editor.log_lr.exp().tolist(), strict=True)),
        "trained_on_case_ids": [r.case_id for r in pool],
        "validation_case_ids": [r.case_id for r in val],
    }
    save_editor(editor, output, lm, extra)
    if run_dir is not None and history:
        path = Path(run_dir) / "train_log.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        keys = list(dict.fromkeys(k for row in history for k in row))
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            writer.writerows(history)
    log.info(
        "saved MEND editor to %s (+ %s); edit with `python -m kaedit.run method=mend "
        "method.checkpoint=%s`",
        output,
        output.with_suffix(".json").name,
        output,
    )
    return {"checkpoint": str(output), **summary}


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train_mend")
def main(cfg: DictConfig) -> float | None:
    from hydra.core.hydra_config import HydraConfig

    with user_errors_exit(log):
        summary = train(cfg, run_dir=HydraConfig.get().runtime.output_dir)
    value = summary["val_trained"].get("efficacy")
    return float(value) if value is not None and math.isfinite(value) else None


if __name__ == "__main__":
    main()
