"""Fusion strategies (paper §3.2, eq. 5): statistics, determinism, purity."""

from __future__ import annotations

import math

import pytest
import torch

from kaedit.fusion import Add, DropRescale, TopK, drop_rescale, top_k

N = 1_000_000


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("p", [0.5, 0.8, 0.9])
def test_drop_rescale_statistics(p: float) -> None:
    out = DropRescale(p)({"w": torch.ones(1000, N // 1000)}, gen(0))["w"]
    dropped = (out == 0).float().mean().item()
    assert abs(dropped - p) < 5 * math.sqrt(p * (1 - p) / N)  # 5 binomial std
    survivors = out[out != 0]
    assert torch.equal(survivors, torch.full_like(survivors, 1 / (1 - p)))
    # E[Δ̂] = Δ: std of the mean of N draws of (Bernoulli(1-p) / (1-p)) is sqrt(p/(1-p)/N).
    assert abs(out.mean().item() - 1.0) < 5 * math.sqrt(p / (1 - p) / N)


def test_drop_rescale_seeded() -> None:
    deltas = {"a": torch.randn(64, 32), "b": torch.randn(32, 64)}
    first = DropRescale(0.8)(deltas, gen(1))
    again = DropRescale(0.8)(deltas, gen(1))
    other = DropRescale(0.8)(deltas, gen(2))
    assert all(torch.equal(first[n], again[n]) for n in deltas)
    assert all(not torch.equal(first[n], other[n]) for n in deltas)


def test_drop_rescale_mask_ignores_dict_order() -> None:
    a, b = torch.randn(16, 8), torch.randn(8, 16)
    one = DropRescale(0.5)({"a": a, "b": b}, gen(3))
    two = DropRescale(0.5)({"b": b, "a": a}, gen(3))
    assert torch.equal(one["a"], two["a"]) and torch.equal(one["b"], two["b"])


def test_drop_rescale_p_zero_is_a_copy() -> None:
    delta = torch.randn(10, 10)
    out = DropRescale(0.0)({"w": delta}, gen(0))["w"]
    assert torch.equal(out, delta)
    assert out.data_ptr() != delta.data_ptr()


@pytest.mark.parametrize("p", [1.0, -0.1, 1.5])
def test_drop_rescale_invalid_p(p: float) -> None:
    with pytest.raises(ValueError, match=rf"p={p}"):
        DropRescale(p)
    with pytest.raises(ValueError, match=rf"p={p}"):
        drop_rescale(torch.ones(3), p, gen(0))


@pytest.mark.parametrize("k", [0.01, 0.2, 0.5, 1.0])
def test_top_k_keeps_the_largest(k: float) -> None:
    delta = torch.randn(100, 37, generator=gen(0))  # no zeros, no ties
    out = TopK(k)({"w": delta}, gen(0))["w"]
    kept = out != 0
    assert int(kept.sum()) == round(k * delta.numel())
    assert torch.equal(out[kept], delta[kept])  # kept entries unchanged, sign included
    if k < 1.0:
        assert delta[kept].abs().min() >= delta[~kept].abs().max()


def test_top_k_keeps_at_least_one_and_rejects_bad_k() -> None:
    delta = torch.tensor([0.1, -3.0, 2.0])
    assert torch.equal(top_k(delta, 0.01), torch.tensor([0.0, -3.0, 0.0]))
    for k in (0.0, -0.2, 1.5):
        with pytest.raises(ValueError, match=rf"k={k}"):
            TopK(k)
        with pytest.raises(ValueError, match=rf"k={k}"):
            top_k(delta, k)


def test_add_copies() -> None:
    delta = torch.randn(5, 4)
    out = Add()({"w": delta}, gen(0))["w"]
    assert torch.equal(out, delta)
    assert out.data_ptr() != delta.data_ptr()
    out += 1
    assert not torch.equal(out, delta)


@pytest.mark.parametrize("fusion", [Add(), TopK(0.3), DropRescale(0.7)], ids=repr)
def test_fusions_leave_inputs_alone(fusion) -> None:
    deltas = {"a": torch.randn(20, 10), "b": torch.randn(10, 20)}
    originals = {n: d.clone() for n, d in deltas.items()}
    out = fusion(deltas, gen(0))
    assert set(out) == set(deltas)
    for n, d in deltas.items():
        assert torch.equal(d, originals[n])
        assert out[n].shape == d.shape and out[n].dtype == d.dtype
