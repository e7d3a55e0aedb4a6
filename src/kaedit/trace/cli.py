"""``python -m kaedit.trace``: trace records of a dataset on a model and write the
tables, figures and layer recommendation to ``<run_dir>/trace`` (see :mod:`kaedit.trace`)."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from kaedit.errors import ConfigError, user_errors_exit
from kaedit.setup import (
    CONF_DIR,
    RECOMMENDATION,
    TRACE_DIR,
    build_model,
    build_records,
    build_trackers,
    resolve_data_root,
)
from kaedit.trace.compute import (
    TraceSettings,
    embedding_std,
    record_generator,
    select_records,
    trace_record,
)
from kaedit.trace.plots import write_figures
from kaedit.trace.tables import (
    RECOMMEND_KIND,
    Recommendation,
    aie_table,
    recommend,
    records_table,
    restored_table,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TraceResult:
    out_dir: Path
    summary: dict[str, Any]
    recommendation: Recommendation | None


def run(cfg: DictConfig, run_dir: str | None = None) -> TraceResult:
    """Trace ``trace.n_records`` records of ``dataset`` on ``model``; write ``<run_dir>/trace``."""
    from tqdm.auto import tqdm

    from kaedit.files import atomic_write

    cfg = cfg.copy()
    resolve_data_root(cfg)
    settings = TraceSettings.from_config(cfg.trace)
    edit_layers = OmegaConf.select(cfg, "model.edit.layers", default=None)
    if settings.n_edit_layers is None and (edit_layers is None or isinstance(edit_layers, str)):
        raise ConfigError(
            f"model.edit.layers={edit_layers!r} is not a list of layers: set "
            "trace.n_edit_layers to the number of edit layers to recommend"
        )
    n_edit = settings.n_edit_layers or len(edit_layers)
    records = build_records(cfg)
    lm = build_model(cfg)
    lm.spec.check(lm.model, list(range(lm.spec.n_layers)))
    out = Path(run_dir or cfg.get("run_dir") or "outputs/trace/manual") / TRACE_DIR
    t0 = time.perf_counter()

    chosen = select_records(lm, records, settings.n_records, settings.select)
    sigma = embedding_std(lm, [p for _, p in chosen])
    noise_std = settings.noise * sigma
    log.info(
        "tracing %d records (%s), noise std %.4g = %g x %.4g",
        len(chosen),
        settings.select,
        noise_std,
        settings.noise,
        sigma,
    )
    t_select = time.perf_counter() - t0

    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out.parent / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    trackers, _ = build_trackers(cfg, out)
    try:
        traces = []
        t1 = time.perf_counter()
        for k, (index, prompt) in enumerate(
            tqdm(chosen, desc="tracing", unit="record", disable=None), start=1
        ):
            t_rec = time.perf_counter()
            tr = trace_record(
                lm, prompt, settings, noise_std, record_generator(int(cfg.seed), index)
            )
            traces.append(tr)
            log.info(
                "record %d/%d (case_id %s, %d tokens): P(o) clean %.3f, corrupted %.3f (%.0f s)",
                k,
                len(chosen),
                prompt.case_id,
                prompt.n_tokens,
                tr.p_clean,
                tr.p_corrupted,
                time.perf_counter() - t_rec,
            )
        t_trace = time.perf_counter() - t1

        restored = restored_table(traces)
        records_df = records_table(traces)
        aie = aie_table(restored)
        atomic_write(out / "aie.csv", aie.to_csv(index=False, float_format="%.6g"))
        atomic_write(out / "records.csv", records_df.to_csv(index=False, float_format="%.6g"))
        atomic_write(out / "restored.csv", restored.to_csv(index=False, float_format="%.6g"))
        rec = None
        if RECOMMEND_KIND in settings.kinds:
            rec = recommend(aie, str(cfg.model.name), lm.spec.n_layers, n_edit)
        else:
            log.warning("trace.kinds has no %r: no layer recommendation", RECOMMEND_KIND)
        figures = write_figures(aie, rec, lm.spec.n_layers, len(traces), settings.window, out)
        summary: dict[str, Any] = {
            "model": str(cfg.model.name),
            "n_layers": lm.spec.n_layers,
            "n_records": len(traces),
            "select": settings.select,
            "samples": settings.samples,
            "window": settings.window,
            "noise": settings.noise,
            "embedding_std": sigma,
            "noise_std": noise_std,
            "p_clean_mean": float(records_df["p_clean"].mean()),
            "p_corrupted_mean": float(records_df["p_corrupted"].mean()),
            "select_s": t_select,
            "trace_s": t_trace,
            "trace_s_per_record": t_trace / max(1, len(traces)),
        }
        if rec is not None:
            summary.update(
                {
                    "recommended_layer": rec.layer,
                    "recommended_layers": rec.layers,
                    "recommended_aie": rec.aie,
                }
            )
            atomic_write(
                out / RECOMMENDATION,
                json.dumps(
                    {
                        **asdict(rec),
                        "n_edit_layers": n_edit,
                        "window": settings.window,
                        "n_records": len(traces),
                        "samples": settings.samples,
                        "select": settings.select,
                        "noise_std": noise_std,
                    },
                    indent=2,
                )
                + "\n",
            )
        for layer in range(lm.spec.n_layers):
            at = aie[aie["layer"] == layer]
            trackers.log(
                {
                    "layer": layer,
                    **{f"aie/{r.kind}/{r.position}": float(r.aie) for r in at.itertuples()},
                },
                layer,
            )
        trackers.images({k: str(v) for k, v in figures.items()})
        trackers.summary(summary)
        return TraceResult(out, summary, rec)
    finally:
        trackers.finish()


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="trace")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    with user_errors_exit(log):
        result = run(cfg, run_dir=HydraConfig.get().runtime.output_dir)
    s = result.summary
    print(
        f"traced {s['n_records']} records of {s['model']} in {s['trace_s']:.0f} s "
        f"(P(o) clean {s['p_clean_mean']:.3f}, corrupted {s['p_corrupted_mean']:.3f}); "
        f"results in {result.out_dir}"
    )
    if result.recommendation is not None:
        rec = result.recommendation
        print(
            f"max {rec.kind} AIE at the last subject token: layer {rec.layer} "
            f"(AIE {rec.aie:.4f}); edit layers:"
        )
        print(rec.snippet(), end="")

