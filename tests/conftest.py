"""Shared fixtures: the real configs composed with Hydra, overridden down to tiny models.

Nothing here downloads anything or touches ``~/.cache``: the cache dir is a session tmp
dir, the tiny models (``conf/model/tiny_*.yaml``) are random with an in-memory byte
tokenizer, and the runner tests read a small dataset and corpus written below.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import hydra
import pytest
import torch
from omegaconf import DictConfig

from kaedit.experiment import compose as compose_config
from kaedit.models import LoadedModel, load_model

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
TINY_MODELS = ("tiny_llama", "tiny_gptj", "tiny_neox")

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the tiny models must never need the hub

Compose = Callable[[Sequence[str]], DictConfig]


def pytest_configure(config: pytest.Config) -> None:
    # Tiny models gain nothing from intra-op threads, and on a shared 2-core machine the
    # default thread pool makes every small matmul wait on the other process (~100x slower).
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache dir per test session (models, statistics, data): never ``~/.cache``."""
    return tmp_path_factory.mktemp("kaedit-cache")


@pytest.fixture(scope="session")
def compose(cache_dir: Path) -> Compose:
    """``compose([...overrides])`` -> the composed ``conf/config.yaml``, cache in tmp."""

    def _compose(overrides: Sequence[str] = ()) -> DictConfig:
        return compose_config([f"cache_dir={cache_dir}", *overrides])

    return _compose


def deltas_leaving_model_untouched(method, ctx, requests, expected_names: list[str]) -> dict:
    """The method contract: ``compute_deltas`` returns finite, non-zero float32 deltas named
    ``expected_names`` with their weights' shapes, and leaves every tensor of the model
    bit-identical and no hook behind. Returns the deltas."""
    from kaedit.hooks import count_hooks

    model = ctx.lm.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    deltas = method.compute_deltas(ctx, requests)
    params = dict(model.named_parameters())
    assert list(deltas) == expected_names
    for name, d in deltas.items():
        assert d.shape == params[name].shape
        assert d.dtype == torch.float32
        assert torch.isfinite(d).all() and d.abs().max() > 0
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert count_hooks(model) == 0
    return deltas


def assert_close_to_scale(actual: torch.Tensor, expected: torch.Tensor, rel: float,
                          msg: str = "") -> None:
    """``max|actual − expected| ≤ rel · max|expected|``: a normwise relative comparison.

    For float results reached along two mathematically equal code paths (batched vs one
    at a time, cached vs recomputed). The two differ by rounding, and by how much depends
    on the CPU's BLAS blocking, so an elementwise tolerance tuned on one machine fails on
    another as soon as an entry near zero picks up an error of the tensor's own scale.
    Rounding errors are bounded relative to the magnitude of the computation, so the
    bound is scaled by the largest entry; ``rel`` states how much the computation can
    grow float32's 6e-8 roundoff (long reductions, solves, an optimiser feeding its own
    errors back), and each caller says why it chose its value. A real bug (a wrong row, a
    missing term) moves entries by a sizeable fraction of the scale, far above the bound.
    """
    assert actual.shape == expected.shape, (actual.shape, expected.shape, msg)
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    scale = float(e.abs().max())
    err = float((a - e).abs().max())
    assert err <= rel * scale, (
        f"{msg}: max |difference| {err:.3g} > {rel:g} · max|expected| = {rel * scale:.3g} "
        f"(relative error {err / max(scale, 1e-300):.3g})"
    )


@contextlib.contextmanager
def memit_crashes_at_call(call: int, error: Exception | None = None) -> Iterator[None]:
    """Inside the block, MEMIT's ``compute_deltas`` raises ``error`` (default
    ``RuntimeError("simulated crash")``) on its ``call``-th call (a run dying mid-step);
    restored on exit."""
    from kaedit.methods.memit import MEMIT

    real, calls = MEMIT.compute_deltas, {"n": 0}

    def crashing(self, ctx, requests):
        calls["n"] += 1
        if calls["n"] == call:
            raise error if error is not None else RuntimeError("simulated crash")
        return real(self, ctx, requests)

    MEMIT.compute_deltas = crashing
    try:
        yield
    finally:
        MEMIT.compute_deltas = real


