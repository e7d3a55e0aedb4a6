"""The shared teacher-forced batch (:class:`kaedit.tokens.TeacherForced`) against hand-built
layouts and plain forward passes, and the split-tokenisation check (issue 14, item 10)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from conftest import FORWARD_REL, assert_close_to_scale
from kaedit import data
from kaedit.errors import ConfigError
from kaedit.evaluate import CounterFactEval, ZsreEval, check_tokenisation
from kaedit.models import LoadedModel, load_model
from kaedit.records import EditRequest
from kaedit.tokens import TeacherForced, split_mismatches

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
REAL = [(DATA / "counterfact" / "counterfact.json", "auto", CounterFactEval()),
        (DATA / "counterfact" / "counterfact_easyedit_format.json", "auto", CounterFactEval()),
        (DATA / "zsre" / "zsre_mend_eval.json", "zsre", ZsreEval()),
        (DATA / "zsre" / "zsre_mend_eval.json", "zsre_easyedit", ZsreEval())]
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"real data not found at {DATA}")

# (prompt ids, target ids): pairs 0 and 1 are the same row (one prompt, two one-token
# answers), pair 2 has a three-token target.
PAIRS = [((1, 2, 3), (4,)), ((1, 2, 3), (6,)), ((7,), (8, 9, 10))]


def tolist(t: torch.Tensor) -> list:
    return t.tolist()


# ------------------------------------------------------------------------ the layout
def test_layout_with_shared_rows_and_plain_rows() -> None:
    b = TeacherForced.from_ids(PAIRS, pad_id=0, device=torch.device("cpu"),
                               plain=[(5, 5)], share_rows=True)
    assert tolist(b.ids) == [[1, 2, 3], [7, 8, 9], [5, 5, 0]]
    assert tolist(b.mask) == [[1, 1, 1], [1, 1, 1], [1, 1, 0]]
    assert b.n_forced == 2 and b.n_pairs == 3
    assert tolist(b.pair_row) == [0, 0, 1]
    # target token j of a pair is predicted at len(prompt) - 1 + j of its row
    assert tolist(b.row) == [0, 0, 1, 1, 1]
    assert tolist(b.col) == [2, 2, 0, 1, 2]
    assert tolist(b.tok) == [4, 6, 8, 9, 10]
    assert tolist(b.owner) == [0, 1, 2, 2, 2]
    # the shared position (0, 2) is run through the head once
    assert tolist(b.positions) == [[0, 2], [1, 0], [1, 1], [1, 2]]
    assert tolist(b.at) == [0, 0, 1, 2, 3]


def test_layout_without_sharing_has_one_row_per_pair() -> None:
    b = TeacherForced.from_ids(PAIRS, pad_id=0, device=torch.device("cpu"))
    assert tolist(b.ids) == [[1, 2, 3], [1, 2, 3], [7, 8, 9]]
    assert b.n_forced == 3 and tolist(b.pair_row) == [0, 1, 2]
    assert tolist(b.row) == [0, 1, 2, 2, 2] and tolist(b.at) == [0, 1, 2, 3, 4]


def test_pair_mean_averages_each_pairs_tokens() -> None:
    b = TeacherForced.from_ids(PAIRS, pad_id=0, device=torch.device("cpu"), share_rows=True)
    got = b.pair_mean(torch.tensor([1.0, 2.0, 3.0, 4.0, 8.0]))
    assert tolist(got) == [1.0, 2.0, 5.0]


def test_empty_target_is_refused() -> None:
    with pytest.raises(ValueError, match="pair 1 has an empty target"):
        TeacherForced.from_ids([((1,), (2,)), ((1,), ())], 0, torch.device("cpu"))


# ------------------------------------------------------------------------ the numbers
TEXT_PAIRS = [("The Eiffel Tower is in", "Paris"), ("The Eiffel Tower is in", "Rome"),
              ("Toyota was founded in", "Japan"), ("A", "B C D"),
              ("Danielle Darrieux's mother tongue is", "French")]


def unbatched(lm: LoadedModel, prompt: str, target: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean NLL, token accuracy) of one pair from a plain single-sequence forward."""
    tok = lm.tokenizer
    p = tok(prompt)["input_ids"]
    t = tok(" " + target, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(lm.model(torch.tensor([p + t])).logits[0].float(), -1)
    cols = [len(p) - 1 + j for j in range(len(t))]
    nll = -logp[cols, t].mean()
    hits = (logp[cols].argmax(-1) == torch.tensor(t)).float().mean()
    return nll, hits


@pytest.mark.parametrize("share_rows", [False, True])
def test_scores_match_single_sequence_forwards(lm: LoadedModel, share_rows: bool) -> None:
    b = TeacherForced.build(lm, TEXT_PAIRS, plain=["Berlin is located in"],
                            share_rows=share_rows)
    with torch.no_grad():
        hidden, _ = b.hidden(lm)
        logp = b.logp(lm, hidden)
        nll = b.forced_nll(lm, hidden)
        hits = b.pair_mean(b.token_hits(logp))
        plain = b.plain_logp(lm, hidden)
    ref = [unbatched(lm, p, t) for p, t in TEXT_PAIRS]
    # float32 forwards of a padded batch and of one sequence differ only by summation order
    assert_close_to_scale(nll, torch.stack([r[0] for r in ref]), FORWARD_REL, "pair NLL")
    assert tolist(hits) == [float(r[1]) for r in ref]
    # forced_nll is literally pair_mean(token_nll(logp(...))): the same ops, exactly equal
    assert_close_to_scale(nll, b.pair_mean(b.token_nll(logp)), 0.0, "one reduction")
    ids = lm.tokenizer("Berlin is located in")["input_ids"]
    with torch.no_grad():
        want = torch.log_softmax(lm.model(torch.tensor([ids])).logits[0].float(), -1)
    assert_close_to_scale(plain, want, FORWARD_REL, "plain rows' log-probabilities")


# ------------------------------------------------------------------ tokenisation check
def sentencepiece_like():
    """A tokenizer that, like Llama-2's SentencePiece, puts a lone "▁" before a text that
    starts with a space: " Paris" apart is ["▁", "▁Paris"], after a prompt "▁Paris"."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["The", "Eiffel", "Tower", "is", "in", "Paris", "Rome", "Toyota", "was", "founded",
             "Japan"]
    vocab = {"<unk>": 0, "▁": 1, **{"▁" + w: i + 2 for i, w in enumerate(words)}}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.normalizer = normalizers.Sequence([normalizers.Prepend("▁"),
                                          normalizers.Replace(" ", "▁")])
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never")
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", pad_token="<unk>",
                                   name_or_path="toy-sentencepiece")


REQUESTS = [EditRequest("11", "Toyota", "{} was founded in", "Japan", target_true="Rome"),
            EditRequest("12", "The Eiffel Tower", "{} is in", "Paris", target_true="Rome")]


def test_sentencepiece_prefix_is_a_clear_error() -> None:
    tok = sentencepiece_like()
    bad = split_mismatches(tok, [("The Eiffel Tower is in", "Paris")])
    assert len(bad) == 1 and tok.convert_ids_to_tokens(list(bad[0][2][-2:])) == ["▁", "▁Paris"]
    # 2 requests x (new, true) on the rewrite prompt: every pair carries the lone "▁"
    with pytest.raises(ConfigError, match=r"tokenizer 'toy-sentencepiece' .*4 of 4 .*"
                                          r"case_id=11 'Toyota was founded in' \+ 'Japan'"):
        check_tokenisation(tok, CounterFactEval(), REQUESTS)


def test_tiny_tokenizers_split_as_they_join(lm: LoadedModel, tiny_rome_dataset: Path) -> None:
    reqs = data.load_requests(str(tiny_rome_dataset))
    check_tokenisation(lm.tokenizer, CounterFactEval(), reqs)  # no error
    pairs = CounterFactEval().pairs(reqs)
    assert pairs.prompts and not split_mismatches(lm.tokenizer,
                                                  zip(pairs.prompts, pairs.targets, strict=True))


@needs_data
@pytest.mark.parametrize(("path", "schema", "evaluator"), REAL, ids=lambda x: str(x)[-30:])
def test_tiny_tokenizers_on_real_data(lm: LoadedModel, path: Path, schema: str,
                                      evaluator) -> None:
    check_tokenisation(lm.tokenizer, evaluator, data.load_requests(str(path), schema, 300))


@pytest.mark.slow
@needs_data
def test_smollm2_splits_every_real_pair_as_it_joins() -> None:
    from kaedit.experiment import compose as compose_config

    cfg = compose_config(["model=smollm2", "logger=csv"])  # the real cache: no dequantizing
    tok = load_model(cfg.model, lambda: instantiate(cfg.model.load)).tokenizer
    for path, schema, evaluator in REAL:
        check_tokenisation(tok, evaluator, data.load_requests(str(path), schema))


def test_run_stops_at_start_on_a_splitting_tokenizer(compose, tiny_run_overrides: list[str],
                                                     tmp_path: Path, monkeypatch) -> None:
    """The tiny model built with the SentencePiece-like tokenizer: the run refuses it before
    statistics, templates or any output."""
    from kaedit import experiment, models

    monkeypatch.setattr(models, "byte_tokenizer", sentencepiece_like)
    run_dir = tmp_path / "run"
    with pytest.raises(ConfigError, match=r"tokenizer 'toy-sentencepiece' .* case_id=0 "):
        experiment.run(compose(tiny_run_overrides), run_dir=str(run_dir))
    assert not run_dir.exists()
