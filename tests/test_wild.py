"""WILD evaluation (kaedit.wild, issue 27): SQuAD normalisation, exact match and token F1 by
hand; the stop rule; batched greedy answers against a one-sequence forward; locality as
unchanged answers; and the runner's wild/* and wild_* columns on a tiny run."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import FORWARD_REL, Compose, load_tiny, memit_crashes_at_call
from kaedit import experiment, wild
from kaedit.models import LoadedModel
from kaedit.records import EditRequest
from kaedit.wild import WildEval, exact_match, normalize_answer, token_f1


# ------------------------------------------------------------------ text scores by hand
@pytest.mark.parametrize(("text", "expected"), [
    ("The Eiffel Tower.", "eiffel tower"),
    ("  an  Apple, a day!\n", "apple day"),
    ("Theatre", "theatre"),  # "the" only as a word
    ("U.S.A", "usa"),
    ("", ""),
])
def test_normalize_answer(text: str, expected: str) -> None:
    assert normalize_answer(text) == expected


def test_exact_match_and_token_f1_by_hand() -> None:
    assert exact_match(" French.", "French") == 1.0
    assert exact_match("the French language", "French") == 0.0
    # "french language" vs "french": 1 shared word, precision 1/2, recall 1/1 → F1 2/3
    assert token_f1("the French language", "French") == pytest.approx(2 / 3)
    # "new york city" vs "york new": 2 shared, precision 2/3, recall 1 → 0.8
    assert token_f1("New York City", "York, New") == pytest.approx(0.8)
    # repeated words count as often as both have them: "paris paris" vs "paris": P 1/2, R 1
    assert token_f1("Paris Paris", "Paris") == pytest.approx(2 / 3)
    assert token_f1("Berlin", "Paris") == 0.0
    assert token_f1("the", "") == 1.0 and token_f1("x", "the") == 0.0  # no words left


# --------------------------------------------------------------------- the stop rule
@pytest.fixture
def tiny(compose: Compose) -> LoadedModel:
    return load_tiny(compose, "tiny_llama")


def ids(lm: LoadedModel, text: str) -> list[int]:
    return lm.tokenizer(text, add_special_tokens=False)["input_ids"]


def test_answers_stop_at_the_first_token_with_a_stop_string(tiny: LoadedModel) -> None:
    w = WildEval(tiny, max_new_tokens=8)
    dot, newline, a = ids(tiny, ".")[0], ids(tiny, "\n")[0], ids(tiny, "a")[0]
    eos = tiny.tokenizer.eos_token_id
    assert w.is_stop(dot) and w.is_stop(newline) and w.is_stop(eos) and not w.is_stop(a)
    assert w.cut([a, a, dot, a, newline]) == (a, a, dot)  # the stop token kept, as generated
    assert w.cut([a, newline, dot]) == (a, newline)
    assert w.cut([a] * 8) == (a,) * 8  # the length cap
    assert w.text([a, a, dot]) == "aa" and w.text([a, eos]) == "a"
    with pytest.raises(ValueError, match=r"wild.every=-1"):
        WildEval(tiny, every=-1)
    with pytest.raises(ValueError, match="needs the run's model"):
        WildEval(every=1)


PROMPTS = ["The Eiffel Tower is in", "A", "Danielle Darrieux's mother tongue is",
           "Toyota was founded in", "A"]


@pytest.mark.parametrize("batch_size", [1, 2, 3, 32])
def test_batched_answers_are_greedy_and_stop_as_the_rule_says(tiny: LoadedModel,
                                                              batch_size: int) -> None:
    # a random byte-level model rarely says "." or a newline: also stop on a character one
    # of its uncut answers has inside, so that some answers stop early and some run to the cap
    uncut = WildEval(tiny, max_new_tokens=12, stop_strings=(".", "\n")).answers(PROMPTS)
    inside = next(c for a in uncut.values() for t in a[1:6]
                  if len(c := tiny.tokenizer.decode([t])) == 1 and c.isprintable())
    w = WildEval(tiny, max_new_tokens=12, batch_size=batch_size,
                 stop_strings=(".", "\n", inside))
    said = w.answers(PROMPTS)
    assert set(said) == set(PROMPTS)  # each distinct prompt once
    stops = 0
    for prompt, answer in said.items():
        assert 1 <= len(answer) <= 12
        # stopped at the first stop token, or ran to the cap without one
        assert not any(w.is_stop(t) for t in answer[:-1])
        stops += w.is_stop(answer[-1])
        if not w.is_stop(answer[-1]):
            assert len(answer) == 12
        # greedy: each new token is the argmax of a one-sequence forward, up to the
        # rounding of a padded, cached, batched forward (FORWARD_REL of the logits' scale)
        p = tiny.tokenizer(prompt)["input_ids"]
        with torch.no_grad():
            logits = tiny.model(torch.tensor([[*p, *answer]])).logits[0, len(p) - 1:-1]
        chosen = logits.gather(1, torch.tensor(answer)[:, None])[:, 0]
        scale = float(logits.abs().max())
        assert (logits.max(-1).values - chosen <= 2 * FORWARD_REL * scale).all(), prompt
    assert stops >= 1


def one_sequence_logits(lm: LoadedModel, prompt: Sequence[int],
                        answer: Sequence[int]) -> torch.Tensor:
    """Logits ``[len(answer), vocab]`` that predict each answer token, one unpadded row."""
    with torch.no_grad():
        return lm.model(torch.tensor([[*prompt, *answer]])).logits[0, len(prompt) - 1:-1]


@pytest.mark.parametrize("rows", [1, 2, 3, 8])
def test_pool_gives_generates_greedy_answers(tiny: LoadedModel, rows: int) -> None:
    """The pool (rows leave when done, waiting prompts of other widths join) answers as
    ``generate(do_sample=False)`` does one prompt at a time: the same tokens, or a first
    difference at a near-tie of the one-sequence logits (within their rounding)."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    cap = 10
    prompts = [tuple(tiny.tokenizer(p)["input_ids"]) for p in
               ["The Eiffel Tower is in", "A", "Danielle Darrieux's mother tongue is",
                "Toyota was founded in", "Paris", "x y z", "The capital of Italy is Rome and"]]
    uncut = WildEval(tiny, max_new_tokens=cap, batch_size=rows).answers(
        [tiny.tokenizer.decode(p) for p in prompts])
    inside = next(c for a in uncut.values() for t in a[1:6]
                  if len(c := tiny.tokenizer.decode([t])) == 1 and c.isprintable())
    w = WildEval(tiny, max_new_tokens=cap, batch_size=rows, stop_strings=(".", "\n", inside))

    class Stop(StoppingCriteria):
        def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
            return torch.tensor([w.is_stop(int(input_ids[0, -1]))])

    pooled = wild.greedy_pool(tiny, prompts, rows, cap, w.is_stop)
    lengths = set()
    for prompt, answer in zip(prompts, pooled, strict=True):
        with torch.no_grad():
            gen = tiny.model.generate(torch.tensor([prompt]), do_sample=False, num_beams=1,
                                      max_new_tokens=cap, pad_token_id=tiny.tokenizer.pad_token_id,
                                      stopping_criteria=StoppingCriteriaList([Stop()]))
        expected = w.cut(gen[0, len(prompt):].tolist())
        lengths.add(len(answer))
        if answer == expected:
            continue
        k = next(i for i, (a, b) in enumerate(zip(answer, expected, strict=False)) if a != b)
        logits = one_sequence_logits(tiny, prompt, expected[:k + 1])[k]
        gap = abs(float(logits[answer[k]] - logits[expected[k]]))
        assert gap <= 2 * FORWARD_REL * float(logits.abs().max()), (prompt, answer, expected)
    assert len(lengths) > 1  # some answers stopped early, so rows left and others joined


