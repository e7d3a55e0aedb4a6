"""Fluency and consistency against hand-computed values; batched greedy generation against
one prompt at a time; the runner logs both on the steps generation is due."""

from __future__ import annotations

import json
import math
import re
import unicodedata
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import Compose
from kaedit import experiment, metrics
from kaedit.evaluate import CounterFactEval, Generator, TextMetrics, ZsreEval
from kaedit.models import LoadedModel
from kaedit.records import EditRequest
from kaedit.schedule import Schedule


def h(*probs: float) -> float:
    """Entropy in bits."""
    return -sum(p * math.log2(p) for p in probs)


# ----------------------------------------------------------------------------- fluency
def test_word_tokens_follow_treebank_per_sentence() -> None:
    assert metrics.word_tokens("Paris isn't big. It's nice!") == [
        "Paris", "is", "n't", "big", ".", "It", "'s", "nice", "!"]


def test_ngram_entropy_by_hand() -> None:
    tokens = ["a", "b", "a", "b"]
    # bigrams ab, ba, ab -> frequencies 2/3, 1/3; trigrams aba, bab -> 1/2, 1/2
    assert metrics.ngram_entropy(tokens, 2) == pytest.approx(h(2 / 3, 1 / 3))
    assert metrics.ngram_entropy(tokens, 3) == pytest.approx(1.0)
    assert metrics.ngram_entropy(["a", "a", "a"], 2) == 0.0  # one distinct bigram
    assert metrics.ngram_entropy(["a"], 2) == 0.0  # no bigram at all


def test_text_entropy_is_roms_weighted_mean() -> None:
    # (2/3 · H2 + 4/3 · H3) / 2, in bits
    expected = (2 / 3 * h(2 / 3, 1 / 3) + 4 / 3 * 1.0) / 2
    assert metrics.text_entropy("a b a b") == pytest.approx(expected)
    # 5 distinct words: 4 distinct bigrams, 3 distinct trigrams
    assert metrics.text_entropy("one two three four five") == pytest.approx(
        (2 / 3 * 2.0 + 4 / 3 * math.log2(3)) / 2)


def test_fluency_averages_texts() -> None:
    texts = ["a b a b", "one two three four five"]
    assert metrics.fluency(texts) == pytest.approx(np.mean([metrics.text_entropy(t)
                                                            for t in texts]))
    assert math.isnan(metrics.fluency([]))


# ------------------------------------------------------------------------- consistency
VOCAB = {"paris": 0, "france": 1, "rome": 2}
IDF = np.array([1.0, 2.0, 3.0])


def test_tfidf_similarity_by_hand() -> None:
    vec = metrics.rome_vectorizer(IDF, VOCAB)
    # counts x idf: "Paris, paris and France" -> [2, 2, 0]; "France. Rome!" -> [0, 2, 3]
    got = metrics.tfidf_similarity("Paris, paris and France", "France. Rome!", vec)
    assert got == pytest.approx(4 / math.sqrt(8 * 13))
    assert metrics.tfidf_similarity("Paris", "Rome", vec) == 0.0
    assert metrics.tfidf_similarity("nothing known", "Rome", vec) == 0.0  # zero vector


def test_rome_vectorizer_checks_sizes() -> None:
    with pytest.raises(ValueError, match="idf has 2 entries but the vocabulary 3"):
        metrics.rome_vectorizer(IDF[:2], VOCAB)


def test_fit_vectorizer_on_paragraphs() -> None:
    text = " = Title = \n\nParis is in France\n\n = = Sub = = \nRome is in Italy\n"
    docs = metrics.paragraphs(text)
    assert docs == ["Paris is in France", "Rome is in Italy"]
    vec = metrics.fit_vectorizer(docs)
    # smooth idf: ln((1 + n) / (1 + df)) + 1 with n = 2 documents
    assert vec.idf_[vec.vocabulary_["is"]] == pytest.approx(1.0)
    assert vec.idf_[vec.vocabulary_["paris"]] == pytest.approx(math.log(3 / 2) + 1)


