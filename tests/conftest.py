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
from typing import Any

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


@pytest.fixture(scope="session", autouse=True)
def torch_threads() -> int:
    """torch's intra-op thread count for the session: ``KAEDIT_TEST_THREADS`` when set,
    else the 1 of :func:`pytest_configure`.

    CI runs the numeric tests a second time under another thread count, which changes
    BLAS reduction order: a tolerance that only holds for one summation order fails there.
    Subprocesses (``python -m kaedit.run`` in the CLI tests) keep their own default."""
    threads = os.environ.get("KAEDIT_TEST_THREADS")
    if threads:
        torch.set_num_threads(int(threads))
    return torch.get_num_threads()


# ------------------------------------------------------------------ numeric tolerances
#: float32's unit roundoff u = 2⁻²⁴ ≈ 6e-8 (half of ``torch.finfo(torch.float32).eps``):
#: rounding a real x to float32 moves it by at most u·|x|.
U32 = 2.0**-24
#: float64's unit roundoff, 2⁻⁵³ ≈ 1.1e-16.
U64 = 2.0**-53


#: ``rel`` of :func:`assert_close_to_scale` for two float32 forwards of a tiny model
#: (``conf/model/tiny_*.yaml``: 4 blocks, widths 32 and 64) that differ only in batching,
#: padding, chunking or matmul shapes, i.e. in summation order. A product of inner length
#: n rounds by ~√n·u of its result's scale when its terms have random signs (Higham &
#: Mary 2019's probabilistic bound; the worst case γₙ assumes every rounding aligned):
#: ≤ √64·u ≈ 5e-7 here. ~4 products a block over 4 blocks, independent errors adding in
#: quadrature, give ≈ 2e-6 of the hidden states' scale; 1e-5 leaves 5× for the maximum
#: over entries and the norms' and softmaxes' own roundings. A wrong row, position, mask
#: or missing term moves entries by a sizeable fraction of the scale.
FORWARD_REL = 1e-5


def csv_rel(digits: int = 6, roundings: int = 1) -> float:
    """Relative error of a number written with ``digits`` significant digits (``%.6g``,
    ``f"{v:.6g}"``, pandas ``float_format="%.4g"``) and read back, ``roundings`` times
    independently (e.g. two CSVs rounding two slightly different values).

    A value x in [10ᵏ, 10ᵏ⁺¹) printed with d significant digits is rounded to a multiple
    of 10ᵏ⁻ᵈ⁺¹, so it moves by at most half of that, ½·10ᵏ⁻ᵈ⁺¹ ≤ ½·10¹⁻ᵈ·|x| (and the
    rounded value is ≥ 10ᵏ too, so the bound holds relative to either side): 5e-6 for
    ``.6g``, 5e-4 for ``.4g``. Reading the decimal back adds one float64 rounding (u₆₄);
    4·u₆₄ per rounding is left for that and for pytest.approx's own arithmetic."""
    return roundings * (0.5 * 10.0 ** (1 - digits) + 4 * U64)


def csv_approx(value: Any, digits: int = 6, roundings: int = 1, extra_rel: float = 0.0):
    """``pytest.approx(value)`` at the precision a CSV keeps (:func:`csv_rel`).

    For comparing a number read from a CSV written with ``digits`` significant digits
    (metrics.csv, retention.csv: ``f"{v:.6g}"`` in kaedit.tracking; summary.csv,
    results.csv, paired*.csv, topk.csv, aie.csv: ``float_format="%.6g"``) with the same
    number at full precision. pytest.approx's default rel=1e-6 is tighter than the 5e-6 a
    ``.6g`` print can be off, so it passes or fails depending on where the rounding lands
    (issue 25). ``roundings=2`` when each side went through its own print of values that
    may differ in their last bits; ``extra_rel`` adds the error of a float32 computation
    when the full-precision side reaches the value along another code path (each caller
    derives it). A wrong value (a wrong step, column or formula) is off by far more than
    a few units in the 6th digit."""
    return pytest.approx(value, rel=csv_rel(digits, roundings) + extra_rel, abs=1e-12)


def gamma(n: int, u: float = U32) -> float:
    """γₙ = n·u / (1 − n·u): the bound on the relative error of n floating-point
    operations in a row (Higham, *Accuracy and Stability of Numerical Algorithms*, §3.1)."""
    assert n * u < 1, (n, u)
    return n * u / (1 - n * u)


def product_roundoff(a: torch.Tensor, b: torch.Tensor, u: float = U32) -> torch.Tensor:
    """Elementwise bound on |fl(a @ b) − a @ b| for a product computed in precision ``u``:
    γₙ·(|a| @ |b|), n the inner dimension (Higham §3.5, eq. 3.13).

    It holds for every summation order, blocking, FMA use and thread count, i.e. on every
    CPU and BLAS, and it is relative to the magnitude of the terms summed, not to the
    result: the right scale where the result cancels (a residual, a near-zero entry)."""
    n = a.shape[-1]
    return gamma(n, u) * (a.detach().double().abs() @ b.detach().double().abs())


def assert_within(actual: torch.Tensor, expected: torch.Tensor, bound: torch.Tensor | float,
                  msg: str = "") -> None:
    """``|actual − expected| ≤ bound`` elementwise, ``bound`` a rounding-error bound
    derived from the computation (e.g. :func:`product_roundoff`) rather than a tolerance."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape, msg)
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    bound = torch.as_tensor(bound, dtype=torch.float64).cpu()
    excess = (a - e).abs() - bound
    worst = int(excess.argmax()) if excess.numel() else 0
    assert excess.numel() == 0 or float(excess.max()) <= 0, (
        f"{msg}: |difference| {float((a - e).abs().flatten()[worst]):.3g} exceeds its "
        f"rounding bound {float(bound.expand_as(a).flatten()[worst]):.3g} at flat index {worst}"
    )


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
def crashes_at_call(method: type, call: int, error: Exception | None = None) -> Iterator[None]:
    """Inside the block, ``method.compute_deltas`` (a method class: MEMIT, AlphaEdit, ...)
    raises ``error`` (default ``RuntimeError("simulated crash")``) on its ``call``-th call
    (a run dying mid-step, after earlier steps were committed and checkpointed); restored
    on exit."""
    real, calls = method.compute_deltas, {"n": 0}

    def crashing(self, ctx, requests):
        calls["n"] += 1
        if calls["n"] == call:
            raise error if error is not None else RuntimeError("simulated crash")
        return real(self, ctx, requests)

    method.compute_deltas = crashing
    try:
        yield
    finally:
        method.compute_deltas = real


def memit_crashes_at_call(call: int, error: Exception | None = None):
    """:func:`crashes_at_call` for MEMIT, the default method of the tiny runs."""
    from kaedit.methods.memit import MEMIT

    return crashes_at_call(MEMIT, call, error)


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