def test_pool_of_nothing_and_a_bad_batch_size(tiny: LoadedModel) -> None:
    assert wild.greedy_pool(tiny, [], 4, 5, lambda t: False) == []
    assert WildEval(tiny).answers([]) == {}
    with pytest.raises(ValueError, match=r"wild.batch_size=0"):
        WildEval(tiny, batch_size=0)


# ------------------------------------------------------------------- scoring and locality
class Scripted(WildEval):
    """Answers from a table of texts (the generation itself is tested above)."""

    def __init__(self, lm: LoadedModel, table: Mapping[str, str]) -> None:
        super().__init__(lm)
        self.table = table

    def answers(self, prompts: Sequence[str]) -> dict[str, tuple[int, ...]]:
        return {p: tuple(ids(self.lm, self.table[p])) for p in prompts}


def test_scores_of_scripted_answers(tiny: LoadedModel) -> None:
    reqs = [EditRequest("1", "Paris", "{} is in", "Italy", target_true="France",
                        paraphrase_prompts=("Where is Paris?", "Paris, the city in"),
                        neighborhood_prompts=("Lyon is in", "Nice is in")),
            EditRequest("2", "Toyota", "{} was founded in", "New Japan", target_true="Japan")]
    before = {"Lyon is in": " France.", "Nice is in": " France."}
    after = {"Paris is in": " Italy.", "Where is Paris?": " It is in Italy.",
             "Paris, the city in": " italy", "Lyon is in": " France.", "Nice is in": " Italy.",
             "Toyota was founded in": " Japan."}
    w = Scripted(tiny, before)
    w.make_references(reqs)
    assert set(w.references) == {"Lyon is in", "Nice is in"}
    w.table = after
    out = w(reqs)
    np.testing.assert_array_equal(out["efficacy"], [1.0, 0.0])
    # "Japan" vs "New Japan": precision 1, recall 1/2 → 2/3
    np.testing.assert_allclose(out["efficacy_f1"], [1.0, 2 / 3])
    # " It is in Italy." is not an exact match; its F1: 1 shared of 4 words, recall 1 → 0.4
    np.testing.assert_array_equal(out["generalization"][:1], [0.5])
    np.testing.assert_allclose(out["generalization_f1"][:1], [(0.4 + 1.0) / 2])
    assert math.isnan(out["generalization"][1]) and math.isnan(out["locality"][1])
    np.testing.assert_array_equal(out["locality"][:1], [0.5])  # Nice changed, Lyon did not
    row = wild.aggregate(out, "wild/seen")
    assert row["wild/seen/efficacy"] == pytest.approx(50.0)
    assert row["wild/seen/locality"] == pytest.approx(50.0)
    assert row["wild/seen/score"] == pytest.approx(3 / (1 / 50 + 1 / 50 + 1 / 50))
    with pytest.raises(RuntimeError, match="make_references must run before any edit"):
        w([EditRequest("3", "X", "{} is", "Y", neighborhood_prompts=("Never seen",))])


