"""Causal tracing (issue 8): restoration mechanics on tiny models, position classes, AIE
tables, the layer recommendation, ``from_trace:`` resolution and the CLI; one SmolLM2 test.
"""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf

from conftest import FORWARD_REL, REPO, Compose, assert_close_to_scale, load_tiny
from kaedit import trace as T
from kaedit.errors import ConfigError
from kaedit.hooks import count_hooks, edit_outputs, get_module
from kaedit.models import LoadedModel, ModelLoadError
from kaedit.records import EditRequest
from kaedit.setup import compose as compose_config

REQUEST = EditRequest(
    case_id="7",
    subject="Danielle Darrieux",
    prompt="The mother tongue of {} is",
    target_new="English",
    target_true="French",
)


def compose_trace(cache_dir: Path, overrides=()):
    return compose_config([f"cache_dir={cache_dir}", *overrides], "trace")


# ----------------------------------------------------------------------------- positions
def test_position_classes_on_hand_made_prompts() -> None:
    # "The mother tongue of [Dan ielle D arr ieux] is": 10 tokens, subject 4..8.
    assert T.position_classes(10, 4, 8) == {
        "first_subject": (4,),
        "middle_subject": (5, 6, 7),
        "last_subject": (8,),
        "first_after": (9,),
        "further": (),
        "last": (9,),
    }
    # "[Toyota] is located in the country of": a one-token subject is first and last.
    assert T.position_classes(7, 0, 0) == {
        "first_subject": (0,),
        "middle_subject": (),
        "last_subject": (0,),
        "first_after": (1,),
        "further": (2, 3, 4, 5),
        "last": (6,),
    }
    # A prompt ending with its subject has no subsequent token.
    classes = T.position_classes(5, 3, 4)
    assert classes["first_after"] == () and classes["last"] == (4,)
    with pytest.raises(ValueError, match="do not fit"):
        T.position_classes(5, 3, 5)


def test_encode_prompt_locates_the_subject(compose: Compose) -> None:
    lm = load_tiny(compose, "tiny_llama")  # byte-level tokenizer: one token per byte
    p = T.encode_prompt(lm.tokenizer, REQUEST)
    text = "The mother tongue of Danielle Darrieux is"
    assert p.text == text and p.n_tokens == len(text)
    assert (p.subject_first, p.subject_last) == (21, 21 + len("Danielle Darrieux") - 1)
    assert p.target == lm.tokenizer(" French", add_special_tokens=False)["input_ids"][0]


def test_window_layers_follow_rome() -> None:
    assert list(T.window_layers(15, 30, 10)) == list(range(10, 20))
    assert list(T.window_layers(0, 30, 10)) == [0, 1, 2, 3, 4]
    assert list(T.window_layers(29, 30, 10)) == list(range(24, 30))
    assert list(T.window_layers(7, 30, 1)) == [7]
    assert list(T.window_layers(7, 30, 3)) == [6, 7, 8]


# ----------------------------------------------------------------------------- mechanics
@pytest.fixture
def sharp(lm: LoadedModel) -> LoadedModel:
    """The tiny model with a 30x sharper output head, so corruption moves P(o) clearly (the
    random models' next-token distributions are otherwise almost uniform)."""
    with torch.no_grad():
        get_module(lm.model, lm.spec.lm_head).weight.mul_(30.0)
    return lm


def setup(lm: LoadedModel, samples: int = 4, std: float = 0.5):
    prompt = T.encode_prompt(lm.tokenizer, REQUEST)
    L = lm.spec.n_layers
    modules = [lm.spec.module(k, i) for k in T.KINDS.values() for i in range(L)]
    p_clean, states = T.clean_run(lm, prompt, modules)
    d = states[modules[0]].shape[-1]
    noise = T.subject_noise(prompt, samples, d, std, torch.Generator().manual_seed(1))
    return prompt, p_clean, states, noise, modules


def prob_rel(lm: LoadedModel, prompt) -> float:
    """Relative tolerance of a next-token probability from two float32 forwards that differ
    only in batching or caching: p = softmax(z)ₜ moves by δlog p = δzₜ − Σⱼ pⱼδzⱼ, at most
    2·max|δz|, and the logits of two such forwards differ by FORWARD_REL of their scale
    (here ~10: the sharp head), so 2·FORWARD_REL·max|z| at the prompt's last position.
    Corruption moves P(o) by > 5 % (asserted below), far above this."""
    with torch.no_grad():
        z = lm.model(input_ids=torch.tensor([prompt.ids])).logits[0, -1]
    return 2 * FORWARD_REL * float(z.abs().max())


