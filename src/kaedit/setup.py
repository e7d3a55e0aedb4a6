"""Compose and build: the one setup layer of every entry point.

``python -m kaedit.run``'s recipe (:mod:`kaedit.experiment`), ``kaedit.trace``,
``kaedit.train_mend``, ``kaedit.analyze``, ``kaedit.reproduce`` and ``benchmarks/bench.py``
compose their config and build records, model, statistics and trackers here (after
torchtune's ``config.instantiate`` builders and lightning-hydra-template's
``utils/instantiators.py``), so every one of them reports bad input the same way: as a
:class:`~kaedit.errors.ConfigError` raised while building (see :mod:`kaedit.errors`).

``from_trace:RUN_DIR`` layer values (written by ``python -m kaedit.trace``) are resolved
here too, so the recipe never imports the tracing package.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from kaedit import data
from kaedit.errors import ConfigError
from kaedit.models import LoadedModel, load_model
from kaedit.paths import CONF_DIR, REPO_ROOT
from kaedit.records import EditRequest
from kaedit.schedule import Schedule
from kaedit.stats import CovarianceStore
from kaedit.tracking import Tracker, Trackers

log = logging.getLogger(__name__)


#: ``method.layers=from_trace:RUN_DIR`` (or ``model.edit.layers=...``).
FROM_TRACE = "from_trace:"
#: Where ``python -m kaedit.trace`` writes in its run directory, and its layer choice.
TRACE_DIR = "trace"
RECOMMENDATION = "recommendation.json"


# ----------------------------------------------------------------------------- compose
def compose(overrides: Sequence[str] = (), name: str = "config", *,
            hydra_config: bool = False) -> DictConfig:
    """The config that ``python -m kaedit.run`` (``name="config"``), ``kaedit.trace``
    (``"trace"``) or ``kaedit.train_mend`` (``"train_mend"``) would run with ``overrides``,
    composed without starting a Hydra job: for scripts, notebooks and tests.
    ``hydra_config=True`` keeps the ``hydra`` node (``hydra.runtime.choices``, ...)."""
    import hydra

    from kaedit.jobdirs import register_resolver

    register_resolver()  # hydra.sweep.subdir, when hydra_config=True
    with hydra.initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra.compose(name, overrides=list(overrides), return_hydra_config=hydra_config)


def resolve_data_root(cfg: DictConfig) -> None:
    """Make a relative ``data_root`` absolute: from the working dir, else the repo root."""
    root = Path(str(cfg.data_root)).expanduser()
    if not root.is_absolute():
        here = Path.cwd() / root
        root = here if here.exists() or not (REPO_ROOT / root).exists() else REPO_ROOT / root
    cfg.data_root = str(root.resolve())


def build(node: Any, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate`` for the build phase: a ``ValueError`` the constructor
    raises for a bad value (``fusion.p=1.5``) becomes a :class:`ConfigError` with the
    constructor's one-line message; other failures keep their traceback."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    try:
        return instantiate(node, **kwargs)
    except InstantiationException as exc:
        cause = exc.__cause__
        if isinstance(cause, ConfigError):
            raise cause from None
        if isinstance(cause, ValueError):
            raise ConfigError(str(cause)) from cause
        raise


# ----------------------------------------------------------------------------- from_trace
def edit_window(layer: int, n_edit_layers: int) -> list[int]:
    """``layer − n + 1 .. layer``, clipped at layer 0 (then shorter than n)."""
    return list(range(max(0, layer - n_edit_layers + 1), layer + 1))


def read_recommendation(run_dir: str | Path) -> dict[str, Any]:
    """``RUN_DIR/trace/recommendation.json`` (a relative RUN_DIR: from the working directory,
    else from the repository root)."""
    given = Path(str(run_dir)).expanduser()
    candidates = [given] if given.is_absolute() else [Path.cwd() / given, REPO_ROOT / given]
    for base in candidates:
        path = base / TRACE_DIR / RECOMMENDATION
        if path.is_file():
            return json.loads(path.read_text())
    raise ConfigError(
        f"{FROM_TRACE}{run_dir}: {str(candidates[0] / TRACE_DIR / RECOMMENDATION)!r} "
        "does not exist; run `python -m kaedit.trace hydra.run.dir=RUN_DIR` first"
    )


def resolve_from_trace(cfg: DictConfig) -> DictConfig:
    """Replace ``from_trace:RUN_DIR`` in ``model.edit.layers`` or ``method.layers`` by the
    traced window: ``n`` layers ending at the recommended layer, ``n`` the length of the
    model's ``edit.layers`` (or of the recommended window when that is itself ``from_trace``).
    Returns ``cfg`` unchanged when neither is a ``from_trace:`` value, else a resolved copy.
    """
    keys = [
        k
        for k in ("model.edit.layers", "method.layers")
        if isinstance(v := OmegaConf.select(cfg, k, default=None), str) and v.startswith(FROM_TRACE)
    ]
    if not keys:
        return cfg
    cfg = cfg.copy()
    for key in keys:
        value = OmegaConf.select(cfg, key)
        if not isinstance(value, str):  # method.layers: ${model.edit.layers}, resolved above
            continue
        rec = read_recommendation(value[len(FROM_TRACE) :])
        if rec.get("model") != cfg.model.name:
            raise ConfigError(
                f"{key}={value!r}: that trace is of model {rec.get('model')!r}, "
                f"this run uses model={cfg.model.name!r}"
            )
        own = OmegaConf.select(cfg, "model.edit.layers", default=None)
        n = len(own) if not isinstance(own, str) and own is not None else len(rec["layers"])
        layers = edit_window(int(rec["layer"]), n)
        OmegaConf.update(cfg, key, layers, merge=False)
        log.info(
            "%s=%s -> %s (max %s AIE at layer %d)", key, value, layers, rec["kind"], rec["layer"]
        )
    return cfg


# ----------------------------------------------------------------------------- builders
def build_records(cfg: DictConfig) -> list[EditRequest]:
    """The dataset's requests (``cfg.dataset``; downloads cached under ``cache_dir/data``)."""
    return data.from_config(cfg.dataset, cache_dir=str(Path(str(cfg.cache_dir)) / "data"))


