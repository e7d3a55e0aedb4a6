"""Errors caused by the user's input: reported as one line, exit status 2."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from kaedit.data import DatasetError
from kaedit.models import ModelLoadError
from kaedit.schedule import ScheduleError
from kaedit.stats import CorpusError


class ConfigError(ValueError):
    """A config value is out of range or inconsistent with another."""


#: Bad input: reported as one line. ValueError covers invalid config values checked by
#: constructors (e.g. ``fusion.p=1.5``), which name the value and the valid range.
USER_ERRORS: tuple[type[BaseException], ...] = (
    ConfigError, DatasetError, ModelLoadError, ScheduleError, CorpusError, ValueError,
)


@contextmanager
def user_errors_exit(log: logging.Logger) -> Iterator[None]:
    """For entry points: bad input ends the process with one error line and exit status 2
    (``HYDRA_FULL_ERROR=1`` re-raises it, with the traceback)."""
    try:
        yield
    except USER_ERRORS as exc:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        log.error("%s: %s", type(exc).__name__, exc)
        sys.exit(2)