def corrupted_reference(lm: LoadedModel, prompt, noise: torch.Tensor) -> float:
    """P*(o) computed directly: a full forward per noise sample, the logits from the model."""
    a, b = prompt.subject_first, prompt.subject_last + 1
    probs = []
    for s in range(noise.shape[0]):

        def add(h, s=s):
            h = h.clone()
            h[:, a:b] += noise[s]
            return h

        with torch.no_grad(), edit_outputs(lm.model, {lm.spec.module("embed"): add}):
            logits = lm.model(input_ids=torch.tensor([prompt.ids])).logits[0, -1]
        probs.append(torch.softmax(logits.float(), -1)[prompt.target].item())
    return float(np.mean(probs))


@pytest.mark.parametrize("reuse_prefix", [True, False])
def test_restoring_everything_recovers_clean_and_nothing_gives_corrupted(
    sharp: LoadedModel, reuse_prefix: bool
) -> None:
    lm = sharp
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    prompt, p_clean, states, noise, modules = setup(lm)
    n = prompt.n_tokens
    everything = frozenset((m, t) for m in modules for t in range(n))
    last_layer = lm.spec.module("layer", lm.spec.n_layers - 1)
    # the last layer's residual stream from the first subject token on (earlier tokens are
    # never corrupted): exercises the prefix cache
    last_from_subject = frozenset((last_layer, t) for t in range(prompt.subject_first, n))
    before_subject = frozenset((m, t) for m in modules for t in range(prompt.subject_first))
    got = T.restored_probs(
        lm,
        prompt,
        noise,
        states,
        [frozenset(), everything, last_from_subject, before_subject],
        batch_size=8,
        reuse_prefix=reuse_prefix,
    )
    p_corrupted = corrupted_reference(lm, prompt, noise)
    assert abs(p_corrupted - p_clean) > 0.05 * p_clean  # the noise matters
    rel = prob_rel(lm, prompt)
    assert got[0].item() == pytest.approx(p_corrupted, rel=rel)
    assert got[1].item() == pytest.approx(p_clean, rel=rel)
    assert got[2].item() == pytest.approx(p_clean, rel=rel)
    assert got[3].item() == pytest.approx(p_corrupted, rel=rel)
    assert count_hooks(lm.model) == 0
    assert all(torch.equal(v, before[k]) for k, v in lm.model.state_dict().items())


def test_prefix_cache_and_batching_change_nothing(sharp: LoadedModel) -> None:
    lm = sharp
    prompt, _, states, noise, modules = setup(lm, samples=3)
    rng = random.Random(0)
    restorations = [
        frozenset(
            (rng.choice(modules), rng.randrange(prompt.n_tokens)) for _ in range(rng.randint(1, 4))
        )
        for _ in range(25)
    ]
    full = T.restored_probs(lm, prompt, noise, states, restorations, 10_000, reuse_prefix=False)
    cached = T.restored_probs(lm, prompt, noise, states, restorations, 3, reuse_prefix=True)
    # reused key/value cache and other batch sizes: float32 blocked differently; each
    # probability is off by ≤ prob_rel of itself, so of the largest one
    assert_close_to_scale(cached, full, rel=prob_rel(lm, prompt), msg="restored P(true)")
    assert full.std() > 0  # the restorations differ


def test_bad_restoration_is_refused(sharp: LoadedModel) -> None:
    prompt, _, states, noise, modules = setup(sharp, samples=2)
    with pytest.raises(ValueError, match="out of range"):
        T.restored_probs(sharp, prompt, noise, states, [frozenset({(modules[0], prompt.n_tokens)})])


def test_trace_record_fills_every_traced_token(sharp: LoadedModel) -> None:
    lm = sharp
    prompt = T.encode_prompt(lm.tokenizer, REQUEST)
    settings = T.TraceSettings(samples=2, window=3)
    rec = T.trace_record(lm, prompt, settings, 0.5, torch.Generator().manual_seed(0))
    assert rec.restored.shape == (3, lm.spec.n_layers, prompt.n_tokens)
    assert np.isnan(rec.restored[:, :, : prompt.subject_first]).all()
    assert np.isfinite(rec.restored[:, :, prompt.subject_first :]).all()
    # the last layer's residual stream at the last token carries the whole clean output
    assert rec.restored[0, -1, -1] == pytest.approx(rec.p_clean, rel=prob_rel(lm, prompt))
    again = T.trace_record(lm, prompt, settings, 0.5, torch.Generator().manual_seed(0))
    assert np.array_equal(rec.restored, again.restored, equal_nan=True)  # seeded


