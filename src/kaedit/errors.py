"""Bad input, and how entry points report it. Imports nothing from kaedit.

The error policy is by phase:

* **build** (config, data, schedule, model, statistics, method, fusion, trackers): bad
  input is recognised where it is built and raised as :class:`ConfigError` (or one of its
  subclasses: ``DatasetError``, ``ModelLoadError``, ``ScheduleError``, ``CorpusError``);
  :func:`kaedit.setup.build` turns the ``ValueError`` a constructor raises for a bad
  config value (``fusion.p=1.5``) into a ``ConfigError``. An entry point wrapped in
  :func:`user_errors_exit` reports it in one line and exits with status 2.
* **loop** (the steps of a run): nothing is converted. Any other exception -- a
  ``ValueError`` from torch hours into a run -- keeps its traceback and ends the process
  with status 1 (Hydra's report of a failed job); the run's last checkpoint is untouched,
  so ``resume=RUN_DIR`` continues from it.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

#: The exit status of bad input (any other failure exits with 1).
EXIT_BAD_INPUT = 2


class ConfigError(ValueError):
    """Bad input: a config value out of range or inconsistent with another, a missing or
    malformed file. The message names the value and the valid options."""


@contextmanager
def user_errors_exit(log: logging.Logger) -> Iterator[None]:
    """For entry points: a :class:`ConfigError` ends the process with one error line and
    exit status 2 (``HYDRA_FULL_ERROR=1`` re-raises it, with the traceback). Every other
    exception passes through with its traceback."""
    try:
        yield
    except ConfigError as exc:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        log.error("%s: %s", type(exc).__name__, exc)
        sys.exit(EXIT_BAD_INPUT)
