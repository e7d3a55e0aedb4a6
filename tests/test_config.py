"""Every config option composes, and every ``_target_`` binds its signature (no model loads)."""

from __future__ import annotations

import inspect
import os
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
from kaedit.fusion import FusionStrategy
from kaedit.methods.base import EditMethod
from kaedit.methods.core import TargetConfig
from kaedit.schedule import Schedule

# conf/hydra/ holds Hydra's own groups (hydra/launcher), tested in test_experiments.py
GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir() and p.name != "hydra")
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


def test_typo_in_edit_target_fails_to_instantiate(compose: Compose) -> None:
    cfg = compose(["model=tiny_llama", "+model.edit.target.clamp_norm=2.0"])
    with pytest.raises(InstantiationException, match="unexpected keyword argument 'clamp_norm'"):
        instantiate(cfg.method, _convert_="all")


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
    expected = {"rome": [cfg.model.edit.rome_layer], "mend": []}.get(method, cfg.method.get("layers"))
    assert [int(x) for x in built.layers] == [int(x) for x in expected]


def test_train_mend_defaults_are_the_config_file() -> None:
    # One source of truth: TrainConfig() trains as conf/train_mend.yaml says.
    from kaedit.setup import compose as compose_config
    from kaedit.train_mend import TrainConfig, train_config

    assert train_config(compose_config([], "train_mend").train) == TrainConfig()