# ----------------------------------------------------------------------------- tables
def fake_trace(
    case_id: str, n: int, first: int, last: int, p_corrupted: float, restored: np.ndarray
) -> T.RecordTrace:
    prompt = T.Prompt(case_id, "x", tuple(range(n)), first, last, 0, "o")
    return T.RecordTrace(prompt, 0.9, p_corrupted, tuple(T.KINDS), restored)


def test_aie_table_averages_record_tokens_per_class() -> None:
    n_layers = 2
    a = np.full((3, n_layers, 5), np.nan)
    a[:, :, 1:] = 0.1 * np.arange(1, 5)  # tokens 1..4: P 0.1, 0.2, 0.3, 0.4
    b = np.full((3, n_layers, 4), np.nan)
    b[:, :, :] = 0.5  # one-token subject at 0
    traces = [fake_trace("a", 5, 1, 2, 0.05, a), fake_trace("b", 4, 0, 0, 0.1, b)]
    aie = T.aie_table(T.restored_table(traces)).set_index(["kind", "layer", "position"])
    row = aie.loc[("mlp", 1, "last_subject")]
    # record a: token 2 (IE 0.2 - 0.05); record b: token 0 (0.5 - 0.1)
    assert row["aie"] == pytest.approx(((0.2 - 0.05) + 0.4) / 2)
    assert (row["count"], row["records"]) == (2, 2)
    further = aie.loc[("attn", 0, "further")]  # a: none (4 is the last); b: tokens 2
    assert (further["aie"], further["count"]) == (pytest.approx(0.4), 1)
    assert aie.loc[("residual", 0, "first_subject"), "aie"] == pytest.approx((0.05 + 0.4) / 2)
    assert ("residual", 0, "middle_subject") not in aie.index  # no middle tokens anywhere
    grid = T.aie_grid(aie.reset_index(), "mlp", n_layers)
    assert grid.shape == (6, 2) and np.isnan(grid[1]).all()


def synthetic_aie(peak: int, n_layers: int = 30) -> pd.DataFrame:
    rows = []
    for kind in T.KINDS:
        for pos in T.POSITIONS:
            for layer in range(n_layers):
                value = 0.01
                if (kind, pos) == ("mlp", "last_subject"):
                    value = 0.1 - 0.01 * abs(layer - peak)
                elif (kind, pos) == ("mlp", "last"):
                    value = 0.5 if layer == 25 else 0.0  # larger, but not the subject token
                elif kind == "residual":
                    value = 0.9
                rows.append(
                    {
                        "kind": kind,
                        "layer": layer,
                        "position": pos,
                        "aie": value,
                        "sem": 0.0,
                        "count": 1,
                        "records": 1,
                    }
                )
    return pd.DataFrame(rows)


def test_recommendation_is_the_window_ending_at_max_mlp_aie_last_subject() -> None:
    rec = T.recommend(synthetic_aie(8), "m", 30, 5)
    assert (rec.layer, rec.layers, rec.aie) == (8, [4, 5, 6, 7, 8], pytest.approx(0.1))
    assert "edit:\n  layers: [4, 5, 6, 7, 8]\n" in rec.snippet()
    assert OmegaConf.create(rec.snippet()).edit.layers == [4, 5, 6, 7, 8]  # valid YAML
    assert T.recommend(synthetic_aie(2), "m", 30, 5).layers == [0, 1, 2]  # clipped at 0
    assert T.recommend(synthetic_aie(20), "m", 30, 3).layers == [18, 19, 20]
    flat = synthetic_aie(8).assign(aie=0.3)
    assert T.recommend(flat, "m", 30, 2).layer == 0  # ties: the lowest layer
    with pytest.raises(ConfigError, match="mlp"):
        T.recommend(synthetic_aie(8).query("kind != 'mlp'"), "m", 30, 5)


# ----------------------------------------------------------------------------- from_trace
def write_recommendation(run_dir: Path, model: str, layer: int, layers: list[int]) -> None:
    (run_dir / "trace").mkdir(parents=True)
    rec = T.Recommendation(model=model, n_layers=4, layer=layer, layers=layers, aie=0.1)
    (run_dir / "trace" / "recommendation.json").write_text(json.dumps(rec.__dict__))