def build_schedule(cfg: DictConfig) -> Schedule:
    """``cfg.schedule`` as a :class:`Schedule` (an unknown key is a ConfigError)."""
    values = OmegaConf.to_container(cfg.schedule, resolve=True)
    try:
        return Schedule(**values)
    except TypeError as exc:  # an unknown key: the dataclass names it
        raise ConfigError(f"schedule: {exc}; valid keys: "
                          f"{sorted(Schedule.__dataclass_fields__)}") from None


def build_model(cfg: DictConfig, layers: Sequence[int] | None = None) -> LoadedModel:
    """Load ``cfg.model`` and check that its module templates resolve at ``layers``."""
    lm = load_model(cfg.model, lambda: build(cfg.model.load))
    if layers is not None:
        lm.spec.check(lm.model, [int(x) for x in layers])
    return lm


def build_stats(cfg: DictConfig) -> CovarianceStore:
    """The run's covariance store (``cfg.stats``): computed on demand, cached on disk."""
    return build(cfg.stats)


def build_trackers(cfg: DictConfig, run_dir: Path,
                   resume: Mapping[str, Any] | None = None) -> tuple[Trackers, dict[str, Tracker]]:
    """The trackers ``cfg.logger`` lists, logging to ``run_dir``; ``resume`` maps a
    tracker's name to the state it had at the checkpoint. Returns the fan-out and the
    trackers by name (whose states a checkpoint keeps)."""
    from hydra.utils import instantiate

    resolved = OmegaConf.to_container(cfg, resolve=True)
    resume = resume or {}
    # partial first: instantiate would otherwise recurse into the config's own _target_s
    named = {name: instantiate(node, _partial_=True)(
        run_dir=str(run_dir), run_config=resolved, resume=resume.get(name))
        for name, node in (cfg.logger or {}).items()}
    return Trackers(named.values()), named
