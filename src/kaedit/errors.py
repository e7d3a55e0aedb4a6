"""Errors caused by the user's input: reported as one line, exit status 2."""

from __future__ import annotations

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
