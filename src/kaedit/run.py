"""``python -m kaedit.run [overrides]``: the editing runs' Hydra entry point (the other
two, ``python -m kaedit.trace`` and ``python -m kaedit.train_mend``, compose their own
``conf/trace.yaml`` and ``conf/train_mend.yaml``).

Composes ``conf/config.yaml`` with the command-line overrides and calls
:func:`kaedit.experiment.run`. Bad input (dataset, schedule, model path, a config value),
found while the run's parts are built, ends the process with one clear error line and exit
status 2 (``HYDRA_FULL_ERROR=1`` shows the traceback); an error inside the editing loop
keeps its traceback and exits 1, and ``resume=RUN_DIR`` continues from the last checkpoint
(:mod:`kaedit.errors`). ``--cfg job`` prints the composed config without loading anything.

With ``-m`` every job of a sweep (any launcher: the default local one, ``joblib``,
``slurm``, ``slurm_local``) is its own run directory and W&B run; the jobs of one sweep
share a W&B group (the sweep directory) and are tagged with the chosen method, fusion and
its parameters (:func:`tracking_info`). ``main`` returns the summary's
``optimized_metric`` (default ``seen/score``) for sweepers that optimise it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import hydra
from omegaconf import DictConfig

from kaedit.jobdirs import register_resolver, sweep_group
from kaedit.paths import CONF_DIR

log = logging.getLogger("kaedit")

#: Config-group choices that become W&B tags, in this order.
TAGGED_GROUPS = ("method", "fusion", "experiment", "variant", "scale", "model", "dataset")


def tracking_info(choices: Mapping[str, Any], fusion: Mapping[str, Any]) -> dict[str, Any]:
    """Tags and a run name from the chosen config groups and the fusion's parameters.

    ``choices`` is Hydra's ``runtime.choices`` (group -> option, None when unset);
    ``fusion`` the fusion config node. E.g. ``{"tags": ["method=memit",
    "fusion=drop_rescale", "fusion.p=0.8", ...], "name": "memit/drop_rescale(p=0.8)",
    "choices": {"method": "memit", "fusion": "drop_rescale", ...}}``.
    """
    # unset parameters (fusion.seed: null, the run's seed) are left out of tags and name
    params = {k: v for k, v in fusion.items() if not str(k).startswith("_") and v is not None}
    tags = []
    for g in TAGGED_GROUPS:
        if choices.get(g) is not None:
            tags.append(f"{g}={choices[g]}")
        if g == "fusion":
            tags += [f"fusion.{k}={v}" for k, v in params.items()]
    args = ",".join(f"{k}={v}" for k, v in params.items())
    name = f"{choices.get('method')}/{choices.get('fusion')}" + (f"({args})" if args else "")
    chosen = {g: str(choices[g]) for g in TAGGED_GROUPS if choices.get(g) is not None}
    return {"tags": [t[:64] for t in tags], "name": name,  # W&B: tags of at most 64 chars
            "choices": chosen}


def fill_tracking(cfg: DictConfig) -> None:
    """Fill ``cfg.tracking`` (group, tags, name, choices) from Hydra where the user left it
    empty."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hc = HydraConfig.get()
    info = tracking_info(dict(hc.runtime.choices), cfg.fusion)
    if cfg.tracking.group is None and hc.mode == RunMode.MULTIRUN:
        cfg.tracking.group = sweep_group(hc.sweep.dir)
    if not cfg.tracking.tags:
        cfg.tracking.tags = info["tags"]
    if cfg.tracking.name is None:
        cfg.tracking.name = info["name"]
    if not cfg.tracking.get("choices"):
        cfg.tracking.choices = info["choices"]


register_resolver()  # hydra.sweep.subdir: job folders named by their overrides


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> float | None:
    from hydra.core.hydra_config import HydraConfig

    from kaedit.errors import user_errors_exit
    from kaedit.experiment import run
    from kaedit.setup import check_edit_overrides

    fill_tracking(cfg)
    with user_errors_exit(log):
        check_edit_overrides(cfg, HydraConfig.get().overrides.task)
        summary = run(cfg, run_dir=HydraConfig.get().runtime.output_dir)
    value = summary.get(str(cfg.optimized_metric)) if cfg.get("optimized_metric") else None
    return float(value) if value is not None else None


if __name__ == "__main__":
    main()