# --------------------------------------------------------------------- TextMetrics
REQUEST = EditRequest("7", "Toyota", "{} was founded in", "Germany", target_true="Japan",
                      relation_id="P17", target_new_id="Q183",
                      attribute_prompts=("Berlin is in", "Munich is in"),
                      generation_prompts=("Toyota is", "Toyota makes"))


class FakeGenerate:
    def __init__(self, table: dict[str, str]) -> None:
        self.table, self.asked = table, []

    def __call__(self, prompts):
        self.asked += list(prompts)
        return [self.table[p] for p in prompts]


def rome_files(tmp_path: Path) -> dict[str, str]:
    snippets = [{"relation_id": "P17", "target_id": "Q183",
                 "samples": [{"name": "X", "text": "France"}, {"name": "Y", "text": "Rome"}]}]
    paths = {"snippets": tmp_path / "snips.json", "idf": tmp_path / "idf.npy",
             "vocab": tmp_path / "vocab.json"}
    paths["snippets"].write_text(json.dumps(snippets))
    np.save(paths["idf"], IDF)
    paths["vocab"].write_text(json.dumps(VOCAB))
    return {k: str(v) for k, v in paths.items()}


def test_text_metrics_with_rome_snippets(tmp_path: Path) -> None:
    texts = TextMetrics(lm=None, **rome_files(tmp_path))
    assert texts.source == "rome_snippets" and not texts.needs_references
    texts.generate = FakeGenerate({"Toyota is": "Paris, paris", "Toyota makes": "and France"})
    out = texts([REQUEST])
    # generations joined -> [2, 2, 0]; snippets joined "France Rome" -> [0, 2, 3]
    assert out["consistency"] == pytest.approx([4 / math.sqrt(8 * 13)])
    expected = np.mean([metrics.text_entropy("Paris, paris"), metrics.text_entropy("and France")])
    assert out["fluency"] == pytest.approx([expected])
    other = EditRequest("8", "X", "{} is", "Y", relation_id="P17", target_new_id="Q1",
                        generation_prompts=("Toyota is",))
    assert math.isnan(texts([other])["consistency"][0])  # no snippets for (P17, Q1)


def test_text_metrics_needs_all_rome_files(tmp_path: Path) -> None:
    files = rome_files(tmp_path)
    with pytest.raises(
        ValueError, match=re.escape("generation.idf/snippets set but generation.vocab")
    ):
        TextMetrics(lm=None, snippets=files["snippets"], idf=files["idf"])
    with pytest.raises(ValueError, match=r"generation\.vocab=.*does not exist"):
        TextMetrics(lm=None, **{**files, "vocab": str(tmp_path / "missing.json")})


def test_text_metrics_fallback_references(tmp_path: Path) -> None:
    corpus = tmp_path / "wiki.txt"
    corpus.write_text(" = T = \nParis is in France\nRome is in Italy\nBerlin is in Germany\n")
    texts = TextMetrics(lm=None, corpus=[str(corpus)])
    assert texts.source == "fallback_wikitext" and texts.needs_references
    gen = FakeGenerate({"Berlin is in": "Berlin is in Germany", "Munich is in": "Munich",
                        "Toyota is": "Toyota is in Germany", "Toyota makes": "cars"})
    texts.generate = gen
    with pytest.raises(RuntimeError, match=r"request 7.*before any edit"):
        texts([REQUEST])
    refs = texts.make_references([REQUEST, REQUEST])
    assert refs == {"7": "Berlin is in Germany Munich"}
    assert gen.asked[-2:] == ["Berlin is in", "Munich is in"]  # once per request
    out = texts([REQUEST])
    vec = metrics.fit_vectorizer(["Paris is in France", "Rome is in Italy",
                                  "Berlin is in Germany"])
    assert out["consistency"] == pytest.approx(
        [metrics.tfidf_similarity("Toyota is in Germany cars", refs["7"], vec)])
    assert 0 < out["consistency"][0] < 1
    assert texts([EditRequest("9", "X", "{} is", "Y")]) == {}  # no generation prompts


