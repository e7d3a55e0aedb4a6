"""Figures of a trace: ROME's heat-maps and the AIE at the last subject token by layer."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from kaedit.trace.compute import KINDS, POSITIONS
from kaedit.trace.tables import Recommendation, aie_grid


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path, dpi: int) -> Path:
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return path


COLORS = {"residual": "Purples", "mlp": "Greens", "attn": "Reds"}
TITLES = {
    "residual": "the residual stream (one layer)",
    "mlp": "MLP outputs",
    "attn": "attention outputs",
}


def plot_heatmap(
    aie, kind: str, n_layers: int, n_records: int, window: int, path: Path, dpi: int = 90
) -> Path:
    """ROME's averaged heat-map: position classes × layers, colour = AIE."""
    plt = _pyplot()
    grid = aie_grid(aie, kind, n_layers)
    fig, ax = plt.subplots(figsize=(max(4.0, 0.16 * n_layers + 2.0), 2.4))
    im = ax.pcolormesh(
        np.ma.masked_invalid(grid),
        cmap=COLORS[kind],
        vmin=min(0.0, float(np.nanmin(grid))) if np.isfinite(grid).any() else 0.0,
    )
    ax.invert_yaxis()
    ax.set_yticks(np.arange(len(POSITIONS)) + 0.5, list(POSITIONS.values()), fontsize=8)
    step = max(1, n_layers // 10)
    ax.set_xticks(
        np.arange(0, n_layers, step) + 0.5, [str(i) for i in range(0, n_layers, step)], fontsize=8
    )
    label = TITLES[kind] if kind == "residual" else f"{TITLES[kind]} (window {window})"
    ax.set_title(f"AIE of restoring {label}, {n_records} prompts", fontsize=9)
    ax.set_xlabel("layer", fontsize=8)
    cb = fig.colorbar(im, ax=ax)
    cb.ax.tick_params(labelsize=7)
    cb.set_label("AIE", fontsize=8)
    return _save(fig, path, dpi)


def plot_aie_by_layer(
    aie,
    rec: Recommendation | None,
    n_layers: int,
    n_records: int,
    window: int,
    path: Path,
    dpi: int = 90,
) -> Path:
    """AIE at the last subject token against the layer, one line per kind; the recommended
    window shaded."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.0, 3.0))
    colors = {"residual": "tab:purple", "mlp": "tab:green", "attn": "tab:red"}
    for kind in KINDS:
        rows = aie[(aie["kind"] == kind) & (aie["position"] == "last_subject")].sort_values("layer")
        if rows.empty:
            continue
        ax.plot(rows["layer"], rows["aie"], marker="o", ms=3, color=colors[kind], label=kind)
        ax.fill_between(
            rows["layer"],
            rows["aie"] - rows["sem"],
            rows["aie"] + rows["sem"],
            color=colors[kind],
            alpha=0.15,
        )
    if rec is not None:
        ax.axvspan(
            rec.layers[0] - 0.4,
            rec.layers[-1] + 0.4,
            color="tab:green",
            alpha=0.1,
            label=f"edit layers {rec.layers[0]}-{rec.layers[-1]}",
        )
        ax.axvline(rec.layer, color="tab:green", ls="--", lw=0.8)
    ax.set_xlim(-0.5, n_layers - 0.5)
    ax.set_xlabel("layer")
    ax.set_ylabel("AIE at last subject token")
    ax.set_title(
        f"Average indirect effect, {n_records} prompts (MLP / attn window {window})", fontsize=9
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path, dpi)


def write_figures(
    aie, rec: Recommendation | None, n_layers: int, n_records: int, window: int, out: Path
) -> dict[str, Path]:
    """``heatmap_<kind>.png`` for each kind in ``aie`` and ``aie_by_layer.png`` in ``out``."""
    kinds = [k for k in KINDS if (aie["kind"] == k).any()]
    figures = {
        f"heatmap_{k}": plot_heatmap(aie, k, n_layers, n_records, window, out / f"heatmap_{k}.png")
        for k in kinds
    }
    figures["aie_by_layer"] = plot_aie_by_layer(
        aie, rec, n_layers, n_records, window, out / "aie_by_layer.png"
    )
    return figures
