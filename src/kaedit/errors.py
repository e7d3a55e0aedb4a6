"""Errors caused by the user's input: reported as one line, exit status 2."""

from __future__ import annotations

from kaedit.data import DatasetError
from kaedit.models import ModelLoadError
from kaedit.schedule import ScheduleError
from kaedit.stats import CorpusError


class ConfigError(ValueError):
    """A config value is out of range or inconsistent with another."""


USER_ERRORS: tuple[type[BaseException], ...] = (
    ConfigError, DatasetError, ModelLoadError, ScheduleError, CorpusError,
)