def test_evaluators_take_texts_only_where_they_have_generations() -> None:
    class Scorer:
        def score(self, prompts, targets):
            return np.zeros(len(prompts)), np.zeros(len(prompts))

    class Texts:
        def __call__(self, requests):
            return {"fluency": np.full(len(requests), 6.0)}

    out = CounterFactEval()(Scorer(), [REQUEST], texts=Texts())
    assert out["fluency"].tolist() == [6.0] and "efficacy" in out
    assert "fluency" not in CounterFactEval()(Scorer(), [REQUEST])
    assert "fluency" not in ZsreEval()(Scorer(), [REQUEST], texts=Texts())


# ----------------------------------------------------------------------- generation
PROMPTS = ["The Eiffel Tower is in", "A", "Danielle Darrieux's mother tongue is",
           "Toyota was founded in", "A"]


def test_batched_greedy_generation_matches_one_at_a_time(lm: LoadedModel) -> None:
    got = Generator(lm, max_new_tokens=8, batch_size=3)(PROMPTS)
    tok = lm.tokenizer
    for prompt, text in zip(PROMPTS, got, strict=True):
        ids = torch.tensor([tok(prompt)["input_ids"]])
        out = lm.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                do_sample=False, max_new_tokens=8,
                                pad_token_id=tok.pad_token_id)
        ref = tok.decode(out[0], skip_special_tokens=True)
        assert text == unicodedata.normalize("NFKD", ref).replace("\n\n", " ")
        assert text.startswith(prompt)


def test_generation_schedule() -> None:
    default, every2, never = (Schedule(generation_every=g) for g in (None, 2, 0))
    assert [s for s in range(6) if default.generation_at(s, 5)] == [0, 5]
    assert [s for s in range(6) if every2.generation_at(s, 5)] == [0, 2, 4, 5]
    assert not any(never.generation_at(s, 5) for s in range(6))
    sparse = Schedule(generation_every=1, eval_every=2)  # only on evaluated steps
    assert [s for s in range(6) if sparse.generation_at(s, 5)] == [0, 2, 4, 5]


# ----------------------------------------------------------------------------- runner
@pytest.fixture
def rome_run(compose: Compose, tiny_run_overrides: list[str], tiny_rome_dataset: Path,
             tmp_path: Path):
    def _run(*overrides: str, name: str = "run") -> tuple[dict, Path]:
        cfg = compose([*tiny_run_overrides, f"dataset.path='{tiny_rome_dataset}'",
                       "generation.max_new_tokens=6", *overrides])
        run_dir = tmp_path / name
        return experiment.run(cfg, run_dir=str(run_dir)), run_dir

    return _run


def test_run_logs_generation_metrics_when_due(rome_run) -> None:
    summary, run_dir = rome_run("schedule.generation_every=1")
    metrics_df = pd.read_csv(run_dir / "metrics.csv")
    for col in ("seen/fluency", "seen/consistency", "batch/fluency", "batch/consistency"):
        assert metrics_df[col].notna().all(), col
    assert metrics_df["seen/fluency"].between(0, 1000).all()
    assert metrics_df["seen/consistency"].between(0, 100).all()
    assert summary["consistency_source"] == "fallback_wikitext"
    # the unedited model's references for all 6 planned edits, written once for resuming
    references = json.loads((run_dir / "references.json").read_text())
    assert sorted(references) == [str(i) for i in range(6)]
    retention = pd.read_csv(run_dir / "retention.csv")
    assert retention["fluency"].notna().all()


def test_run_generates_only_at_first_and_last_step_by_default(rome_run, monkeypatch) -> None:
    calls = []
    real = Generator.__call__
    monkeypatch.setattr(Generator, "__call__",
                        lambda self, prompts: calls.append(len(prompts)) or real(self, prompts))
    summary, run_dir = rome_run("schedule.n_edits=6", "schedule.batch_size=2")
    metrics_df = pd.read_csv(run_dir / "metrics.csv")
    assert metrics_df["seen/fluency"].notna().tolist() == [True, False, False, True]
    # references (2 attribute prompts x 6 edits) once, then steps 0 and 3 (3 prompts x 6)
    assert calls == [12, 18, 18]
    assert "consistency_source" in summary


def test_run_without_generation(rome_run) -> None:
    summary, run_dir = rome_run("schedule.generation_every=0")
    assert "seen/fluency" not in pd.read_csv(run_dir / "metrics.csv")
    assert "consistency_source" not in summary
