"""WILD evaluation on the real SmolLM2-135M (embedded GGUF) and real CounterFact records.

Marked slow: loads the real model (dequantized once, cached) and generates ~70 answers of
up to 50 tokens (≈ 0.3 s each on one CPU thread).
"""

from __future__ import annotations

import pytest
from hydra.utils import instantiate

from kaedit import data
from kaedit.experiment import compose as compose_config
from kaedit.experiment import resolve_data_root
from kaedit.models import load_model
from kaedit.records import EditRequest
from kaedit.wild import WildEval, exact_match

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cfg():
    c = compose_config(["logger=csv"])
    resolve_data_root(c)
    return c


@pytest.fixture(scope="module")
def lm(cfg):
    return load_model(cfg.model, lambda: instantiate(cfg.model.load))


def test_wild_on_real_records_of_the_unedited_model(cfg, lm) -> None:
    records = data.from_config(cfg.dataset, cache_dir=str(cfg.cache_dir))[:5]
    known = EditRequest("known", "France", "The capital of {} is", "Paris",
                        target_true="Paris", neighborhood_prompts=("The capital of Italy is",))
    requests = [*records, known]
    w = WildEval(lm, every=1, max_new_tokens=50, batch_size=16)
    w.make_references(requests)
    out = w(requests)
    # the model the references came from: every neighbourhood answer unchanged
    assert (out["locality"] == 1.0).all()
    # a fact the model knows, answered in its own words: " Paris." is an exact match
    said = w.answers([known.rewrite_prompt])[known.rewrite_prompt]
    assert w.is_stop(said[-1]) and out["efficacy"][-1] == 1.0
    assert exact_match(w.text(said), "Paris") == 1.0
    # real answers stop at the rule's first stop token or at the cap, never after
    answers = w.answers([p for r in records for p in (r.rewrite_prompt, *r.paraphrase_prompts)])
    for answer in answers.values():
        assert not any(w.is_stop(t) for t in answer[:-1])
        assert w.is_stop(answer[-1]) or len(answer) == 50
    assert any(w.is_stop(a[-1]) for a in answers.values())  # some stop naturally
    # exact match and F1 per record lie in [0, 1], F1 ≥ exact match (the known fact has
    # no paraphrase: NaN)
    for m in ("efficacy", "generalization"):
        em, f1 = out[m][:-1], out[f"{m}_f1"][:-1]
        assert ((em >= 0) & (em <= f1 + 1e-12) & (f1 <= 1)).all(), m
