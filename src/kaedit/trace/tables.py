"""Tables of a trace: restored probabilities, records, the AIE per (kind, layer, position
class), and the layer recommendation read from them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from kaedit.errors import ConfigError
from kaedit.setup import edit_window
from kaedit.trace.compute import KINDS, POSITIONS, RecordTrace, position_classes

#: The state whose AIE picks the edit layer (ROME §2.2 / MEMIT §4.1): the MLP output at
#: the last subject token.
RECOMMEND_KIND, RECOMMEND_POSITION = "mlp", "last_subject"


# ----------------------------------------------------------------------------- tables
def restored_table(traces: Sequence[RecordTrace]):
    """Long table: one row per (record, kind, layer, traced token), with its position
    classes (``;``-joined), restored P*(o) and IE."""
    import pandas as pd

    rows = []
    for tr in traces:
        pr = tr.prompt
        classes = position_classes(pr.n_tokens, pr.subject_first, pr.subject_last)
        of_token = {
            t: ";".join(c for c, ts in classes.items() if t in ts)
            for t in range(pr.subject_first, pr.n_tokens)
        }
        for ki, kind in enumerate(tr.kinds):
            for layer in range(tr.restored.shape[1]):
                for t, cls in of_token.items():
                    p = float(tr.restored[ki, layer, t])
                    rows.append(
                        {
                            "case_id": pr.case_id,
                            "kind": kind,
                            "layer": layer,
                            "token": t,
                            "positions": cls,
                            "p_restored": p,
                            "ie": p - tr.p_corrupted,
                        }
                    )
    return pd.DataFrame(rows)


def records_table(traces: Sequence[RecordTrace]):
    import pandas as pd

    return pd.DataFrame(
        [
            {
                "case_id": t.prompt.case_id,
                "prompt": t.prompt.text,
                "target": t.prompt.target_text,
                "n_tokens": t.prompt.n_tokens,
                "subject_first": t.prompt.subject_first,
                "subject_last": t.prompt.subject_last,
                "p_clean": t.p_clean,
                "p_corrupted": t.p_corrupted,
            }
            for t in traces
        ]
    )


def aie_table(restored):
    """AIE per (kind, layer, position class): mean IE over record-tokens, its standard error,
    the number of record-tokens (``count``) and of records (``records``)."""
    import pandas as pd

    long = restored.assign(position=restored["positions"].str.split(";")).explode("position")
    long = long[long["position"] != ""]
    g = long.groupby(["kind", "layer", "position"], sort=False)
    out = g.agg(
        aie=("ie", "mean"), sd=("ie", "std"), count=("ie", "size"), records=("case_id", "nunique")
    ).reset_index()
    out["sem"] = (out.pop("sd") / np.sqrt(out["count"])).fillna(0.0)
    order = {k: i for i, k in enumerate(POSITIONS)}
    kinds = {k: i for i, k in enumerate(KINDS)}
    out = out.sort_values(
        ["kind", "position", "layer"],
        key=lambda s: (
            s.map(kinds) if s.name == "kind" else s.map(order) if s.name == "position" else s
        ),
    )
    return pd.DataFrame(
        out[["kind", "layer", "position", "aie", "sem", "count", "records"]]
    ).reset_index(drop=True)


def aie_grid(aie, kind: str, n_layers: int) -> np.ndarray:
    """``[positions, layers]`` AIE of one kind (NaN where a class had no tokens)."""
    grid = np.full((len(POSITIONS), n_layers), np.nan)
    rows = aie[aie["kind"] == kind]
    pos = list(POSITIONS)
    for r in rows.itertuples():
        grid[pos.index(r.position), int(r.layer)] = r.aie
    return grid


# ----------------------------------------------------------------------------- recommendation
@dataclass(frozen=True)
class Recommendation:
    """The edit layer (max MLP AIE at the last subject token) and the window ending there."""

    model: str
    n_layers: int
    layer: int
    layers: list[int]
    aie: float
    kind: str = RECOMMEND_KIND
    position: str = RECOMMEND_POSITION

    def snippet(self) -> str:
        """The YAML a model config takes (``conf/model/<name>.yaml``)."""
        return (
            f"# conf/model/{self.model}.yaml (or method.layers=from_trace:RUN_DIR)\n"
            f"edit:\n  layers: [{', '.join(str(x) for x in self.layers)}]\n"
        )


def recommend(aie, model: str, n_layers: int, n_edit_layers: int) -> Recommendation:
    """The layer of maximum MLP AIE at the last subject token (the lowest layer on ties)."""
    rows = aie[(aie["kind"] == RECOMMEND_KIND) & (aie["position"] == RECOMMEND_POSITION)]
    if rows.empty:
        raise ConfigError(
            f"no {RECOMMEND_KIND!r} AIE at the {RECOMMEND_POSITION!r} token to "
            f"recommend layers from (trace.kinds must include {RECOMMEND_KIND!r})"
        )
    rows = rows.sort_values("layer")
    best = rows.loc[rows["aie"].idxmax()]
    layer = int(best["layer"])
    return Recommendation(
        model=model,
        n_layers=n_layers,
        layer=layer,
        layers=edit_window(layer, n_edit_layers),
        aie=float(best["aie"]),
    )
