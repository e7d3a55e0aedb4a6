"""Every config option composes, and every ``_target_`` binds its signature (no model loads)."""

from __future__ import annotations

import dataclasses
import inspect
import os
import re
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from hydra.errors import InstantiationException
from hydra.utils import get_object, instantiate
from omegaconf import OmegaConf

from conftest import CONF, Compose
from kaedit.errors import ConfigError
from kaedit.fusion import FusionStrategy
from kaedit.methods.base import EditMethod
from kaedit.methods.targets import TargetConfig
from kaedit.schedule import Schedule
from kaedit.setup import effective_config

#: Specialisations, composed by conf/config.yaml for a pair of choices
#: (``hparams: ${method}_${model}``, ``method_fusion: ${method}_${fusion}``): each file is
#: tested with its own pair (test_specialisation_composes_for_its_pair), not on its own.
SPECIALISATIONS = {"hparams": "model", "method_fusion": "fusion"}
#: Parts that model and method configs include (``- /model_base/llama_modules@modules``,
#: ``- /method_base/target@target``), not choices: every config that uses one is composed below.
PARTS = {"model_base", "method_base"}
# conf/hydra/ holds Hydra's own groups (hydra/launcher), tested in test_experiments.py
GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir() and p.name != "hydra"
                and p.name not in SPECIALISATIONS and p.name not in PARTS)
OPTIONS = [(g, f.stem) for g in GROUPS for f in sorted((CONF / g).glob("*.yaml"))]
#: Arguments the runner passes to every tracker on top of its config keys.
RUNNER_KWARGS = {
    "logger": {"run_dir": "/tmp/run", "run_config": {}, "resume": None},
    "generation": {"lm": None},
}


