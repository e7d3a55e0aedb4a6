"""Puts the repository's ``experiments/`` folder on Hydra's config search path.

``experiments/`` is a config root holding the ``experiment``, ``scale`` and ``variant``
groups that ``conf/config.yaml`` lists in its defaults. A search-path entry in
``config.yaml`` itself (``hydra.searchpath: [file://experiments]``) would be resolved
against the working directory, and ``pkg://`` only reaches inside Python packages; this
plugin (found by Hydra in the ``hydra_plugins`` namespace package, for ``python -m
kaedit.run`` and for ``hydra.compose`` alike) locates the folder from its own file, so the
experiments compose from any working directory.
"""

from __future__ import annotations

from pathlib import Path

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin

#: src/hydra_plugins/kaedit_searchpath/ -> the repository root.
EXPERIMENTS = Path(__file__).resolve().parents[3] / "experiments"


class KaeditExperimentsSearchPath(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        if EXPERIMENTS.is_dir():  # absent in a wheel install (conf/ is too)
            search_path.append(provider="kaedit-experiments", path=f"file://{EXPERIMENTS}")
