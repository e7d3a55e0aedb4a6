"""Metrics against hand-computed values, and batched scoring against a plain forward pass."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import pytest
import torch

from conftest import FORWARD_REL, assert_close_to_scale
from kaedit.evaluate import CounterFactEval, Scorer, ZsreEval, aggregate, harmonic_mean
from kaedit.models import LoadedModel
from kaedit.records import EditRequest

nan = math.nan


class FakeScorer:
    """Returns hand-set (nll, acc) per (prompt, target); records what it was asked."""

    def __init__(self, table: Mapping[tuple[str, str], tuple[float, float]]) -> None:
        self.table = table
        self.asked: list[tuple[str, str]] = []

    def score(self, prompts: Sequence[str], targets: Sequence[str]) -> tuple[np.ndarray, ...]:
        pairs = list(zip(prompts, targets, strict=True))
        self.asked += pairs
        return (
            np.array([self.table[p][0] for p in pairs]),
            np.array([self.table[p][1] for p in pairs]),
        )


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([50.0, 100.0, 100.0], 75.0),
        ([80.0, 80.0, 80.0], 80.0),
        ([90.0, 60.0], 72.0),
        ([90.0, nan, 60.0], nan),
        ([90.0, 0.0, 60.0], 0.0),
        ([], nan),
    ],
)
def test_harmonic_mean(values: list[float], expected: float) -> None:
    got = harmonic_mean(values)
    assert math.isnan(got) if math.isnan(expected) else got == pytest.approx(expected)


def test_aggregate() -> None:
    per_request = {
        "efficacy": np.array([1.0, 0.0, nan]),  # NaN (no such prompt) is skipped
        "generalization": np.array([0.5, 0.5, 0.5]),
        "specificity": np.array([1.0, 1.0, 0.0]),
        "efficacy_mag": np.array([0.2, -0.1, 0.5]),
    }
    out = aggregate(per_request, "seen")
    assert out["seen/efficacy"] == pytest.approx(50.0)
    assert out["seen/generalization"] == pytest.approx(50.0)
    assert out["seen/specificity"] == pytest.approx(200 / 3)
    assert out["seen/efficacy_mag"] == pytest.approx(20.0)
    assert out["seen/score"] == pytest.approx(3 / (1 / 50 + 1 / 50 + 3 / 200))
    assert set(out) == {f"seen/{k}" for k in per_request} | {"seen/score"}


def test_aggregate_all_nan_and_zero() -> None:
    out = aggregate(
        {
            "efficacy": np.array([1.0]),
            "generalization": np.array([nan]),
            "specificity": np.array([1.0]),
        },
        "batch",
    )
    assert math.isnan(out["batch/generalization"]) and math.isnan(out["batch/score"])
    out = aggregate(
        {
            "efficacy": np.array([0.0, 0.0]),
            "generalization": np.array([1.0, 1.0]),
            "specificity": np.array([1.0, 0.0]),
        },
        "batch",
    )
    assert out["batch/efficacy"] == 0.0 and out["batch/score"] == 0.0


CF_REQUESTS = [
    EditRequest(
        "1",
        "Paris",
        "{} is in",
        "Italy",
        target_true="France",
        paraphrase_prompts=("Where is Paris?", "Paris, the city in"),
        neighborhood_prompts=("Lyon is in", "Nice is in"),
    ),
    # EasyEdit style: no paraphrase, a neighbour with its own answer.
    EditRequest(
        "2",
        "Toyota",
        "{} was founded in",
        "Germany",
        target_true="Japan",
        neighborhood_prompts=("Honda was founded in",),
        neighborhood_answer="Tokyo",
        source="easyedit",
    ),
]
CF_NLL = {
    ("Paris is in", "Italy"): 1.0,
    ("Paris is in", "France"): 2.0,  # new wins
    ("Where is Paris?", "Italy"): 1.0,
    ("Where is Paris?", "France"): 3.0,  # new wins
    ("Paris, the city in", "Italy"): 4.0,
    ("Paris, the city in", "France"): 2.0,  # true wins
    ("Lyon is in", "Italy"): 3.0,
    ("Lyon is in", "France"): 1.0,  # true wins: specific
    ("Nice is in", "Italy"): 0.5,
    ("Nice is in", "France"): 1.5,  # new leaked: not specific
    ("Toyota was founded in", "Germany"): 3.0,
    ("Toyota was founded in", "Japan"): 1.0,
    ("Honda was founded in", "Germany"): 2.0,
    ("Honda was founded in", "Tokyo"): 1.0,
}


def test_counterfact_eval() -> None:
    scorer = FakeScorer({k: (v, 0.0) for k, v in CF_NLL.items()})
    out = CounterFactEval()(scorer, CF_REQUESTS)
    np.testing.assert_array_equal(out["efficacy"], [1.0, 0.0])
    np.testing.assert_array_equal(out["generalization"], [0.5, nan])
    np.testing.assert_array_equal(out["specificity"], [0.5, 1.0])
    e = np.exp
    np.testing.assert_allclose(out["efficacy_mag"], [e(-1) - e(-2), e(-3) - e(-1)])
    np.testing.assert_allclose(
        out["generalization_mag"], [((e(-1) - e(-3)) + (e(-4) - e(-2))) / 2, nan]
    )
    # Specificity's magnitude is P(true) - P(new).
    np.testing.assert_allclose(
        out["specificity_mag"], [((e(-1) - e(-3)) + (e(-1.5) - e(-0.5))) / 2, e(-1) - e(-2)]
    )
    assert sorted(scorer.asked) == sorted(CF_NLL)  # neighbour answer "Tokyo", not "Japan"


def test_counterfact_eval_needs_target_true() -> None:
    req = EditRequest("9", "X", "{} is", "Y")
    with pytest.raises(ValueError, match=r"9.*target_true"):
        CounterFactEval()(FakeScorer({}), [req])


def test_zsre_eval() -> None:
    reqs = [
        EditRequest(
            "0",
            "Nile",
            "What continent is the {} in?",
            "Asia",
            target_true="Africa",
            paraphrase_prompts=("The Nile flows through?", "Where is the Nile?"),
            neighborhood_prompts=("Who wrote Hamlet?",),
            neighborhood_answer="Shakespeare",
            source="zsre",
        ),
        EditRequest("1", "Euler", "Where was {} born?", "Oslo", source="zsre"),
    ]
    acc = {
        ("What continent is the Nile in?", "Asia"): 1.0,
        ("The Nile flows through?", "Asia"): 0.5,
        ("Where is the Nile?", "Asia"): 0.0,
        ("Who wrote Hamlet?", "Shakespeare"): 0.75,
        ("Where was Euler born?", "Oslo"): 0.25,
    }
    scorer = FakeScorer({k: (99.0, v) for k, v in acc.items()})
    out = ZsreEval()(scorer, reqs)
    assert set(out) == {"efficacy", "generalization", "specificity"}
    np.testing.assert_array_equal(out["efficacy"], [1.0, 0.25])
    np.testing.assert_array_equal(out["generalization"], [0.25, nan])
    np.testing.assert_array_equal(out["specificity"], [0.75, nan])
    assert sorted(scorer.asked) == sorted(acc)


PAIRS = [
    ("The Eiffel Tower is in", "Paris"),
    ("A", "B"),
    ("Danielle Darrieux's mother tongue is", "French"),
    ("Toyota was founded in", "Japan"),
    ("The Eiffel Tower is in", "Rome"),
]


def reference_score(lm: LoadedModel, prompt: str, target: str) -> tuple[float, float]:
    """One pair, no padding, no batching: mean NLL and accuracy of the target tokens."""
    p = lm.tokenizer(prompt)["input_ids"]
    t = lm.tokenizer(" " + target, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = lm.model(torch.tensor([p + t])).logits[0]
    logp = torch.log_softmax(logits.double(), -1)
    nll = [-logp[len(p) - 1 + j, tok].item() for j, tok in enumerate(t)]
    hit = [float(logp[len(p) - 1 + j].argmax() == tok) for j, tok in enumerate(t)]
    return float(np.mean(nll)), float(np.mean(hit))


@pytest.mark.parametrize("batch_size", [2, 64])
def test_scorer_matches_unbatched_forward(lm: LoadedModel, batch_size: int) -> None:
    nll, acc = Scorer(lm, batch_size=batch_size).score(*zip(*PAIRS, strict=True))
    ref = [reference_score(lm, p, t) for p, t in PAIRS]
    # padded, batched float32 forward vs one unpadded pass: the same arithmetic blocked
    # differently, through a few layers (FORWARD_REL; the reference's float64 log-softmax
    # only removes rounding)
    assert_close_to_scale(torch.as_tensor(nll), torch.tensor([r[0] for r in ref]),
                          rel=FORWARD_REL, msg="nll")
    np.testing.assert_allclose(acc, [r[1] for r in ref])
    assert nll[0] != nll[4]  # same prompt, different target: different scores


def test_scorer_follows_the_weights(lm: LoadedModel) -> None:
    scorer = Scorer(lm)
    before, _ = scorer.score(*zip(*PAIRS, strict=True))  # caches tokenisation, not results
    with torch.no_grad():
        lm.model.get_output_embeddings().weight.mul_(3.0)
    after, _ = scorer.score(*zip(*PAIRS, strict=True))
    ref = [reference_score(lm, p, t)[0] for p, t in PAIRS]
    assert_close_to_scale(torch.as_tensor(after), torch.tensor(ref), rel=FORWARD_REL, msg="nll")
    assert np.abs(after - before).max() > 1e-3