def targets(node: Any, path: str = "") -> Iterator[tuple[str, Mapping[str, Any]]]:
    """``(dotted path, node)`` for every mapping with a ``_target_`` anywhere in ``node``."""
    if isinstance(node, Mapping):
        if "_target_" in node:
            yield path, node
        for k, v in node.items():
            yield from targets(v, f"{path}.{k}" if path else str(k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from targets(v, f"{path}[{i}]")


def bind(path: str, node: Mapping[str, Any]) -> None:
    """Bind the node's keys to its target's signature; TypeError names an unknown key."""
    target = get_object(node["_target_"])
    kwargs = {k: v for k, v in node.items() if not str(k).startswith("_")}
    kwargs.update(RUNNER_KWARGS.get(path.split(".")[0], {}))
    try:
        inspect.signature(target).bind(**kwargs)
    except TypeError as exc:
        raise TypeError(f"{path} ({node['_target_']}): {exc}") from None


@pytest.mark.parametrize(("parts", "group"), [("model_base", "model"), ("method_base", "method")])
def test_config_parts_are_shared_and_each_is_used(parts: str, group: str) -> None:
    """The shared blocks of conf/model_base/ and conf/method_base/ replace copies: each is
    used by two or more configs of its group, and no config repeats one of them in full."""
    for part in sorted((CONF / parts).glob("*.yaml")):
        users = [f.stem for f in sorted((CONF / group).glob("*.yaml"))
                 if f"/{parts}/{part.stem}@" in f.read_text()]
        assert len(users) >= 2, (part.stem, users)
        body = [ln for ln in part.read_text().splitlines() if ln and not ln.startswith("#")]
        for f in sorted((CONF / group).glob("*.yaml")):
            text = f.read_text()
            assert not all(f"  {ln}" in text for ln in body), (f.stem, part.stem)


def test_every_group_has_options() -> None:
    assert {"dataset", "fusion", "logger", "method", "model", "schedule"} <= set(GROUPS)
    assert all(any(g == group for g, _ in OPTIONS) for group in GROUPS)


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_option_composes_and_targets_bind(compose: Compose, group: str, option: str) -> None:
    cfg = compose([f"{group}={option}"])
    resolved = OmegaConf.to_container(cfg, resolve=True)
    found = dict(targets(resolved))
    assert {"model.load", "method", "fusion", "stats", "dataset.evaluator", "generation"} <= set(
        found
    )
    for path, node in found.items():
        bind(path, node)
    # Keys read without a _target_: the schedule and the method's target settings.
    inspect.signature(Schedule).bind(**resolved["schedule"])
    inspect.signature(TargetConfig).bind(**resolved["model"]["edit"]["target"])


MODELS = sorted(f.stem for f in (CONF / "model").glob("*.yaml"))
METHODS = sorted(f.stem for f in (CONF / "method").glob("*.yaml"))
FUSIONS = sorted(f.stem for f in (CONF / "fusion").glob("*.yaml"))


def split_pair(group: str, stem: str) -> tuple[str, str]:
    """``pmet_gptj`` -> ``("pmet", "gptj")``: the method and the other group's option."""
    other = {f.stem for f in (CONF / SPECIALISATIONS[group]).glob("*.yaml")}
    pairs = [(m, stem[len(m) + 1:]) for m in METHODS if stem.startswith(f"{m}_")]
    pairs = [(m, o) for m, o in pairs if o in other]
    assert len(pairs) == 1, f"conf/{group}/{stem}.yaml names no <method>_<option> pair"
    return pairs[0]


SPECIALISED = [(g, f.stem) for g in SPECIALISATIONS for f in sorted((CONF / g).glob("*.yaml"))]


@pytest.mark.parametrize(("group", "stem"), SPECIALISED, ids=[f"{g}/{s}" for g, s in SPECIALISED])
def test_specialisation_composes_for_its_pair(compose: Compose, group: str, stem: str) -> None:
    method, option = split_pair(group, stem)
    cfg = compose([f"method={method}", f"{SPECIALISATIONS[group]}={option}"])
    for path, node in targets(OmegaConf.to_container(cfg, resolve=True)):
        bind(path, node)
    assert isinstance(instantiate(cfg.method, _convert_="all"), EditMethod)
    assert isinstance(instantiate(cfg.fusion), FusionStrategy)


def test_method_model_hparams_follow_the_reference_files(compose: Compose) -> None:
    # xpq-tech/PMET edit/hparams/PMET/EleutherAI_gpt-j-6B.json: layers 3-8, λ 6000,
    # v_lr 0.2, 30 steps, kl_factor 1, clamp 0.75, weight decay 0.5.
    pmet = instantiate(compose(["method=pmet", "model=gptj"]).method, _convert_="all")
    assert pmet.layers == [3, 4, 5, 6, 7, 8] and pmet.lam == 6000.0
    t = pmet.target
    assert (t.lr, t.steps, t.kl_factor, t.clamp_norm_factor, t.weight_decay) == (
        0.2, 30, 1.0, 0.75, 0.5)
    # kmeng01/memit hparams/MEMIT/EleutherAI_gpt-j-6B.json: λ 15000, lr 0.5, 25 steps, KL
    # 0.0625, clamp 0.75 -- the model config's own settings, untouched by PMET's.
    memit = instantiate(compose(["method=memit", "model=gptj"]).method, _convert_="all")
    assert memit.layers == [3, 4, 5, 6, 7, 8] and memit.lam == 15000.0
    t = memit.target
    assert (t.lr, t.steps, t.kl_factor, t.clamp_norm_factor, t.weight_decay) == (
        0.5, 25, 0.0625, 0.75, 0.5)
    # zjunlp/EasyEdit hparams/MEMIT/llama-7b.yaml and hparams/PMET/llama-7b.yaml
    m = instantiate(compose(["method=memit", "model=llama2"]).method, _convert_="all")
    assert (m.layers, m.lam, m.target.steps, m.target.clamp_norm_factor,
            m.target.weight_decay) == ([4, 5, 6, 7, 8], 15000.0, 25, 4.0, 1e-3)
    p = instantiate(compose(["method=pmet", "model=llama2"]).method, _convert_="all")
    assert (p.layers, p.lam, p.target.steps, p.target.clamp_norm_factor,
            p.target.weight_decay) == ([4, 5, 6, 7, 8], 15000.0, 20, 1.0, 0.5)
    # PMET's compute_zs.py down-weights the NLL (x 0.1) once the new object is the argmax
    # everywhere and then stops at kl_factor * KL <= 0.01, for every model; so does AdaPLE
    # (PMET's targets) on the paper's models. SmolLM2 and MEMIT keep the plain loss.
    for name in ("pmet", "adaple"):
        for model in ("gptj", "llama2", "neox20b"):
            t = instantiate(compose([f"method={name}", f"model={model}"]).method,
                            _convert_="all").target
            assert (t.argmax_nll_factor, t.argmax_kl_stop) == (0.1, 0.01), (name, model)
    # AdaPLE's files read PMET's (its authors released none): every setting PMET's file
    # sets is the same in AdaPLE's run.
    for model in ("gptj", "llama2", "neox20b"):
        a, p = (OmegaConf.to_container(compose([f"method={n}", f"model={model}"]).method,
                                       resolve=True) for n in ("adaple", "pmet"))
        assert (a["layers"], a["lam"], a["target"]) == (p["layers"], p["lam"], p["target"])
    for over in (["method=pmet", "model=smollm2"], ["method=memit", "model=llama2"]):
        t = instantiate(compose(over).method, _convert_="all").target
        assert (t.argmax_nll_factor, t.argmax_kl_stop) == (1.0, None), over
    # jianghoucheng/AlphaEdit hparams/AlphaEdit/EleutherAI_gpt-j-6B.json
    a = instantiate(compose(["method=alphaedit", "model=gptj"]).method, _convert_="all")
    assert (a.nullspace_threshold, a.l2, a.target.lr) == (2e-2, 10.0, 0.5)
    # SmolLM2 keeps its measured settings for every method.
    base = compose(["model=smollm2"]).model.edit
    for name in ("memit", "pmet", "adaple", "alphaedit"):
        cfg = compose([f"method={name}", "model=smollm2"])
        assert cfg.model.edit == base, name
    assert instantiate(compose(["method=alphaedit"]).method,
                       _convert_="all").nullspace_threshold == 1e-2


def test_paper_models_edit_in_the_reference_precision(compose: Compose) -> None:
    # GPT-J and Llama-2 in float32 as the reference code loads them; NeoX-20B in float16.
    dtypes = {m: compose([f"model={m}"]).model.dtype for m in ("gptj", "llama2", "neox20b")}
    assert dtypes == {"gptj": "float32", "llama2": "float32", "neox20b": "float16"}


def test_adaple_defaults_to_algorithm1_with_layer_scoped_drop_rescale(compose: Compose) -> None:
    # `python -m kaedit.run model=llama2 method=adaple fusion.p=0.8` runs Algorithm 1.
    cfg = compose(["model=llama2", "method=adaple", "fusion.p=0.8"])
    assert instantiate(cfg.method, _convert_="all").objective == "algorithm1"
    fusion = instantiate(cfg.fusion)
    assert (type(fusion).__name__, fusion.p, fusion.scope) == ("DropRescale", 0.8, "layer")
    assert fusion.layer_fusion(0, 1) is not None
    # the ablation of the scope, and the other methods' default (step)
    assert instantiate(compose(["method=adaple", "fusion.scope=step"]).fusion).scope == "step"
    assert instantiate(compose(["method=memit"]).fusion).scope == "step"
    # stateful fusions stay step-scoped with AdaPLE (no error) ...
    for name in ("average", "lookahead", "wise_ft"):
        assert instantiate(compose(["method=adaple", f"fusion={name}"]).fusion).scope == "step"


@pytest.mark.parametrize("fusion", ["average", "lookahead", "wise_ft"])
def test_layer_scope_for_a_stateful_fusion_is_a_config_error(compose: Compose,
                                                             fusion: str) -> None:
    from kaedit.setup import build

    with pytest.raises(ConfigError, match=r"fusion.scope='layer'.*valid: \['step'\]"):
        build(compose([f"fusion={fusion}", "fusion.scope=layer"]).fusion)
    with pytest.raises(ConfigError, match=r"fusion.scope='tensor'.*\['step', 'layer'\]"):
        build(compose(["fusion.scope=tensor"]).fusion)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("model", MODELS)
def test_every_method_instantiates_for_every_model(
    compose: Compose, model: str, method: str
) -> None:
    # Binding checks key names; building the method also checks nested settings and values.
    cfg = compose([f"model={model}", f"method={method}"])
    assert isinstance(instantiate(cfg.method, _convert_="all"), EditMethod)


@pytest.mark.parametrize("fusion", FUSIONS)
def test_every_fusion_instantiates(compose: Compose, fusion: str) -> None:
    assert isinstance(instantiate(compose([f"fusion={fusion}"]).fusion), FusionStrategy)


def test_memit_reads_the_model_edit_settings(compose: Compose) -> None:
    cfg = compose(["model=gptj", "method=memit"])
    method = instantiate(cfg.method, _convert_="all")
    assert method.layers == [3, 4, 5, 6, 7, 8] and method.lam == 15000.0
    assert method.target == TargetConfig(**cfg.model.edit.target)


def test_logger_options_list_trackers(compose: Compose) -> None:
    assert OmegaConf.to_container(compose(["logger=none"]).logger) == {}
    assert set(compose(["logger=csv"]).logger) == {"csv"}
    assert set(compose(["logger=wandb"]).logger) == {"csv", "wandb"}


@pytest.mark.parametrize(
    "override", ["+fusion.q=0.5", "+model.load.dtyp=float16", "+logger.csv.file_name=x.csv"]
)
def test_typo_in_a_target_node_fails_binding(compose: Compose, override: str) -> None:
    resolved = OmegaConf.to_container(compose(["logger=csv", override]), resolve=True)
    key = override.split("=")[0].rsplit(".", 1)[1]
    with pytest.raises(TypeError, match=f"unexpected keyword argument '{key}'"):
        for path, node in targets(resolved):
            bind(path, node)


def test_typo_in_edit_target_is_named_with_the_valid_settings(compose: Compose) -> None:
    # Methods read model.edit.target field by field (conf/method_base/target.yaml), so a
    # misspelt field would be read by none of them: the setup layer names it.
    cfg = compose(["model=tiny_llama", "+model.edit.target.clamp_norm=2.0"])
    with pytest.raises(ConfigError, match=r"model\.edit\.target\.clamp_norm is not a target "
                       r"setting; valid: \[.*'clamp_norm_factor'"):
        effective_config(cfg)
    cfg = compose(["model=tiny_llama", "+method.target.clamp_norm=2.0"])
    with pytest.raises(InstantiationException, match="unexpected keyword argument 'clamp_norm'"):
        instantiate(cfg.method, _convert_="all")


def test_method_base_target_lists_every_target_setting_with_its_default() -> None:
    # One line per TargetConfig field, falling back to the dataclass's own default: the
    # forwarding file and the dataclass cannot drift apart.
    node = OmegaConf.load(CONF / "method_base" / "target.yaml")
    fields = {f.name: f.default for f in dataclasses.fields(TargetConfig)}
    assert list(node) == list(fields)
    resolved = OmegaConf.to_container(OmegaConf.create({"t": node}), resolve=True)["t"]
    assert resolved == fields


@pytest.mark.parametrize("method", ["memit", "pmet", "adaple", "alphaedit", "encore", "rome"])
def test_model_edit_target_reaches_every_field_a_method_leaves_alone(
        compose: Compose, method: str) -> None:
    # GPT-J has reference files for PMET, AdaPLE and AlphaEdit; none sets these two
    cfg = compose([f"method={method}", "model=gptj", "++model.edit.target.kl_position=last",
                   "++model.edit.target.early_stop_loss=0.01"])
    assert cfg.method.target.kl_position == "last" and cfg.method.target.early_stop_loss == 0.01


def test_no_hparams_file_changes_the_models_defaults() -> None:
    # conf/hparams/<method>_<model>.yaml is the one home of a method's per-model settings:
    # it writes under method.* (and may add a module path, a fact of the model), never
    # model.edit, so a model's config is the same whatever the method.
    for f in sorted((CONF / "hparams").glob("*.yaml")):
        node = OmegaConf.load(f)
        assert "edit" not in node.get("model", {}), f.name
        assert set(node) <= {"defaults", "method", "model"}, f.name
        assert set(node.get("model", {})) <= {"modules"}, f.name
        # a file may read another model's-method file (AdaPLE's read PMET's), nothing else
        for entry in node.get("defaults", []):
            assert entry == "_self_" or (CONF / "hparams" / f"{entry}.yaml").is_file(), f.name


@pytest.mark.parametrize(("override", "setting"), [
    ("++model.edit.target.lr=0.3", "method.target.lr=0.3"),   # PMET's GPT-J file: lr 0.2
    ("model.edit.layers=[1,2]", "method.layers=[1, 2]"),       # ... and layers 3-8
])
def test_model_edit_override_a_reference_file_replaces_is_an_error(
        compose: Compose, override: str, setting: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(setting)):
        compose(["method=pmet", "model=gptj", override])
    # the same override reaches MEMIT, which has no GPT-J file of its own
    compose(["method=memit", "model=gptj", override])


def _kaedit_run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "KAEDIT_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "kaedit.run", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_cli_prints_config_without_loading(tmp_path: Path) -> None:
    proc = _kaedit_run(
        tmp_path,
        "--cfg",
        "job",
        "model=llama2",
        "method=memit",
        "fusion=drop_rescale",
        "fusion.p=0.8",
    )
    assert proc.returncode == 0, proc.stderr
    assert "p: 0.8" in proc.stdout
    assert "meta-llama/Llama-2-7b-hf" in proc.stdout
    assert "_target_: kaedit.fusion.DropRescale" in proc.stdout
    # Nothing was loaded, cached or written.
    assert list(tmp_path.iterdir()) == []


def test_cli_unknown_option_lists_available(tmp_path: Path) -> None:
    proc = _kaedit_run(tmp_path, "--cfg", "job", "method=nonexistent")
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "nonexistent" in out
    assert "Available options" in out and "memit" in out


def test_config_dir_is_the_repo_conf() -> None:
    # Every entry point gives Hydra kaedit.paths.CONF_DIR: the same dir the tests compose.
    from kaedit.paths import CONF_DIR

    assert CONF_DIR.resolve() == CONF.resolve()


@pytest.mark.parametrize("method", METHODS)
def test_every_method_declares_the_layers_it_edits(compose: Compose, method: str) -> None:
    # The runner checks `method.layers` against the model, whatever the method's config
    # calls its layer setting (ROME: `layer`; MEND: none, its checkpoint names the weights).
    cfg = compose(["model=tiny_llama", f"method={method}"])
    built = instantiate(cfg.method, _convert_="all")
    expected = {"rome": [cfg.model.edit.rome_layer], "mend": []}.get(
        method, cfg.method.get("layers")
    )
    assert [int(x) for x in built.layers] == [int(x) for x in expected]


def test_train_mend_defaults_are_the_config_file() -> None:
    # One source of truth: TrainConfig() trains as conf/train_mend.yaml says.
    from kaedit.setup import compose as compose_config
    from kaedit.train_mend import TrainConfig, train_config

    assert train_config(compose_config([], "train_mend").train) == TrainConfig()
