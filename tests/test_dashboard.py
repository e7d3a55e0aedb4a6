"""The KA dashboard as code (issue 18): its panels, x-axis, tables and grouping keys are
exactly keys that a real (tiny) run logs, and it builds into a wandb-workspaces
workspace offline."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf, open_dict

from kaedit.results import dashboard
from kaedit.setup import compose as compose_config
from kaedit.tracking import X_AXIS

RECORDED = "recorded-tables.json"


class TableRecorder:
    """A tracker (``logger.recorder``) that writes the names of the tables it is given
    into its run directory."""

    def __init__(self, run_dir: str, run_config: Any = None, resume: Any = None) -> None:
        self.path = Path(run_dir) / RECORDED
        self.tables: list[str] = []

    def log(self, row: Mapping[str, Any], step: int) -> None: ...
    def state(self) -> dict[str, Any]:
        return {}
    def summary(self, values: Mapping[str, Any]) -> None: ...
    def images(self, paths: Mapping[str, str]) -> None: ...
    def files(self, name: str, paths: Any) -> None: ...

    def table(self, name: str, path: Any) -> None:
        self.tables.append(name)
        self.path.write_text(json.dumps(self.tables))

    def finish(self) -> None: ...


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path,
               tiny_run_overrides: list[str], tiny_rome_dataset: Path) -> Path:
    """A tiny run through ``kaedit.run.main`` (as Hydra calls it: tracking filled), with
    text metrics on: its run directory."""
    from kaedit.run import main

    run_dir = tmp_path_factory.mktemp("dashboard-run")
    cfg = compose_config([f"cache_dir={cache_dir}", *tiny_run_overrides,
                          f"dataset.path='{tiny_rome_dataset}'", "generation.max_new_tokens=4",
                          "schedule.fixed_sample=2",
                          "+logger.recorder._target_=test_dashboard.TableRecorder"],
                         hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(run_dir)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    try:
        main(cfg)
    finally:
        HydraConfig.instance().cfg = None
    return run_dir


def test_dashboard_reads_exactly_what_the_runner_logs(logged_run: Path) -> None:
    spec = dashboard.dashboard_spec("kaedit", group="outputs/multirun/x")
    logged = set(pd.read_csv(logged_run / "metrics.csv").columns)
    assert spec.x_axis == X_AXIS and X_AXIS in logged
    missing = spec.metrics() - logged
    assert not missing, f"panels read keys the runner does not log: {sorted(missing)}"
    # each section shows something the run logged (not just names that happen to exist)
    for section in spec.sections:
        keys = {k for p in section.panels for k in p.y}
        assert not keys or keys <= logged, section.name
    config = OmegaConf.load(logged_run / "config.yaml")
    for key in spec.group_by:  # W&B config keys: the run's resolved config
        assert OmegaConf.select(config, key) is not None, key
    assert config.tracking.choices.method == "memit"
    assert config.tracking.choices.fusion == "drop_rescale"
    recorded = json.loads((logged_run / RECORDED).read_text())
    from kaedit.results import sweep

    assert spec.tables() == {dashboard.RETENTION_TABLE, sweep.TABLE}
    assert dashboard.RETENTION_TABLE in recorded  # the runner logs it under that name
    assert len(pd.read_csv(logged_run / f"{dashboard.RETENTION_TABLE}.csv")) == 2  # 2 batches


def test_dashboard_builds_a_workspace_offline() -> None:
    spec = dashboard.dashboard_spec("kaedit", entity="me", group="outputs/multirun/x")
    ws = dashboard.workspace(spec, "me")
    assert (ws.entity, ws.project, ws.settings.x_axis) == ("me", "kaedit", X_AXIS)
    assert [g.name for g in ws.runset_settings.groupby] == list(dashboard.GROUP_BY)
    assert [s.name for s in ws.sections] == [s.name for s in spec.sections]
    lines = [p for s in ws.sections for p in s.panels if type(p).__name__ == "LinePlot"]
    assert {p.x for p in lines} == {X_AXIS}
    assert {y for p in lines for y in p.y} == spec.metrics() - {X_AXIS}
    tables = {p.table_name for s in ws.sections for p in s.panels
              if type(p).__name__ == "WeavePanelSummaryTable"}
    assert tables == spec.tables()
    view = ws._to_model().model_dump_json()  # what save() uploads, built without a server
    assert '"name":"group"},"op":"=","value":"outputs/multirun/x"' in view
    for key in dashboard.GROUP_BY:  # W&B stores a nested config value under KEY.value
        top, rest = key.split(".", 1)
        assert f"{top}.value.{rest}" in view, key


def test_dashboard_dry_run_prints_the_spec(capsys: pytest.CaptureFixture) -> None:
    assert dashboard.main(["--project", "kaedit", "--group", "g", "--dry-run"]) == 0
    spec = json.loads(capsys.readouterr().out)
    assert spec["group"] == "g" and spec["x_axis"] == X_AXIS
    assert spec["group_by"] == list(dashboard.GROUP_BY)
