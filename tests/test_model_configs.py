"""conf/model/{gpt2xl,llama3_8b,qwen2_5_7b,mistral_7b}.yaml on tiny random models of the same
architecture and module names: compose, build, one edit with the config's settings."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from conftest import Compose, assert_close_to_scale

#: Each config's hub id and a tiny architecture of its family (transformers config kwargs),
#: with layers after the last edit layer (which must carry the subject to the prompt end).
TINY = {
    "gpt2xl": ("openai-community/gpt2-xl",
               {"model_type": "gpt2", "n_embd": 32, "n_inner": 64, "n_layer": 20,
                "n_head": 4, "n_positions": 512}),
    "llama3_8b": ("meta-llama/Meta-Llama-3-8B",
                  {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
                   "num_hidden_layers": 11, "num_attention_heads": 4, "num_key_value_heads": 2,
                   "max_position_embeddings": 512}),
    "qwen2_5_7b": ("Qwen/Qwen2.5-7B-Instruct",
                   {"model_type": "qwen2", "hidden_size": 32, "intermediate_size": 64,
                    "num_hidden_layers": 11, "num_attention_heads": 4, "num_key_value_heads": 2,
                    "max_position_embeddings": 512}),
    "mistral_7b": ("mistralai/Mistral-7B-v0.1",
                   {"model_type": "mistral", "hidden_size": 32, "intermediate_size": 64,
                    "num_hidden_layers": 11, "num_attention_heads": 4, "num_key_value_heads": 2,
                    "max_position_embeddings": 512}),
}
REQUEST = {"prompt": "{} plays the sport of", "subject": "LeBron James",
           "target_new": "football", "target_true": "basketball"}


def tiny_config(compose: Compose, name: str, corpus: Path, method: str, *extra: str):
    """The real config, its loader swapped for a random model of the same family."""
    cfg = compose([f"model={name}", f"method={method}", "fusion=add", "logger=none",
                   f"stats.corpus=['{corpus}']", "stats.n_tokens=2000",
                   "templates.specs=[[5,2]]", *extra])
    hub, arch = TINY[name]
    assert cfg.model.load.name_or_path == hub
    OmegaConf.update(cfg, "model.load", {"_target_": "kaedit.models.build_random", "seed": 0,
                                         "architecture": arch, "dtype": "float32",
                                         "device": "cpu", "device_map": None}, merge=False)
    return cfg


#: AlphaEdit's published (nullspace_threshold, L2) per model (conf/hparams/alphaedit_*.yaml
#: name the files): AlphaEdit's Llama3-8B.json, EasyEdit's gpt2-xl.yaml / qwen2.5-7b.yaml;
#: Mistral has none and takes Llama-3's.
ALPHAEDIT = {"gpt2xl": (2e-2, 10.0), "llama3_8b": (2e-2, 10.0), "qwen2_5_7b": (2e-2, 1.0),
             "mistral_7b": (2e-2, 10.0)}


@pytest.mark.parametrize("name", sorted(TINY))
def test_model_config_edits_a_tiny_model_of_its_architecture(
        name: str, compose: Compose, tiny_corpus: Path) -> None:
    from kaedit.editor import Editor

    # the published AlphaEdit settings bind to the method (the tiny models' key statistics
    # have no null space at 2e-2, so the edit below is MEMIT's with the config's settings)
    alpha = tiny_config(compose, name, tiny_corpus, "alphaedit")
    assert (float(alpha.method.nullspace_threshold), float(alpha.method.l2)) == ALPHAEDIT[name]
    cfg = tiny_config(compose, name, tiny_corpus, "memit")
    assert float(cfg.method.lam) == float(cfg.model.edit.lam)
    ed = Editor(cfg)
    layers = [int(x) for x in cfg.model.edit.layers]
    ed.lm.spec.check(ed.model, [*layers, int(cfg.model.edit.rome_layer)])  # every path
    before = {n: p.detach().clone() for n, p in ed.model.named_parameters()}
    done = ed.edit(REQUEST)
    assert done["applied"], done
    expected = {ed.lm.spec.weight("mlp_out", layer) for layer in layers}
    changed = {n for n, p in ed.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == expected


def test_gpt2_conv1d_rome_update_is_exact_at_the_key(compose: Compose, tiny_corpus: Path) -> None:
    """GPT-2's Conv1D stores W as [d_in, d_out]: ROME's Δ must make (W + Δ)k* = v* through
    the module itself (a Δ in the wrong orientation would not even have the weight's shape:
    c_proj is [64, 32] here)."""
    from kaedit.editor import Editor
    from kaedit.hooks import get_module
    from kaedit.methods.targets import TargetConfig

    cfg = tiny_config(compose, "gpt2xl", tiny_corpus, "rome", "method.target.steps=5")
    ed = Editor(cfg)
    assert ed.lm.spec.transposed == ("attn_out", "mlp_in", "mlp_out")
    req = ed.edit(REQUEST) and ed.requests[-1]
    ed.reset()
    method, layer = ed.method, int(cfg.model.edit.rome_layer)
    assert layer == 17 and isinstance(method.target, TargetConfig)
    torch.manual_seed(0)
    k, v = method.key_value(ed.lm, req, ed.ctx.templates)
    torch.manual_seed(0)
    deltas = method.compute_deltas(ed.ctx, [req])
    name = ed.lm.spec.weight("mlp_out", layer)
    assert deltas[name].shape == ed.model.get_parameter(name).shape == (64, 32)
    ed._weights.add(deltas)
    proj = get_module(ed.model, ed.lm.spec.module("mlp_out", layer))
    with torch.no_grad():
        out = proj(k)
    # ROME's closed form is exact at k*; float32 roundoff through one solve and matvec
    assert_close_to_scale(out, v, 1e-4, "(W + Δ) k* = v*")


def test_gpt2_starts_at_a_block_without_adding_positions_twice(
        compose: Compose, tiny_corpus: Path) -> None:
    """Issue 30 on GPT-2: the forward adds ``wpe`` to its ``inputs_embeds``; starting at a
    block from its cached input must not add the positions again (model.modules.pos_embed
    is zeroed while the blocks below are skipped)."""
    from dataclasses import replace

    from kaedit.editor import Editor
    from kaedit.tokens import block_inputs, final_hidden, pad

    ed = Editor(tiny_config(compose, "gpt2xl", tiny_corpus, "memit"))
    lm = ed.lm
    assert lm.spec.pos_embed == "transformer.wpe"
    ids, mask = pad([[5, 6, 7, 8, 9], [10, 11, 12]], lm.tokenizer.pad_token_id, lm.device)
    with torch.no_grad():
        full = final_hidden(lm.model, lm.spec, ids, mask)
        block_in = block_inputs(lm.model, lm.spec, 13, ids, mask)
        started = final_hidden(lm.model, lm.spec, ids, mask, start=13, block_input=block_in)
        twice = final_hidden(lm.model, replace(lm.spec, pos_embed=""), ids, mask, start=13,
                             block_input=block_in)
    # the same blocks on the same inputs; float32 rounding of the scale at most
    assert_close_to_scale(started, full, 1e-5, "from block 13")
    assert not torch.allclose(twice, full, rtol=1e-3, atol=1e-3)  # wpe added twice
