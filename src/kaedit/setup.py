"""Compose and build: the one setup layer of every entry point.

``python -m kaedit.run``'s recipe (:mod:`kaedit.experiment`), ``kaedit.trace``,
``kaedit.train_mend``, ``kaedit.results.analyze``, ``kaedit.results.reproduce`` and
``benchmarks/bench.py`` compose their config and build records, model, statistics and
trackers here (after torchtune's ``config.instantiate`` builders and
lightning-hydra-template's ``utils/instantiators.py``), so every one of them reports bad
input the same way: as a :class:`~kaedit.errors.ConfigError` raised while building (see
:mod:`kaedit.errors`).

An editing session -- the recipe's, the notebook :class:`~kaedit.editor.Editor`'s,
``kaedit.export``'s and the bench's -- is built in one place, :func:`build_session`, in the
recipe's order and with its checks; each caller asks only for the parts it uses.

``from_trace:RUN_DIR`` layer values (written by ``python -m kaedit.trace``) are resolved
here too, so the recipe never imports the tracing package.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from kaedit import data
from kaedit.errors import ConfigError
from kaedit.evaluate import Evaluator, Scorer, TextMetrics, check_tokenisation
from kaedit.evaluation import Evaluation
from kaedit.fusion import FusionStrategy, check_seed
from kaedit.methods.base import EditContext, EditMethod
from kaedit.methods.targets import TargetConfig
from kaedit.methods.templates import Templates, context_templates
from kaedit.models import LoadedModel, load_model
from kaedit.paths import CONF_DIR, REPO_ROOT
from kaedit.perplexity import Perplexity
from kaedit.records import EditRequest
from kaedit.schedule import Schedule
from kaedit.stats import CovarianceStore
from kaedit.tracking import Tracker, Trackers
from kaedit.weights import EditedWeights
from kaedit.wild import WildEval

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
        cfg = hydra.compose(name, overrides=list(overrides), return_hydra_config=hydra_config)
    check_edit_overrides(cfg, overrides)
    return cfg


def check_edit_overrides(cfg: DictConfig, overrides: Sequence[str]) -> None:
    """A command line's ``model.edit.X=V`` must reach the method that runs.

    ``model.edit`` holds a model's editing defaults (layers, λ, v* settings), which every
    locate-then-edit method follows field by field (conf/method_base/target.yaml). A
    method's own settings for one model live in one place, ``conf/hparams/<method>_<model>.yaml``
    (a reference's values), and replace the defaults they name; so does a method config
    that fixes a value (ROME's clamp). An override of such a field on ``model.edit`` would
    change nothing: that is a :class:`ConfigError` naming the ``method.X`` to set instead,
    not a silently ignored value (unless the command line sets ``method.X`` too: then its
    ``model.edit`` value is meant for what else reads it, e.g. ``from_trace``'s window)."""
    method = cfg.get("method")
    if not isinstance(method, DictConfig):
        return
    keys = [str(item).lstrip("+~").split("=", 1)[0] for item in overrides if "=" in str(item)]
    for key in keys:
        if not key.startswith("model.edit."):
            continue
        rest = key[len("model.edit."):]
        if f"method.{rest}" in keys:
            continue  # the command line sets the method's value itself
        missing = object()
        used = OmegaConf.select(method, rest, default=missing, throw_on_missing=False)
        if used is missing:
            continue  # not a setting of this method (e.g. rome_layer for MEMIT)
        given = OmegaConf.select(cfg, key)
        if OmegaConf.is_config(used):
            used = OmegaConf.to_container(used, resolve=True)
        if OmegaConf.is_config(given):
            given = OmegaConf.to_container(given, resolve=True)
        if used != given:
            m = cfg.get("model", {}).get("name", "?")
            raise ConfigError(
                f"{key}={given!r} does not reach the method: method.{rest} is {used!r}, "
                f"set by conf/method/ or conf/hparams/ for this method on model {m!r}; "
                f"set method.{rest}={given!r} to change it for this run")


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


# ----------------------------------------------------------------------------- session
def effective_config(cfg: DictConfig) -> DictConfig:
    """A copy with ``data_root`` made absolute and ``method.layers=from_trace:`` read: the
    config a run actually uses (and fingerprints)."""
    cfg = cfg.copy()
    resolve_data_root(cfg)
    check_target_keys(cfg)
    return resolve_from_trace(cfg)  # method.layers=from_trace:RUN_DIR (python -m kaedit.trace)


def check_target_keys(cfg: DictConfig) -> None:
    """``model.edit.target`` and ``method.target`` name only :class:`TargetConfig` fields
    (a misspelt ``++model.edit.target.X`` would otherwise be read by no method)."""
    valid = [f.name for f in dataclasses.fields(TargetConfig)]
    for key in ("model.edit.target", "method.target"):
        node = OmegaConf.select(cfg, key, default=None)
        if not isinstance(node, DictConfig):
            continue
        for name in node:
            if name not in valid:
                raise ConfigError(f"{key}.{name} is not a target setting; valid: {valid}")


def fusion_seed(cfg: DictConfig) -> int:
    """The seed of the fusion's draws (drop-and-rescale's masks, the matched-noise control's
    noise): ``fusion.seed`` where set, else the run's ``seed``. Setting it alone replicates
    a run's random fusion with other draws and everything else unchanged (the edits, the
    context templates, the tracked sample: the run's ``seed`` chooses those)."""
    value = cfg.fusion.get("seed")
    try:
        check_seed(value)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return int(cfg.seed) if value is None else value


def build_fusion(cfg: DictConfig) -> FusionStrategy:
    """``cfg.fusion``, checked to be a fusion strategy."""
    fusion = build(cfg.fusion)
    if not isinstance(fusion, FusionStrategy):
        raise ConfigError(f"fusion._target_={cfg.fusion._target_!r} is not a fusion strategy "
                          "(kaedit.fusion: init_state, step, served_offset)")
    return fusion


def build_wild(cfg: DictConfig, lm: LoadedModel) -> WildEval | None:
    """The run's WILD evaluation (``cfg.wild``), or None when ``wild.every`` is 0."""
    node = cfg.get("wild")
    if node is None or node.get("every", 0) == 0:
        return None
    return build(node, _partial_=True)(lm=lm)  # lm: not a config


@dataclass
class Session:
    """The parts of one editing session on one model, built by :func:`build_session`.

    The parts a caller did not ask for are None (``records`` ... ``wild`` without
    ``plan``; ``templates`` without ``templates``; ``method`` and ``ctx`` without
    ``method``). Trackers are not part of it: they log to a run directory, which the
    recipe owns (:func:`build_trackers`)."""

    #: The config as used: ``data_root`` absolute, ``from_trace:`` layers read.
    cfg: DictConfig
    seed: int
    lm: LoadedModel
    fusion: FusionStrategy
    #: The seed of the fusion's draws (:func:`fusion_seed`: ``fusion.seed`` or ``seed``).
    fusion_seed: int
    #: The edited weights: W₀ + the applied deltas (:class:`~kaedit.weights.EditedWeights`).
    edits: EditedWeights
    #: The dataset's evaluator (``dataset.evaluator``) and the batched scorer it uses.
    evaluator: Evaluator
    scorer: Scorer
    #: The covariance store (``cfg.stats``): computed on demand, cached on disk.
    stats: CovarianceStore
    #: WikiText-2 perplexity (``cfg.perplexity``) on the steps ``perplexity.every`` picks.
    perplexity: Perplexity | None
    # -- plan=True: the dataset's records, the schedule's batches and the run's evaluation
    records: list[EditRequest] | None = None
    schedule: Schedule | None = None
    batches: list[range] | None = None
    #: The edits in the order the batches make them (``planned[i]``: the i-th edit).
    planned: list[EditRequest] | None = None
    evaluation: Evaluation | None = None
    texts: TextMetrics | None = None
    wild: WildEval | None = None
    # -- templates=True (implied by method=True)
    templates: Templates | None = None
    # -- method=True: the method, prepared on the unedited model, and what it reads
    method: EditMethod | None = None
    ctx: EditContext | None = None


def build_session(cfg: DictConfig, *, plan: bool = True, templates: bool = True,
                  method: bool = True) -> Session:
    """Build an editing session from a composed config, in the recipe's order, with every
    check of the build phase: bad input raises a :class:`ConfigError` before anything is
    loaded where it can be, and always before anything is written.

    ``plan``: the records, schedule, batches and planned edits, with their tokenisation
    checked, and the run's evaluation (:class:`~kaedit.evaluation.Evaluation`, text metrics,
    WILD). ``templates``: MEMIT's context templates. ``method``: the method
    (built after ``torch.manual_seed(seed)``, its layers checked against the model) and its
    :class:`EditContext`, prepared on the unedited model (statistics loaded)."""
    cfg = effective_config(cfg)
    seed = int(cfg.seed)
    # 1. data and plan: fail on bad input before anything is loaded
    records = schedule = batches = planned = None
    if plan:
        records = build_records(cfg)
        schedule = build_schedule(cfg)
        batches = schedule.batches(len(records))
        planned = [records[i] for r in batches for i in r]
    evaluator: Evaluator = build(cfg.dataset.evaluator)
    fusion = build_fusion(cfg)
    drawn = fusion_seed(cfg)
    if cfg.guard.on_fault not in ("skip", "stop"):
        raise ConfigError(f"guard.on_fault={cfg.guard.on_fault!r} is not one of ['skip', 'stop']")

    # 2. model, statistics, method (all derived from the unedited model)
    lm = build_model(cfg)
    if plan:
        check_tokenisation(lm.tokenizer, evaluator, planned)  # bad input: before statistics
    edit_method: EditMethod | None = None
    if method:
        torch.manual_seed(seed)
        edit_method = build(cfg.method, _convert_="all")
        lm.spec.check(lm.model, [int(x) for x in edit_method.layers])  # the layers it declares
    stats = build_stats(cfg)
    made = (context_templates(lm, [tuple(s) for s in cfg.templates.specs], seed=seed)
            if templates or method else None)
    ctx = None
    if edit_method is not None:
        ctx = EditContext(lm=lm, stats=stats, templates=made)
        edit_method.prepare(ctx)
    session = Session(cfg=cfg, seed=seed, lm=lm, fusion=fusion, fusion_seed=drawn,
                      edits=EditedWeights(lm.model), evaluator=evaluator,
                      scorer=Scorer(lm, int(cfg.eval_batch_size)),
                      stats=stats, templates=made, method=edit_method, ctx=ctx,
                      # WikiText-2 perplexity on the steps perplexity.every picks (0: never)
                      perplexity=build(cfg.perplexity) if cfg.get("perplexity") else None,
                      records=records, schedule=schedule, batches=batches, planned=planned)
    if plan:
        # 3. the run's evaluation: which edits each step scores, text metrics, WILD
        session.texts = build(cfg.generation, _partial_=True)(lm=lm)  # lm: not a config
        session.evaluation = Evaluation(
            evaluator, session.scorer, planned, schedule.retention_sample, seed, session.texts,
            first_batch=range(len(batches[0])) if schedule.first_batch_in_full else (),
            fixed=schedule.fixed_sample)
        session.wild = build_wild(cfg, lm)
    return session