def test_from_trace_resolves_method_layers(compose: Compose, tmp_path: Path) -> None:
    write_recommendation(tmp_path / "tr", "tiny_llama", 3, [2, 3])
    cfg = compose(["model=tiny_llama", f"method.layers=from_trace:{tmp_path / 'tr'}"])
    out = T.resolve_from_trace(cfg)
    assert list(out.method.layers) == [2, 3]  # len(model.edit.layers) = 2 layers ending at 3
    assert cfg.method.layers.startswith("from_trace:")  # the input is left alone
    three = compose(
        [
            "model=tiny_llama",
            "model.edit.layers=[0,1,2]",
            f"method.layers=from_trace:{tmp_path / 'tr'}",
        ]
    )
    assert list(T.resolve_from_trace(three).method.layers) == [1, 2, 3]
    # model.edit.layers itself: the methods' ${model.edit.layers} follow; its own length
    both = compose(["model=tiny_llama", f"model.edit.layers=from_trace:{tmp_path / 'tr'}"])
    resolved = T.resolve_from_trace(both)
    assert list(resolved.model.edit.layers) == [2, 3] == list(resolved.method.layers)
    plain = compose(["model=tiny_llama"])
    assert T.resolve_from_trace(plain) is plain


def test_from_trace_errors_name_the_problem(compose: Compose, tmp_path: Path) -> None:
    missing = compose(["model=tiny_llama", f"method.layers=from_trace:{tmp_path / 'nope'}"])
    with pytest.raises(ConfigError, match=r"nope/trace/recommendation\.json.*does not exist"):
        T.resolve_from_trace(missing)
    write_recommendation(tmp_path / "other", "smollm2", 17, [13, 14, 15, 16, 17])
    wrong = compose(["model=tiny_llama", f"method.layers=from_trace:{tmp_path / 'other'}"])
    with pytest.raises(ConfigError, match=r"'smollm2'.*'tiny_llama'"):
        T.resolve_from_trace(wrong)


def test_runner_checks_the_traced_layers(compose: Compose, tiny_run_overrides, tmp_path: Path):
    from kaedit.experiment import run

    write_recommendation(tmp_path / "tr", "tiny_llama", 9, [8, 9])  # the model has 4 layers
    cfg = compose([*tiny_run_overrides, f"method.layers=from_trace:{tmp_path / 'tr'}"])
    with pytest.raises(ModelLoadError, match="edit layer 8 is out of range"):
        run(cfg, run_dir=str(tmp_path / "run"))


# ----------------------------------------------------------------------------- the run
def test_trace_run_writes_results_and_edits_with_them(
    cache_dir: Path, compose: Compose, tiny_dataset: Path, tiny_run_overrides, tmp_path: Path
) -> None:
    from kaedit.experiment import run

    cfg = compose_trace(
        cache_dir,
        [
            "model=tiny_llama",
            "logger=csv",
            "trace.select=all",
            "trace.n_records=3",
            "trace.samples=2",
            "trace.window=3",
            f"dataset.path='{tiny_dataset}'",
        ],
    )
    res = T.run(cfg, run_dir=str(tmp_path / "tr"))
    out = tmp_path / "tr" / "trace"
    for name in (
        "aie.csv",
        "records.csv",
        "restored.csv",
        "recommendation.json",
        "heatmap_residual.png",
        "heatmap_mlp.png",
        "heatmap_attn.png",
        "aie_by_layer.png",
        "metrics.csv",
        "summary.json",
    ):
        assert (out / name).is_file(), name
    aie = pd.read_csv(out / "aie.csv")
    assert list(aie.columns) == ["kind", "layer", "position", "aie", "sem", "count", "records"]
    assert set(aie["kind"]) == set(T.KINDS) and set(aie["layer"]) == set(range(4))
    records = pd.read_csv(out / "records.csv")
    assert list(records["case_id"]) == [0, 1, 2]
    restored = pd.read_csv(out / "restored.csv")
    traced = (records["n_tokens"] - records["subject_first"]).sum()
    assert len(restored) == 3 * 4 * traced
    rec = json.loads((out / "recommendation.json").read_text())
    assert rec["layers"] == T.edit_window(rec["layer"], 2) == res.recommendation.layers
    assert rec["model"] == "tiny_llama" and rec["n_records"] == 3
    assert len(pd.read_csv(out / "metrics.csv")) == 4  # one row per layer

    edit = run(
        compose([*tiny_run_overrides, f"method.layers=from_trace:{tmp_path / 'tr'}"]),
        run_dir=str(tmp_path / "edit"),
    )
    assert edit["edits_done"] == 6
    saved = OmegaConf.load(tmp_path / "edit" / "config.yaml")
    assert list(saved.method.layers) == rec["layers"]