def test_locality_is_one_on_the_unedited_model_and_falls_when_answers_change(
        tiny: LoadedModel) -> None:
    reqs = [EditRequest(str(i), "s", "{} is", "x",
                        neighborhood_prompts=(PROMPTS[i], PROMPTS[i + 1]))
            for i in range(3)]
    w = WildEval(tiny, max_new_tokens=6, batch_size=2)
    w.make_references(reqs)
    assert (w(reqs)["locality"] == 1.0).all()  # the same model, other batches
    with torch.no_grad():  # argmax becomes argmin: every first token changes
        tiny.model.get_output_embeddings().weight.neg_()
    assert (w(reqs)["locality"] == 0.0).all()


def test_due_follows_every() -> None:
    class Stub(WildEval):
        def __post_init__(self) -> None:
            pass

    assert [Stub(every=None).due(s, 4) for s in range(5)] == [True, False, False, False, True]
    assert [Stub(every=2).due(s, 5) for s in range(6)] == [True, False, True, False, True, True]
    assert not any(Stub(every=0).due(s, 4) for s in range(5))
    # locality on the WILD steps its own rule picks; "every" = the same steps as WILD
    assert [Stub(every=1, locality_every=None).locality_due(s, 4) for s in range(5)] == [
        True, False, False, False, True]
    assert [Stub(every=2, locality_every=1).locality_due(s, 5) for s in range(6)] == [
        True, False, True, False, True, True]


def test_locality_every_defaults_to_every_and_is_checked(tiny: LoadedModel) -> None:
    assert WildEval(tiny, every=3).locality_every == 3
    assert WildEval(tiny, every=3, locality_every=None).locality_every is None
    for bad in (-1, "sometimes"):
        with pytest.raises(ValueError, match=rf"wild.locality_every={bad} must be"):
            WildEval(tiny, every=1, locality_every=bad)


# ------------------------------------------------------------------------- the runner
def test_runner_logs_wild_columns_on_due_steps(compose: Compose, tiny_run_overrides: list[str],
                                               tmp_path: Path) -> None:
    cfg = compose([*tiny_run_overrides, "wild.every=null", "wild.max_new_tokens=4",
                   "schedule.retention_sample=2", "schedule.generation_every=0"])
    experiment.run(cfg, run_dir=str(tmp_path))
    metrics = pd.read_csv(tmp_path / "metrics.csv")
    retention = pd.read_csv(tmp_path / "retention.csv")
    due = metrics.dropna(subset=["wild/seen/efficacy"])
    assert due["step"].tolist() == [0, 2]  # the unedited and the final model
    for prefix in ("wild/batch", "wild/seen"):
        assert {f"{prefix}/{m}" for m in (*wild.METRICS, "score")} <= set(metrics)
    # at step 0 the model is the one whose answers are the references
    assert due.iloc[0]["wild/seen/locality"] == 100.0
    assert due.iloc[0]["wild/batch/locality"] == 100.0
    per_edit = retention.dropna(subset=["wild_efficacy"])
    assert sorted(per_edit["step"].unique()) == [0, 2]
    assert (per_edit.loc[per_edit["step"] == 0, "wild_locality"] == 1.0).all()
    # wild/seen is the mean of the tracked (here: seen) edits' values, x100
    last = per_edit[per_edit["step"] == 2]
    assert due.iloc[1]["wild/seen/locality"] == pytest.approx(
        100 * last["wild_locality"].mean(), rel=1e-5)
    refs = json.loads((tmp_path / wild.REFERENCES).read_text())
    assert refs and all(isinstance(v, list) and v for v in refs.values())
    assert "time/wild_s" in metrics and metrics["time/wild_s"].notna().sum() == 2