def load_tiny(compose: Compose, name: str) -> LoadedModel:
    cfg = compose([f"model={name}"])
    return load_model(cfg.model, lambda: hydra.utils.instantiate(cfg.model.load))


@pytest.fixture(params=TINY_MODELS)
def lm(request: pytest.FixtureRequest, compose: Compose) -> LoadedModel:
    """A freshly built tiny model (function scope: a test that breaks it breaks only itself)."""
    return load_tiny(compose, request.param)


# ----------------------------------------------------------------------------- tiny data
SUBJECTS = [
    ("Danielle Darrieux", "French", "English"),
    ("Toyota", "Japan", "Germany"),
    ("Pablo Picasso", "Spain", "Norway"),
    ("Mount Fuji", "Japan", "Chile"),
    ("Leonhard Euler", "Switzerland", "Canada"),
    ("The Nile", "Africa", "Asia"),
    ("Ludwig van Beethoven", "Germany", "Peru"),
    ("Nokia", "Finland", "Brazil"),
]


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Eight CounterFact records in EasyEdit's format (one paraphrase, one neighbour)."""
    rows = [
        {
            "case_id": i,
            "prompt": f"{subject} is located in",
            "subject": subject,
            "target_new": new,
            "ground_truth": true,
            "rephrase_prompt": f"Where is {subject}? It is in",
            "locality_prompt": "Berlin is located in",
            "locality_ground_truth": "Germany",
        }
        for i, (subject, true, new) in enumerate(SUBJECTS)
    ]
    path = tmp_path_factory.mktemp("data") / "tiny_counterfact.json"
    path.write_text(json.dumps(rows))
    return path


@pytest.fixture(scope="session")
def tiny_rome_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same eight facts in ROME's CounterFact layout, with attribute and generation
    prompts (fluency, consistency)."""
    rows = [
        {
            "case_id": i,
            "requested_rewrite": {
                "prompt": "{} is located in",
                "relation_id": "P17",
                "subject": subject,
                "target_new": {"str": new, "id": f"Q{100 + i}"},
                "target_true": {"str": true, "id": f"Q{200 + i}"},
            },
            "paraphrase_prompts": [f"Where is {subject}? It is in"],
            "neighborhood_prompts": ["Berlin is located in"],
            "attribute_prompts": [f"The capital of {new} is", f"People of {new} speak"],
            "generation_prompts": [f"{subject} is known for", f"{subject} is known for",
                                   f"The history of {subject}"],
        }
        for i, (subject, true, new) in enumerate(SUBJECTS)
    ]
    path = tmp_path_factory.mktemp("data") / "tiny_counterfact_rome.json"
    path.write_text(json.dumps(rows))
    return path


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """~15k characters of English-ish text for the key statistics."""
    words = [
        "the",
        "of",
        "and",
        "in",
        "a",
        "to",
        "was",
        "is",
        "for",
        "on",
        "as",
        "by",
        "with",
        "he",
        "at",
        "from",
        "his",
        "an",
        "were",
        "are",
        "which",
        "this",
        "also",
        "be",
    ]
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(" ".join(rng.choice(words) for _ in range(3000)))
    return path


@pytest.fixture(scope="session")
def tiny_run_overrides(tiny_dataset: Path, tiny_corpus: Path) -> list[str]:
    """Overrides that make ``conf/config.yaml`` a seconds-long run on tiny_llama."""
    return [
        "model=tiny_llama",
        "logger=csv",
        f"dataset.path='{tiny_dataset}'",
        f"stats.corpus=['{tiny_corpus}']",
        "stats.n_tokens=2000",
        "schedule.n_edits=6",
        "schedule.batch_size=3",
    ]