@pytest.mark.parametrize(
    "override, words",
    [
        ("trace.kinds=[mlp,foo]", ["foo", "residual", "attn"]),
        ("trace.select=some", ["some", "known", "all"]),
        ("trace.samples=0", ["trace.samples=0"]),
    ],
)
def test_bad_settings_fail_with_one_line(tmp_path: Path, override: str, words) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "kaedit.trace",
            "model=tiny_llama",
            "logger=csv",
            override,
            f"cache_dir={tmp_path / 'cache'}",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    errors = [line for line in out.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and "Traceback" not in out, out
    assert all(w in errors[0] for w in words), errors[0]
    assert not (tmp_path / "run" / "trace").exists()


def test_cli_composes_the_trace_config(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "kaedit.trace",
            "--cfg",
            "job",
            "model=smollm2",
            "dataset=counterfact",
            "trace.n_records=60",
            "trace.window=5",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    cfg = OmegaConf.create(proc.stdout)
    assert cfg.trace.n_records == 60 and cfg.trace.window == 5
    assert list(cfg.trace.kinds) == ["residual", "mlp", "attn"]
    assert cfg.model.name == "smollm2" and cfg.dataset.name == "counterfact"
    assert "wandb" in cfg.logger
    T.TraceSettings.from_config(cfg.trace)  # every key is a setting
    assert list(tmp_path.iterdir()) == []  # nothing loaded or written


def test_settings_reject_unknown_keys() -> None:
    with pytest.raises(ConfigError, match="sampels"):
        T.TraceSettings.from_config({"sampels": 3})
    assert T.TraceSettings(kinds="mlp").kinds == ("mlp",)  # trace.kinds=mlp
    with pytest.raises(ConfigError, match=re.escape("trace.n_edit_layers=0")):
        T.TraceSettings(n_edit_layers=0)
    with pytest.raises(ConfigError, match=re.escape("trace.noise=-1")):
        T.TraceSettings(noise=-1)


# ----------------------------------------------------------------------------- SmolLM2
@pytest.mark.slow
def test_smollm2_traces_known_facts(cache_dir: Path, tmp_path: Path) -> None:
    """Two known CounterFact records, 2 noise samples: the mechanics on the real model and
    the clean/corrupted gap ROME reports (noise on the subject destroys most of P(o))."""

    from kaedit import data
    from kaedit.setup import build_model, resolve_data_root

    torch.set_num_threads(1)
    # the tests' cache (the GGUF is dequantized into it once per session), never ~/.cache
    cfg = compose_trace(cache_dir, ["logger=csv"])
    resolve_data_root(cfg)
    lm = build_model(cfg)
    records = data.from_config(cfg.dataset, cache_dir=str(tmp_path))
    chosen = T.select_records(lm, records[:100], 2, "known")
    assert len(chosen) == 2
    prompts = [p for _, p in chosen]
    sigma = T.embedding_std(lm, prompts)
    assert 0.01 < sigma < 1.0
    p_known, top = T.next_token_probs(lm, prompts)
    assert top.all()

    prompt = prompts[0]
    modules = [lm.spec.module(k, i) for k in T.KINDS.values() for i in range(lm.spec.n_layers)]
    p_clean, states = T.clean_run(lm, prompt, modules)
    assert p_clean == pytest.approx(p_known[0], rel=1e-4)
    noise = T.subject_noise(prompt, 2, 576, 3 * sigma, torch.Generator().manual_seed(0))
    last = lm.spec.module("layer", lm.spec.n_layers - 1)
    rest = [
        frozenset(),
        frozenset((last, t) for t in range(prompt.n_tokens)),
        frozenset({(lm.spec.module("mlp_out", 3), prompt.subject_last)}),
    ]
    cached = T.restored_probs(lm, prompt, noise, states, rest, reuse_prefix=True)
    full = T.restored_probs(lm, prompt, noise, states, rest, reuse_prefix=False)
    # as in the tiny-model test, through SmolLM2's 30 layers (measured: 1.3e-6 of the
    # largest probability)
    assert_close_to_scale(cached, full, rel=1e-4, msg="restored P(true)")
    assert cached[0] < 0.5 * p_clean  # corrupted
    assert cached[1].item() == pytest.approx(p_clean, rel=1e-3)  # everything restored

    settings = T.TraceSettings(samples=2, kinds=("residual",))
    rec = T.trace_record(lm, prompts[1], settings, 3 * sigma, T.record_generator(0, 1))
    assert rec.p_corrupted < rec.p_clean
    # the residual stream at the last token and last layer is the whole clean prediction
    assert rec.restored[0, -1, -1] == pytest.approx(rec.p_clean, rel=1e-3)
    assert count_hooks(lm.model) == 0
