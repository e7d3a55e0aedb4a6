"""The KA dashboard:
``python -m kaedit.results.dashboard --project P [--entity E] [--group G]``.

Builds a W&B workspace (``wandb-workspaces``) over the runs ``python -m kaedit.run`` logs,
every curve against the number of edits made (``edits_done``, the runs' x-axis) and runs
grouped by method, fusion and drop rate (``tracking.choices.method``,
``tracking.choices.fusion``, ``fusion.p``: W&B config keys):

* **Edit quality** -- seen efficacy, generalization, specificity and score;
* **Fixed specificity** -- specificity (and its magnitude) of one fixed set of
  neighbourhood prompts scored at every evaluation (``schedule.fixed_sample``);
* **Retention** -- first-batch retention (efficacy of the step-1 edits), the efficacy of
  each batch right after it was applied, and the retention table (per batch, its final
  efficacy / generalization / specificity);
* **Update size** -- the norm of each step's update as computed and as applied, what the
  fusion changed (drop-and-rescale's noise), and ‖W_t − W₀‖ / ‖W₀‖ of the edited weights;
* **Text** -- fluency and consistency (on generation steps);
* **Cost** -- seconds per edit by stage (targets, keys, solve, all of compute, fusion);
* **Sweeps** -- the table of each sweep (``results.csv``, :mod:`kaedit.results.sweep`).

:func:`dashboard_spec` is a pure function (the panels as data, testable offline);
:func:`workspace` turns it into ``wandb_workspaces`` objects (still offline); the push is
one call, ``Workspace.save()``, made by :func:`main` unless ``--dry-run``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from kaedit.experiment import RETENTION_BY_BATCH
from kaedit.results.sweep import TABLE as SWEEP_TABLE
from kaedit.tracking import X_AXIS

#: W&B config keys the runs are grouped by (filled by ``python -m kaedit.run``).
GROUP_BY = ("tracking.choices.method", "tracking.choices.fusion", "fusion.p")
#: Tables the dashboard shows: the runner's (``retention_by_batch.csv``, logged under its
#: stem) and the sweep callback's (``results.csv``, logged as ``SWEEP_TABLE``).
RETENTION_TABLE = RETENTION_BY_BATCH.removesuffix(".csv")
#: Stages whose seconds per edit the runner logs as ``time/per_edit/<stage>_s``
#: (targets/keys/solve for the locate-then-edit methods, compute and fusion for all).
STAGES = ("targets", "keys", "solve", "compute", "fusion")


@dataclass(frozen=True)
class Panel:
    """One panel: a line plot of ``y`` against ``x``, or a logged table (``table``)."""

    title: str
    kind: Literal["line", "table"] = "line"
    y: tuple[str, ...] = ()
    x: str | None = X_AXIS
    table: str | None = None


@dataclass(frozen=True)
class Section:
    name: str
    panels: tuple[Panel, ...]


@dataclass(frozen=True)
class DashboardSpec:
    project: str
    entity: str | None
    group: str | None
    name: str
    x_axis: str = X_AXIS
    group_by: tuple[str, ...] = GROUP_BY
    sections: tuple[Section, ...] = field(default_factory=tuple)

    def metrics(self) -> set[str]:
        """Every metric key a line plot reads (its x-axis included)."""
        return {k for s in self.sections for p in s.panels if p.kind == "line"
                for k in (*p.y, *([p.x] if p.x else []))}

    def tables(self) -> set[str]:
        return {p.table for s in self.sections for p in s.panels if p.table}


def line(title: str, *y: str) -> Panel:
    return Panel(title=title, y=tuple(y))


def dashboard_spec(project: str, entity: str | None = None, group: str | None = None,
                   name: str = "kaedit: knowledge attenuation") -> DashboardSpec:
    """The KA dashboard as data (no W&B call): sections of panels over the logged keys."""
    seen = ("efficacy", "generalization", "specificity", "score")
    sections = (
        Section("Edit quality vs edits",
                tuple(line(f"seen {m}", f"seen/{m}") for m in seen)),
        # one set of neighbourhood prompts from step 0 on (schedule.fixed_sample): the
        # model's drift, where seen specificity also follows a growing set
        Section("Fixed specificity", (
            line("fixed specificity (one set of neighbourhood prompts)", "fixed/specificity"),
            line("fixed specificity magnitude", "fixed/specificity_mag"),
        )),
        Section("Retention", (
            line("first-batch retention (efficacy of the step-1 edits)",
                 "retention/first_batch"),
            line("immediate efficacy (the batch just applied)", "batch/efficacy"),
            Panel(title="retention by batch (final step)", kind="table", x=None,
                  table=RETENTION_TABLE),
        )),
        # kaedit.experiment.update_sizes: the step's update before and after the fusion,
        # what the fusion changed (drop-and-rescale's noise) and the weights' total drift
        Section("Update size", (
            line("norm of the step's update (computed, applied, fusion's change)",
                 "update/computed_norm", "update/applied_norm", "update/fusion_change_norm"),
            line("drift of the edited weights ‖W_t − W₀‖ / ‖W₀‖", "update/total_rel"),
        )),
        Section("Text", (line("fluency", "seen/fluency"),
                         line("consistency", "seen/consistency"))),
        Section("Cost", (line("seconds per edit by stage",
                              *(f"time/per_edit/{s}_s" for s in STAGES)),)),
        Section("Sweeps", (Panel(title="sweep results", kind="table", x=None,
                                 table=SWEEP_TABLE),)),
    )
    return DashboardSpec(project=project, entity=entity, group=group, name=name,
                         sections=sections)


def workspace(spec: DashboardSpec, entity: str):
    """The spec as a ``wandb_workspaces`` workspace (built offline; ``.save()`` pushes)."""
    import wandb_workspaces.reports.v2 as wr
    import wandb_workspaces.workspaces as ws
    from wandb_workspaces import expr

    def panel(p: Panel):
        if p.kind == "table":
            return wr.WeavePanelSummaryTable(table_name=p.table)
        return wr.LinePlot(title=p.title, x=p.x, y=list(p.y), title_x="edits")

    filters = expr.And(expr.Metric("Group") == spec.group) if spec.group else ""
    return ws.Workspace(
        entity=entity, project=spec.project, name=spec.name,
        settings=ws.WorkspaceSettings(x_axis=spec.x_axis),
        runset_settings=ws.RunsetSettings(
            filters=filters, groupby=[expr.Config(k) for k in spec.group_by]),
        sections=[ws.Section(name=s.name, is_open=True, panels=[panel(p) for p in s.panels])
                  for s in spec.sections],
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kaedit.results.dashboard",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--project", required=True)
    parser.add_argument("--entity", default=None,
                        help="W&B user or team (default: your default entity)")
    parser.add_argument("--group", default=None, help="only the runs of this group (a sweep)")
    parser.add_argument("--name", default="kaedit: knowledge attenuation")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the spec as JSON; push nothing")
    args = parser.parse_args(argv)
    spec = dashboard_spec(args.project, args.entity, args.group, args.name)
    if args.dry_run:
        print(json.dumps(asdict(spec), indent=2))
        return 0
    entity: Any = args.entity
    if entity is None:
        import wandb

        entity = wandb.Api().default_entity
    saved = workspace(spec, entity).save()  # the one call that reaches the W&B server
    print(saved.url)
    return 0


if __name__ == "__main__":
    sys.exit(main())
