"""Names of a sweep's job folders and W&B group: pure functions, no kaedit imports.

Used by the entry points (``kaedit.run``, ``kaedit.setup.compose``) before a config is
composed, and by :mod:`kaedit.results.sweep` after the sweep: one place, no import
cycle.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

from omegaconf import OmegaConf

#: Longest override part of a job folder's name (file names stop at 255 bytes).
MAX_NAME = 120


def job_dir_name(num: Any, override_dirname: str) -> str:
    """``NUM_OVERRIDES``: Hydra's ``override_dirname`` with every character that is not
    safe in a file name (``/``, spaces, quotes, brackets) replaced by ``_``, cut to
    :data:`MAX_NAME` characters with a hash of the whole when longer; ``NUM`` alone when
    nothing is overridden. The job number keeps names unique and in launch order."""
    safe = re.sub(r"[^A-Za-z0-9._=,+-]", "_", str(override_dirname))
    if len(safe) > MAX_NAME:
        digest = hashlib.sha256(str(override_dirname).encode()).hexdigest()[:8]
        safe = f"{safe[: MAX_NAME - 9]}-{digest}"
    return f"{num}_{safe}" if safe else str(num)


def register_resolver() -> None:
    """``${kaedit.job_dir:NUM,OVERRIDE_DIRNAME}`` (``hydra.sweep.subdir``); idempotent."""
    OmegaConf.register_new_resolver("kaedit.job_dir", job_dir_name, replace=True)


def sweep_group(sweep_dir: str) -> str:
    """The W&B group of a sweep: its output directory (≤ 128 characters, W&B's limit)."""
    group = str(sweep_dir).rstrip("/")
    if len(group) > 128:
        digest = hashlib.sha256(group.encode()).hexdigest()[:12]
        group = f"{group[-(127 - len(digest)):]}-{digest}"
    return group
