"""ROME's generation protocol (top-k sampling, a fixed length with the prompt, seeded CPU
draws) and the protocol the runner reports in summary.json."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import Compose
from kaedit import experiment
from kaedit.evaluate import Generator, TextMetrics
from kaedit.models import LoadedModel

PROMPTS = ["The Eiffel Tower is in", "A", "Danielle Darrieux's mother tongue is", "A"]


def sampler(lm: LoadedModel, seed: int = 0, **kw) -> Generator:
    return Generator(lm, **{"max_new_tokens": None, "batch_size": 3, "decoding": "top_k",
                            "max_length": 40, "top_k": 5, "seed": seed, **kw})


def test_top_k_generations_have_roms_length_and_top_k_tokens(lm: LoadedModel) -> None:
    out = sampler(lm).token_ids(PROMPTS)
    tok = lm.tokenizer
    for prompt, ids in zip(PROMPTS, out, strict=True):
        p = tok(prompt)["input_ids"]
        # ROME's max_out_len: every generation is 40 tokens with its prompt (no early stop)
        assert len(ids) == 40 and list(ids[: len(p)]) == p
        with torch.no_grad():
            logits = lm.model(torch.tensor([ids])).logits[0].float()
        # each new token is one of the 5 most probable after its prefix (a single-sequence
        # forward here, a cached batched one in generate: only exact ties could reorder them)
        top = logits[len(p) - 1 : -1].topk(5, dim=-1).indices
        assert (top == torch.tensor(ids[len(p):])[:, None]).any(-1).all(), prompt


def test_top_k_draws_are_seeded_and_ignore_the_global_rng(lm: LoadedModel) -> None:
    torch.manual_seed(123)
    a = sampler(lm).token_ids(PROMPTS)
    torch.manual_seed(456)
    b = sampler(lm).token_ids(PROMPTS)
    assert a == b
    assert a[1] != a[3]  # a repeated prompt is sampled twice, as ROME does
    assert sampler(lm, seed=1).token_ids(PROMPTS) != a


def test_lengths_caps_and_bad_values(lm: LoadedModel) -> None:
    gen = sampler(lm, max_new_tokens=4)
    assert gen._new_tokens(10) == 4 and gen._new_tokens(38) == 2 and gen._new_tokens(50) == 0
    assert all(len(ids) == len(lm.tokenizer(p)["input_ids"]) + 4
               for p, ids in zip(PROMPTS, gen.token_ids(PROMPTS), strict=True))
    with pytest.raises(ValueError, match=r"generation.decoding='beam' is not one of"):
        Generator(lm, decoding="beam")
    with pytest.raises(ValueError, match="both null"):
        Generator(lm, max_new_tokens=None, max_length=None)


def test_protocols_are_named() -> None:
    rome = TextMetrics(lm=None)  # type: ignore[arg-type]  (no generation here)
    assert rome.protocol == "top_k(k=5, max_length=100, max_new_tokens=None, seed=0)"
    greedy = TextMetrics(lm=None, decoding="greedy", max_new_tokens=8)  # type: ignore[arg-type]
    assert greedy.protocol == "greedy(max_length=100, max_new_tokens=8)"


def test_summary_names_the_generation_protocol(compose: Compose, tiny_run_overrides: list[str],
                                               tiny_rome_dataset: Path, tmp_path: Path) -> None:
    cfg = compose([*tiny_run_overrides, f"dataset.path='{tiny_rome_dataset}'",
                   "generation.max_new_tokens=4", "seed=3"])
    assert cfg.generation.decoding == "top_k" and cfg.generation.max_length == 100
    summary = experiment.run(cfg, run_dir=str(tmp_path / "run"))
    assert summary["generation_protocol"] == "top_k(k=5, max_length=100, max_new_tokens=4, seed=3)"