def test_locality_only_where_locality_every_says(compose: Compose,
                                                tiny_run_overrides: list[str],
                                                tmp_path: Path) -> None:
    """wild.every=1 with locality_every=null: exact match and F1 on every evaluated step
    (WILD retention by age), locality at step 0 and the last step only; neighbourhood
    prompts are generated on those steps only, and their references only for the edits
    those steps score."""
    base = [*tiny_run_overrides, "wild.max_new_tokens=4", "schedule.retention_sample=2",
            "schedule.generation_every=0", "schedule.n_edits=3", "schedule.batch_size=1"]
    experiment.run(compose([*base, "wild.every=1", "wild.locality_every=null"]),
                   run_dir=str(tmp_path / "sparse"))
    experiment.run(compose([*base, "wild.every=1"]), run_dir=str(tmp_path / "full"))
    sparse, full = (pd.read_csv(tmp_path / d / "metrics.csv") for d in ("sparse", "full"))
    assert sparse["wild/seen/efficacy"].notna().all() and len(sparse) == 4
    assert sparse["wild/seen/locality"].notna().tolist() == [True, False, False, True]
    assert full["wild/seen/locality"].notna().all()
    # the same answers where both score: exact match everywhere, locality at 0 and the end
    for c in ("wild/seen/efficacy", "wild/batch/efficacy_f1", "wild/seen/generalization"):
        pd.testing.assert_series_equal(sparse[c], full[c])
    ends = [0, 3]
    pd.testing.assert_series_equal(sparse.loc[ends, "wild/seen/locality"],
                                   full.loc[ends, "wild/seen/locality"], check_dtype=False)
    retention = pd.read_csv(tmp_path / "sparse" / "retention.csv")
    assert retention["wild_efficacy"].notna().all()
    assert retention.loc[retention["step"].isin(ends), "wild_locality"].notna().all()
    assert retention.loc[~retention["step"].isin(ends), "wild_locality"].isna().all()
    refs = [json.loads((tmp_path / d / wild.REFERENCES).read_text()) for d in ("sparse", "full")]
    assert refs[0] and set(refs[0]) <= set(refs[1])


def test_resumed_run_reads_the_unedited_answers(compose: Compose,
                                                tiny_run_overrides: list[str],
                                                tmp_path: Path) -> None:
    """Killed while computing step 2, resumed: step 2's locality compares with the
    answers saved at step 0 (not regenerated by the edited model): the same rows as the
    uninterrupted run."""
    overrides = [*tiny_run_overrides, "wild.every=null", "wild.max_new_tokens=4",
                 "schedule.retention_sample=2", "schedule.generation_every=0"]
    experiment.run(compose(overrides), run_dir=str(tmp_path / "whole"))
    cut = tmp_path / "cut"
    with memit_crashes_at_call(2), pytest.raises(RuntimeError, match="simulated crash"):
        experiment.run(compose(overrides), run_dir=str(cut))
    experiment.run(compose([*overrides, f"resume={cut}"]))

    def wild_columns(path: Path) -> pd.DataFrame:
        df = pd.read_csv(path)
        return df[[c for c in df.columns if c.startswith("wild")]]

    for name in ("metrics.csv", "retention.csv"):
        pd.testing.assert_frame_equal(wild_columns(cut / name),
                                      wild_columns(tmp_path / "whole" / name))


def test_wild_is_off_by_default(compose: Compose, tiny_run_overrides: list[str],
                                tmp_path: Path) -> None:
    cfg = compose([*tiny_run_overrides, "schedule.generation_every=0", "schedule.n_edits=3"])
    assert cfg.wild.every == 0
    experiment.run(cfg, run_dir=str(tmp_path))
    assert not any(c.startswith("wild") for c in pd.read_csv(tmp_path / "metrics.csv"))
    assert not (tmp_path / wild.REFERENCES).exists()
