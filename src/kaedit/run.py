"""``python -m kaedit.run [overrides]``: the only Hydra entry point.

Composes ``conf/config.yaml`` with the command-line overrides and calls
:func:`kaedit.experiment.run`. Bad input (dataset, schedule, model path) ends the process
with one clear error line and exit status 2 (``HYDRA_FULL_ERROR=1`` shows the
traceback); ``--cfg job`` prints the composed config
without loading anything.
"""

from __future__ import annotations

import logging
import os
import sys

import hydra
from omegaconf import DictConfig

log = logging.getLogger("kaedit")


@hydra.main(version_base="1.3", config_path="../../conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    from hydra.core.hydra_config import HydraConfig

    from kaedit.errors import USER_ERRORS
    from kaedit.experiment import run

    try:
        summary = run(cfg, run_dir=HydraConfig.get().runtime.output_dir)
    except USER_ERRORS as exc:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        log.error("%s: %s", type(exc).__name__, exc)
        sys.exit(2)
    value = summary.get(str(cfg.optimized_metric)) if cfg.get("optimized_metric") else None
    return float(value) if value is not None else None


if __name__ == "__main__":
    main()
